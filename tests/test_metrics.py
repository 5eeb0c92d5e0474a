"""Metrics against scikit-learn on random predictions, including classes never predicted or absent."""
import csv
import json

import numpy as np
import pytest

sk = pytest.importorskip("sklearn.metrics")

from mineralnet.metrics import compute_metrics, confusion_matrix, format_table, row_percent, summarize, topk_accuracy
from mineralnet.report import abbreviate


def _random_case(seed, num_classes=6, n=80):
    rng = np.random.default_rng(seed)
    # class 4 never occurs in the targets, class 5 is never predicted
    targets = rng.choice([0, 1, 2, 3, 5], size=n)
    preds = np.where(rng.random(n) < 0.5, targets, rng.integers(0, 5, size=n))
    preds[preds == 5] = 0
    probs = rng.random((n, num_classes))
    probs /= probs.sum(1, keepdims=True)
    return targets, preds, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    C = 6
    t, p, probs = _random_case(seed, C)
    m = compute_metrics(t, p, probs, classes=[f"m{i}" for i in range(C)])
    labels = list(range(C))

    np.testing.assert_array_equal(np.array(m["confusion"]), sk.confusion_matrix(t, p, labels=labels))
    assert m["top1"] == pytest.approx(sk.accuracy_score(t, p))
    with pytest.warns(UserWarning):  # sklearn warns about the absent class 4 and skips it, as we do
        bal = sk.balanced_accuracy_score(t, p)
    assert m["mean_class_acc"] == pytest.approx(bal)
    assert m["top3"] == pytest.approx(sk.top_k_accuracy_score(t, probs, k=3, labels=labels))

    prec, rec, f1, support = sk.precision_recall_fscore_support(t, p, labels=labels, zero_division=np.nan)
    for c, row in enumerate(m["per_class"]):
        assert row["support"] == support[c]
        for key, ref in (("precision", prec[c]), ("recall", rec[c]), ("accuracy", rec[c]), ("f1", f1[c])):
            if np.isnan(ref):
                assert row[key] is None, (c, key)
            else:
                assert row[key] == pytest.approx(ref), (c, key)
    assert m["per_class"][4]["accuracy"] is None  # absent from targets
    assert m["per_class"][5]["precision"] is None  # never predicted
    assert m["per_class"][5]["recall"] == 0.0
    assert m["per_class"][4]["f1"] == 0.0 or m["per_class"][4]["predicted"] == 0

    ref_pct = sk.confusion_matrix(t, p, labels=labels, normalize="true") * 100
    np.testing.assert_allclose(np.array(m["confusion_percent"]), np.nan_to_num(ref_pct), atol=1e-3)


def test_summarize_keys_and_values_by_hand():
    cm = confusion_matrix([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 2], 4)
    s = summarize(cm)
    assert set(s) == {"top1", "mean_class_acc", "per_class_acc", "n"}
    assert s["n"] == 6
    assert s["top1"] == pytest.approx(4 / 6)
    assert s["per_class_acc"] == [pytest.approx(0.5), pytest.approx(2 / 3), 1.0, None]
    assert s["mean_class_acc"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)


def test_topk_matches_a_python_loop():
    rng = np.random.default_rng(3)
    probs = rng.random((50, 7))
    t = rng.integers(0, 7, 50)
    expected = np.mean([t[i] in sorted(range(7), key=lambda c: -probs[i, c])[:3] for i in range(50)])
    assert topk_accuracy(t, probs, 3) == pytest.approx(expected)
    assert topk_accuracy(t, probs, 7) == 1.0
    assert topk_accuracy(t, None) is None


def test_row_percent_rows_sum_to_100_or_0():
    cm = np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    pct = row_percent(cm)
    np.testing.assert_allclose(pct.sum(1), [100, 0, 100])
    assert pct[0, 0] == pytest.approx(75)


def test_write_eval_report_files(tmp_path):
    from mineralnet.report import write_eval_report

    t, p, probs = _random_case(5, 6)
    classes = ["pyrite", "quartz", "malachite", "biotite", "galena", "calcite"]
    m = write_eval_report(tmp_path / "eval", t, p, probs, classes)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["top1"] == pytest.approx(sk.accuracy_score(t, p))
    assert saved["confusion"] == m["confusion"]
    rows = list(csv.DictReader((tmp_path / "eval" / "per_class.csv").open()))
    assert [r["class"] for r in rows] == classes
    assert rows[4]["accuracy"] == ""  # galena absent from the targets: no accuracy, not 0
    assert int(rows[0]["support"]) == int((t == 0).sum())
    png = (tmp_path / "eval" / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_table(m)
    assert "mean class acc (paper's mAP)" in text and "pyrite" in text


def test_abbreviations_are_unique_and_use_mineral_symbols():
    names = ["pyrite", "quartz", "biotite_and_phlogopite", "turquoise", "tourmaline", "unobtainium",
             "unobtainite", "Quartz"]
    ab = abbreviate(names)
    assert ab[:5] == ["Py", "Qz", "Bt&Phl", "Tqu", "Tur"]
    assert len(set(ab)) == len(ab)
    assert ab[5].lower().startswith("unobtaini") and ab[6].lower().startswith("unobtaini")
