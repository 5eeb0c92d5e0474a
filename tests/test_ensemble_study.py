"""studies/ensemble_cv.py pools folds run apart: the merged table and paired tests equal those computed over the
concatenated per-photo answers (an independent exact McNemar from math.comb, means by hand)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest



@pytest.fixture(scope="module")
def study(load_study):
    return load_study("ensemble_cv")


MODELS = ["baseline", "m0", "m1", "m2", "ensemble", "ensemble_plain", "student"]


def fake_fold(rng, fold, n, classes=4):
    """Per-photo predictions of every model on one fold, each model right with its own probability."""
    t = rng.integers(0, classes, n)
    t[:classes] = np.arange(classes)  # every class present
    acc = dict(zip(MODELS, [0.7, 0.68, 0.66, 0.72, 0.78, 0.78, 0.8]))
    preds = {m: np.where(rng.random(n) < a, t, (t + rng.integers(1, classes, n)) % classes) for m, a in acc.items()}
    return t, preds


def record(study, fold, t, preds):
    """What fold_records() writes for one fold, built here without run folders."""
    oof = {"targets": t, "fold": np.zeros(len(t), int), "preds": preds,
           "photos": [f"/data/c/{i}.jpg" for i in range(len(t))]}
    rows = {m: {"folds": [{"fold": fold, "train_seconds": 60.0 * (i + 1)}]} for i, m in enumerate(MODELS)
            if m != "ensemble_plain"}
    run = Path(f"/x/fold{fold}")
    return study.fold_records(oof, rows, [run], "/data", {m: {} for m in MODELS})[0]


def exact_mcnemar(b, c):
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_merged_folds_equal_the_pooled_photos(study, tmp_path):
    rng = np.random.default_rng(0)
    folds = [fake_fold(rng, k, n) for k, n in [(0, 97), (1, 103), (2, 88)]]
    paths = []
    for k, (t, preds) in enumerate(folds):
        rec = record(study, k, t, preds)
        table, comparisons = study.summarize([rec])
        p = tmp_path / f"f{k}.json"
        p.write_text(json.dumps({"data": "d", "folds": 4, "config": "c", "folds_run": [k], "photos": len(t),
                                 "table": table, "comparisons": comparisons, "per_fold": [rec]}))
        paths.append(str(p))
    assert study.main(["--work", str(tmp_path / "m"), "--merge", *paths]) == 0
    out = json.loads((tmp_path / "m" / "result.json").read_text())

    t = np.concatenate([f[0] for f in folds])
    right = {m: np.concatenate([f[1][m] == f[0] for f in folds]) for m in MODELS}
    assert out["photos"] == len(t) == 288 and out["folds_run"] == [0, 1, 2]
    rows = {r["model"]: r for r in out["table"]}
    for m in MODELS:
        assert rows[m]["top1_pooled"] == pytest.approx(right[m].mean())
        per_fold_mc = [np.mean([(f[1][m][f[0] == c] == c).mean() for c in range(4)]) for f in folds]
        assert rows[m]["mean_class_acc_mean"] == pytest.approx(np.mean(per_fold_mc))
        pooled_mc = np.mean([right[m][t == c].mean() for c in range(4)])
        assert rows[m]["mean_class_acc_pooled"] == pytest.approx(pooled_mc)
    assert rows["student"]["train_minutes_per_fold"] == pytest.approx(7.0)  # 7th in MODELS: 7 x 60 s
    assert rows["ensemble_plain"]["train_minutes_per_fold"] is None
    for a, b in [("baseline", "student"), ("m0", "ensemble"), ("student", "ensemble")]:
        c = out["comparisons"][f"{b} vs {a}"]
        b_only, a_only = int((right[b] & ~right[a]).sum()), int((right[a] & ~right[b]).sum())
        assert (c["photos"]["b_only_right"], c["photos"]["a_only_right"]) == (b_only, a_only)
        assert c["photos"]["p"] == pytest.approx(exact_mcnemar(b_only, a_only))
        assert c["photos"]["diff_points"] == pytest.approx(100 * (right[b].mean() - right[a].mean()))
        assert c["folds_top1"]["n"] == 3


def test_merge_reads_a_one_fold_result_without_records_and_refuses_mixed_studies(study, tmp_path):
    rng = np.random.default_rng(1)
    t, preds = fake_fold(rng, 0, 120)
    rec = record(study, 0, t, preds)
    table, comparisons = study.summarize([rec])
    legacy = {"data": "d", "folds": 4, "config": "c", "folds_run": [0], "photos": 120, "table": table,
              "comparisons": comparisons}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    [old] = study.merge([str(tmp_path / "old.json")])["records"]
    t2, c2 = study.summarize([old])
    for a, b in zip(table, t2):
        assert a["top1_pooled"] == pytest.approx(b["top1_pooled"])
        assert a["mean_class_acc_mean"] == pytest.approx(b["mean_class_acc_mean"])
    assert {k: v["photos"] for k, v in c2.items()} == {k: v["photos"] for k, v in comparisons.items()}

    (tmp_path / "other.json").write_text(json.dumps({**legacy, "config": "other"}))
    with pytest.raises(SystemExit, match="config"):
        study.merge([str(tmp_path / "old.json"), str(tmp_path / "other.json")])
    with pytest.raises(SystemExit, match="fold 0 is in both"):
        study.merge([str(tmp_path / "old.json"), str(tmp_path / "old.json")])
