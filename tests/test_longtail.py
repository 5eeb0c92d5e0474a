"""Long-tailed collections: rare classes in cv folds, per-class pooling, --drop-rare, near-duplicate photos
(perceptual hash, grouping before splits, `data check --duplicates`)."""
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mineralnet import train
from mineralnet.analysis import crossval, cvfolds
from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.config import load_config
from mineralnet.errors import MineralNetError
from mineralnet.files import atomic_write_json
from mineralnet.runs import RunDir

TINY = {"backbone": "resnet18", "image_size": 32, "batch_size": 2, "workers": 0, "epochs": 1, "optimizer": "sgd",
        "scheduler": "none", "precision": "fp32", "normalize": "imagenet"}


# ----------------------------------------------------------------------------- folds with rare classes
def test_folds_with_classes_smaller_than_k():
    labels = [0] * 23 + [1] * 4 + [2] * 2 + [3] * 11
    folds = mdata.stratified_kfold(labels, 5, seed=3)
    assert sorted(i for f in folds for i in f) == list(range(len(labels)))  # each photo in exactly one fold
    for c, n in Counter(labels).items():
        per_fold = [sum(labels[i] == c for i in f) for f in folds]
        if n < 5:
            assert sorted(per_fold) == [0] * (5 - n) + [1] * n  # validated in n folds, once each
        else:
            assert max(per_fold) - min(per_fold) <= 1  # stratified
    assert mdata.small_classes(labels, 5) == {1: 4, 2: 2}


def test_grouped_folds_keep_groups_together_and_equal_the_plain_folds_without_groups():
    rng = np.random.default_rng(0)
    labels = list(rng.integers(0, 4, 60))
    assert mdata.stratified_kfold(labels, 5, 1, groups=list(range(60))) == mdata.stratified_kfold(labels, 5, 1)
    assert mdata.stratified_split(labels, 0.2, 1, groups=list(range(60))) == mdata.stratified_split(labels, 0.2, 1)
    groups = list(range(60))
    for a, b in ((3, 17), (17, 40), (5, 6), (8, 59)):  # 3-17-40 one group, across classes too
        groups = [groups[a] if g == groups[b] else g for g in groups]
    for seed in range(5):
        folds = mdata.stratified_kfold(labels, 5, seed, groups=groups)
        where = {i: k for k, f in enumerate(folds) for i in f}
        assert len(where) == 60
        assert where[3] == where[17] == where[40] and where[5] == where[6] and where[8] == where[59]
        tr, va = mdata.stratified_split(labels, 0.3, seed, groups=groups)
        assert sorted(tr + va) == list(range(60))
        for a, b in ((3, 17), (17, 40), (5, 6), (8, 59)):
            assert (a in va) == (b in va)


def test_pool_per_class_equals_an_independent_computation():
    classes = ["a", "b", "c"]
    folds = [{"a": [3, 4], "b": [1, 1], "c": [0, 0]}, {"a": [2, 4], "b": [0, 0], "c": [1, 2]},
             {"a": [4, 4], "b": [0, 1], "c": [0, 0]}]
    rows = {r["class"]: r for r in cvfolds.pool_per_class(folds, classes)}
    assert rows["a"]["folds"] == 3 and rows["a"]["accuracy"] == pytest.approx(9 / 12)
    assert rows["b"]["folds"] == 2 and rows["b"]["accuracy"] == pytest.approx(1 / 2)
    assert rows["b"]["mean_fold_accuracy"] == pytest.approx((1 + 0) / 2)
    assert rows["c"]["folds"] == 1 and rows["c"]["photos"] == 2 and rows["c"]["accuracy"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- cv end to end (fake training)
def _fake_fit(cfg):
    """train.fit's stand-in: the real split, then predictions right for even-numbered photos."""
    from mineralnet.report import write_eval_report

    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    split = train.prepare_data(cfg, RunDir(run_dir))
    targets = np.array([y for _, y in split.val])
    right = np.array([int(Path(p).stem.split("_")[-1]) % 2 == 0 for p, _ in split.val])
    preds = np.where(right, targets, (targets + 1) % len(split.classes))
    m = write_eval_report(run_dir / "eval", targets, preds, None, split.classes)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": m["top1"],
                                                       "val_mean_class_acc": m["mean_class_acc"]}) + "\n")
    atomic_write_json(run_dir / "result.json", {"status": "finished", "best": {"top1": m["top1"], "epoch": 1}})
    return {}


@pytest.fixture()
def rare_data(tmp_path):
    root = mdata.make_demo_dataset(tmp_path / "demo", classes=3, per_class=10, size=40, seed=5)
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    for i, p in enumerate(sorted((root / names[1]).iterdir())):
        if i >= 4:
            p.unlink()  # a 4-photo class
    single = root / "zz_single"
    single.mkdir()
    shutil.copy(sorted((root / names[0]).iterdir())[0], single / "only.png")
    return root, names


