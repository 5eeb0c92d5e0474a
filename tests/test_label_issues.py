"""`mineralnet data issues`: planted label errors are found from held-out predictions; bad input is one line."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mineralnet import data as mdata
from mineralnet.analysis import label_issues as li
from mineralnet.cli import main as cli_main
from mineralnet.errors import MineralNetError

TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1",
        "--optimizer", "sgd", "--lr", "0.05", "--scheduler", "none", "--precision", "fp32",
        "--normalize", "imagenet", "--seed", "3"]


def _noisy_probs(n=1400, classes=7, flip=0.03, seed=0):
    """Held-out probabilities of a good model (true class gets most mass) and labels with `flip` planted errors."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), truth] += rng.uniform(4, 7, n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = truth.copy()
    planted = rng.choice(n, int(flip * n), replace=False)
    labels[planted] = (truth[planted] + rng.integers(1, classes, len(planted))) % classes
    return labels, probs, set(planted.tolist())


def test_planted_errors_are_found_and_ranked_by_self_confidence():
    labels, probs, planted = _noisy_probs()
    ranked, quality = li.find_issues(labels, probs)
    found = set(ranked.tolist())
    precision, recall = len(found & planted) / len(found), len(found & planted) / len(planted)
    # cleanlab is conservative: a flipped photo counts only when the model's probability of the other class
    # reaches that class's average self-confidence (~0.95 here); flips the model answers at 0.8 are missed
    assert precision >= 0.95 and recall >= 0.75, (precision, recall)
    # self-confidence, computed independently: the held-out probability of the given label
    np.testing.assert_allclose(quality, probs[np.arange(len(labels)), labels], rtol=1e-6)
    assert np.all(np.diff(quality[ranked]) >= -1e-12)  # most likely wrong (least confident) first
    # a suspect is never a photo whose given label is also the model's answer
    assert np.all(probs[ranked].argmax(1) != labels[ranked])


def test_clean_labels_give_few_suspects():
    labels, probs, _ = _noisy_probs(flip=0.0, seed=1)
    ranked, _ = li.find_issues(labels, probs)
    assert len(ranked) <= 0.01 * len(labels)


def test_a_class_without_predictions_is_one_line():
    labels, probs, _ = _noisy_probs(n=200, classes=4)
    labels[labels == 3] = 0
    with pytest.raises(MineralNetError, match=r"class index\(es\) \[3\] have no photo"):
        li.find_issues(labels, probs)


@pytest.fixture(scope="module")
def tiny_cv(tmp_path_factory):
    """A 3-fold cv over a tiny demo set with one photo moved to a wrong class folder."""
    root = Path(tmp_path_factory.mktemp("issues"))
    data = Path(mdata.make_demo_dataset(root / "demo", classes=3, per_class=9, size=40, seed=2))
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    moved = sorted((data / classes[0]).iterdir())[0]
    target = data / classes[1] / ("moved-" + moved.name)
    shutil.move(moved, target)
    out = root / "cv"
    assert cli_main(["cv", "--data", str(data), "--out", str(out), "--folds", "3", *TINY]) == 0
    return out, target


@pytest.mark.slow
def test_cli_on_a_cv_folder_writes_csv_gallery_and_summary(tiny_cv, capsys):
    cv, moved = tiny_cv
    assert cli_main(["data", "issues", str(cv), "--top", "4"]) == 0
    out = capsys.readouterr().out
    assert "look mislabelled, from 3 fold run(s)" in out
    summary = json.loads((cv / li.JSON_NAME).read_text())
    assert summary["photos"] == 27 and len(summary["fold_runs"]) == 3  # every photo predicted once, held out
    rows = list(csv.DictReader(open(cv / li.CSV_NAME)))
    assert len(rows) == summary["suspects"]
    assert all(r["given"] != r["suggested"] for r in rows)
    if rows:
        assert (cv / li.PNG_NAME).stat().st_size > 1000


@pytest.mark.slow
def test_runs_that_are_not_folds_of_one_cv_are_refused(tiny_cv, capsys):
    cv, _ = tiny_cv
    run = next(cv.glob("*/fold0"))
    assert cli_main(["data", "issues", str(run), str(run), "--out", str(cv / "x")]) == 2
    assert "is a validation photo of both" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "'nowhere' does not exist"),
    (["."], "is neither a cv folder"),
])
def test_bad_sources_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["data", "issues", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_variant_lists_the_variants(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"variants": [{"name": "baseline", "slug": "baseline",
                                                                     "folds": []}]}))
    assert cli_main(["data", "issues", str(tmp_path), "--variant", "nope"]) == 2
    assert "--variant 'nope' is not in" in capsys.readouterr().err