def test_cv_five_folds_with_a_four_photo_class_pools_per_class(rare_data, tmp_path, monkeypatch, capsys):
    root, names = rare_data
    monkeypatch.setattr(train, "fit", _fake_fit)
    with pytest.raises(MineralNetError, match="'zz_single' has only 1 photo.*--drop-rare 2"):
        crossval.cross_validate({**TINY, "data": str(root), "out": str(tmp_path / "cv0")}, folds=5)
    summary = crossval.cross_validate({**TINY, "data": str(root), "out": str(tmp_path / "cv")}, folds=5, drop_rare=2)
    out = capsys.readouterr().out
    assert out.count("left out 1 class(es)") == 1 and "zz_single (1)" in out
    assert out.count(f"validated in only that many folds: {names[1]} (4)") == 1
    assert summary["classes"] == names and summary["dropped_classes"] == {"zz_single": 1}
    v = summary["variants"][0]
    per = {r["class"]: r for r in v["per_class"]}
    assert per[names[1]]["folds"] == 4 and per[names[0]]["folds"] == 5 and per[names[1]]["photos"] == 4
    # independent pooling from the fold runs' per_class.csv files
    for c in names:
        correct = support = 0
        for k in range(5):
            for line in (tmp_path / "cv" / "base" / f"fold{k}" / "eval" / "per_class.csv").read_text().splitlines()[1:]:
                cells = line.split(",")
                if cells[0] == c:
                    correct, support = correct + int(cells[2]), support + int(cells[1])
        assert per[c]["accuracy"] == pytest.approx(correct / support)
    # per-fold mean class accuracy is over the classes present in that fold
    for f in v["folds"]:
        rows = json.loads(Path(f["run_dir"], "eval", "metrics.json").read_text())["per_class"]
        present = [r["accuracy"] for r in rows if r["support"]]
        assert f["mean_class_acc"] == pytest.approx(np.mean(present))
    md = (tmp_path / "cv" / "results.md").read_text()
    assert f"| {names[1]} | 4 | 4 |" in md


# ----------------------------------------------------------------------------- near-duplicates
def _copy_60_70_crop5(src: Path, dst: Path) -> None:
    """Saved again at JPEG quality 60, resized to 70%, cropped by 5% (2.5% off every side)."""
    img = Image.open(src).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    img = Image.open(buf).convert("RGB")
    img = img.resize((round(img.width * 0.7), round(img.height * 0.7)), Image.BILINEAR)
    dx, dy = round(img.width * 0.025), round(img.height * 0.025)
    img.crop((dx, dy, img.width - dx, img.height - dy)).save(dst, "JPEG", quality=90)


@pytest.fixture()
def planted(tmp_path):
    root = mdata.make_demo_dataset(tmp_path / "demo", classes=3, per_class=12, size=128, seed=1)
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    src = sorted((root / names[0]).iterdir())[3]
    _copy_60_70_crop5(src, root / names[0] / "zz_copy.jpg")  # within a class
    _copy_60_70_crop5(sorted((root / names[2]).iterdir())[5], root / names[1] / "zz_mislabelled.jpg")
    return root, names, src


def test_hash_finds_the_copy_and_does_not_pair_different_photos_of_one_mineral(planted):
    root, names, src = planted
    index = mdata.scan_dataset(root)
    pairs = mdata.near_duplicate_pairs(mdata.hash_photos([p for p, _ in index.samples]))
    named = {(Path(index.samples[i][0]).name, Path(index.samples[j][0]).name) for i, j, _ in pairs}
    assert (src.name, "zz_copy.jpg") in named
    assert len(pairs) == 2, pairs  # the two planted copies and nothing else (36 different photos, 3 minerals)
    a, b = (mdata.photo_hash(mdata.load_image(p)) for p in sorted((root / names[0]).iterdir())[:2])
    assert (a != b).sum() > mdata.DEFAULT_MAX_DISTANCE  # two photos of one mineral
    # distance = Hamming distance of the 128 bits, computed here bit by bit
    h = mdata.hash_photos([p for p, _ in index.samples])
    for i, j, d in pairs:
        assert d == sum(int(x) != int(y) for x, y in zip(h[i], h[j]))


def test_splits_never_separate_a_planted_pair(planted, tmp_path, capsys):
    root, names, src = planted
    copy = str(root / names[0] / "zz_copy.jpg")
    for seed in range(4):
        for folds, fold in ((0, 0), (4, seed)):
            run = tmp_path / f"r{seed}{folds}"
            run.mkdir()
            cfg = load_config(None, **TINY, data=str(root), seed=seed, folds=folds, fold=fold, out=str(run))
            split = train.prepare_data(cfg, RunDir(run))
            val = {p for p, _ in split.val}
            assert (str(src) in val) == (copy in val)
    assert "2 group(s) of near-duplicate photos kept on one side" in capsys.readouterr().out
    (tmp_path / "off").mkdir()
    cfg = load_config(None, **TINY, data=str(root), seed=0, group_duplicates=False, out=str(tmp_path / "off"))
    assert train.prepare_data(cfg, RunDir(tmp_path / "off")).split_info["duplicate_groups_merged"] == 0


def test_data_check_duplicates_reports_within_across_and_across_a_split(planted, tmp_path, capsys):
    root, names, src = planted
    assert cli_main(["data", "check", str(root), "--duplicates"]) == 0
    out = capsys.readouterr().out
    assert "2 pair(s), 1 within a class, 1 across classes (probable label errors)" in out
    assert "zz_mislabelled.jpg" in out and f"[{names[1]}]" in out
    # a split that separates the pair is reported (exit 1); cv folds never do
    run = tmp_path / "run"
    run.mkdir()
    index = mdata.scan_dataset(root)
    i = next(k for k, (p, _) in enumerate(index.samples) if p == str(src))
    mdata.save_splits(run / "split.json", index, {"train": [k for k in range(len(index.samples)) if k != i],
                                                  "val": [i]})
    assert cli_main(["data", "check", str(root), "--duplicates", "--split", str(run)]) == 1
    assert "the run's split: 1 near-duplicate pair(s) with one photo in validation" in capsys.readouterr().out
    cv = tmp_path / "cv"
    cv.mkdir()
    cvfolds.load_or_save_folds(cv, index, 4, 0)
    assert cli_main(["data", "check", str(root), "--duplicates", "--split", str(cv)]) == 0
    assert "fold 3: 0 near-duplicate pair(s)" in capsys.readouterr().out
    assert cli_main(["data", "check", str(root), "--split", str(cv)]) == 2
    assert "add --duplicates" in capsys.readouterr().err
