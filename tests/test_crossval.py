"""`mineralnet cv`: grid x folds, identical folds for every variant, resume, results tables, bad input."""
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mineralnet.analysis import crossval, cvreport
from mineralnet import data as mdata
from mineralnet import train
from mineralnet.cli import main as cli_main
from mineralnet.config import load_config
from mineralnet.errors import MineralNetError
from mineralnet.runs import RunDir, read_split

TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1",
        "--optimizer", "sgd", "--lr", "0.05", "--scheduler", "none", "--precision", "fp32",
        "--normalize", "imagenet", "--seed", "3"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(mdata.make_demo_dataset(tmp_path_factory.mktemp("demo"), classes=3, per_class=9, size=40, seed=2))


def _split_val(run_dir, base):
    """The run's validation photos, relative to `base`, sorted (as folds.json lists them)."""
    return sorted(os.path.relpath(p, base) for p, _ in read_split(run_dir)["splits"]["val"])


def _fake_fit(calls):
    """Stands in for train.fit: the REAL data split of training (prepare_data writes split.json), then
    predictions that depend on the variant and fold, written through the real eval report."""
    from mineralnet.report import write_eval_report
    from mineralnet.files import atomic_write_json

    def fit(cfg):
        calls.append(cfg)
        run_dir = Path(cfg.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        split = train.prepare_data(cfg, RunDir(run_dir))
        targets = np.array([label for _, label in split.val])
        rng = np.random.default_rng(cfg.fold * 100 + (7 if cfg.loss == "ce" else 0) + int(cfg.lr * 1000))
        preds = np.where(rng.random(len(targets)) < 0.6, targets, rng.integers(0, 3, len(targets)))
        m = write_eval_report(run_dir / "eval", targets, preds, None, split.classes)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": m["top1"],
                                                           "val_mean_class_acc": m["mean_class_acc"]}) + "\n")
        atomic_write_json(run_dir / "result.json", {"run_dir": str(run_dir), "status": "finished",
                                                    "train_seconds": 1.0, "best": {"top1": m["top1"], "epoch": 1}})
        return {"run_dir": str(run_dir), "best": {"top1": m["top1"], "epoch": 1}}
    return fit


def test_cv_grid_same_folds_table_and_resume(tiny_data, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(train, "fit", _fake_fit(calls))
    out = tmp_path / "cv"
    argv = ["cv", "--data", tiny_data, "--out", str(out), "--folds", "3", *TINY,
            "--grid", "loss=ce", "wtopk", "--grid", "lr=0.05", "0.01"]
    assert cli_main(argv) == 0
    assert len(calls) == 12  # 2 x 2 variants x 3 folds
    assert {(c.loss, c.lr) for c in calls} == {("ce", 0.05), ("ce", 0.01), ("wtopk", 0.05), ("wtopk", 0.01)}
    assert sorted({c.fold for c in calls}) == [0, 1, 2] and {c.folds for c in calls} == {3}

    # identical folds: every variant's run validated on exactly the photos of folds.json
    folds = json.loads((out / "folds.json").read_text())
    assert sorted(sum(folds["val"], [])) == sorted(set(sum(folds["val"], [])))  # disjoint
    assert len(sum(folds["val"], [])) == 27
    variants = json.loads((out / "results.json").read_text())["variants"]
    for fold in range(3):
        vals = [_split_val(out / v["slug"] / f"fold{fold}", tiny_data) for v in variants]
        assert all(v == sorted(folds["val"][fold]) for v in vals)

    # the table: 4 variant rows with mean ± std equal to the per-fold numbers
    md = (out / "results.md").read_text()
    table = md.split("| Variant | Top1 (%)")[1].split("\n\n")[0]
    rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
    assert len(rows) == 4 and "(baseline)" in rows[0] and "loss=ce lr=0.05" in rows[0]
    for v, row in zip(variants, rows):
        top1 = [f["top1"] for f in v["folds"]]
        assert len(top1) == 3
        m = re.search(r"\| ([\d.]+) ± ([\d.]+) \|", row)
        assert float(m.group(1)) == pytest.approx(100 * np.mean(top1), abs=0.006)
        assert float(m.group(2)) == pytest.approx(100 * np.std(top1, ddof=1), abs=0.006)

    # a second call re-runs nothing and gives the same results
    calls.clear()
    capsys.readouterr()
    assert cli_main(argv) == 0
    assert calls == []
    assert "not re-run" in capsys.readouterr().out
    assert (out / "results.md").read_text().split("Command:")[0] == md.split("Command:")[0]


def test_cv_resumes_an_unfinished_fold_and_skips_finished_ones(tiny_data, tmp_path, monkeypatch):
    calls = []
    fake = _fake_fit(calls)
    monkeypatch.setattr(train, "fit", fake)
    out = tmp_path / "cv"
    base = dict(data=tiny_data, out=str(out), backbone="resnet18", image_size=32, batch_size=4, workers=0,
                normalize="imagenet", epochs=1)
    crossval.cross_validate(base, folds=3)
    # fold 1 died after a checkpoint: no result.json but a state/ folder -> resumed, others untouched
    (out / "base" / "fold1" / "result.json").unlink()
    (out / "base" / "fold1" / "state").mkdir()
    calls.clear()
    crossval.cross_validate(base, folds=3)
    assert [(c.fold, c.resume) for c in calls] == [(1, str(out / "base" / "fold1"))]


def test_cv_changed_photos_are_refused(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "fit", _fake_fit([]))
    out = tmp_path / "cv"
    base = dict(data=tiny_data, out=str(out), backbone="resnet18", image_size=32, batch_size=4, workers=0,
                normalize="imagenet")
    crossval.cross_validate(base, folds=3, only_folds=[0])
    with pytest.raises(MineralNetError, match="other folds"):
        crossval.cross_validate({**base, "seed": 5}, folds=3, only_folds=[0])


def test_cv_launcher_hands_folds_to_a_subprocess(tiny_data, tmp_path):
    """--launcher CMD runs `CMD launch/train.py --config FOLD.yaml`; the YAML is the fold's full config."""
    fake = tmp_path / "fake_launcher.py"  # stands in for `accelerate launch`: records what it was given
    fake.write_text(textwrap.dedent("""
        import json, shutil, sys
        from pathlib import Path
        import yaml
        assert sys.argv[1].endswith("train.py") and sys.argv[2] == "--config", sys.argv
        run = Path(yaml.safe_load(open(sys.argv[3]))["out"]); run.mkdir(parents=True)
        shutil.copy(sys.argv[3], run / "given.yaml")
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(json.dumps({"top1": 0.5, "mean_class_acc": 0.4}))
        (run / "result.json").write_text(json.dumps({"status": "finished", "best": {"epoch": 1}}))
    """))
    out = tmp_path / "cv"
    argv = ["cv", "--data", tiny_data, "--out", str(out), "--folds", "3", "--only-folds", "0,2", *TINY,
            "--grid", "loss=ce", "wtopk", "--launcher", f"{sys.executable} {fake}"]
    assert cli_main(argv) == 0
    for slug, loss in (("loss-ce", "ce"), ("loss-wtopk", "wtopk")):
        for fold in (0, 2):
            cfg = load_config(out / slug / f"fold{fold}" / "given.yaml")  # the full config of that fold
            assert (cfg.fold, cfg.folds, cfg.loss, cfg.image_size, cfg.data) == (fold, 3, loss, 32, tiny_data)
            assert cfg.out == str(out / slug / f"fold{fold}")
    assert not (out / "loss-ce" / "fold1").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["variants"][0]["top1_mean"] == 0.5 and res["variants"][1]["folds_done"] == [0, 2]


def test_paired_test_matches_scipy_and_marks_noise():
    from scipy import stats

    a = [0.80, 0.82, 0.78, 0.81, 0.79]
    b = [0.83, 0.86, 0.80, 0.85, 0.82]
    t = cvreport.paired_test(a, b)
    assert t["p"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert t["mean_diff"] == pytest.approx(np.mean(np.subtract(b, a)))
    assert not t["within_noise"] and t["wins"] == 5
    noisy = cvreport.paired_test(a, [0.81, 0.80, 0.80, 0.80, 0.80])
    assert noisy["within_noise"] and noisy["p"] > 0.05


def test_real_training_folds(tiny_data, tmp_path):
    """The real fit() behind cv: 2 variants on fold 0 of 3 validate on the same photos."""
    out = tmp_path / "cv"
    assert cli_main(["cv", "--data", tiny_data, "--out", str(out), "--folds", "3", "--only-folds", "0", *TINY,
                     "--grid", "stages=4", "2,4"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in res["variants"]] == ["stages=4", "stages=2,4"]
    splits = [_split_val(out / v["slug"] / "fold0", tiny_data) for v in res["variants"]]
    assert splits[0] == splits[1] == json.loads((out / "folds.json").read_text())["val"][0]
    for v in res["variants"]:
        metrics = json.loads((out / v["slug"] / "fold0" / "eval" / "metrics.json").read_text())
        assert v["folds"][0]["top1"] == metrics["top1"] and metrics["n"] == 9


@pytest.mark.parametrize("extra, message", [
    (["--folds", "1"], "--folds 1 must be at least 2"),
    (["--folds", "3", "--grid", "colour=red", "blue"], "--grid field 'colour' is not a training setting"),
    (["--folds", "3", "--grid", "lr=fast", "0.1"], "grid cell 'lr=fast': lr='fast' is not a valid float"),
    (["--folds", "3", "--grid", "stages=2,9"], "grid cell 'stages=2,9'"),
    (["--folds", "3", "--grid", "split_seed=1", "2"], "--grid split_seed=... is not allowed"),
    (["--folds", "3", "--grid", "loss"], "must look like FIELD=V1 V2"),
    (["--folds", "3", "--fold", "1"], "--fold is chosen by cv"),
    (["--folds", "30"], "30 folds are more than the 27 photos"),  # 9-photo classes and 20 folds are fine
])
def test_cv_bad_input_is_one_line(tiny_data, tmp_path, capsys, extra, message):
    rc = cli_main(["cv", "--data", tiny_data, "--out", str(tmp_path / "cv"), *TINY, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("mineralnet: error:"), err
    assert message in err


def test_explicit_variants_and_changed_settings(tiny_data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "fit", _fake_fit(calls))
    out = tmp_path / "cv"
    argv = ["cv", "--data", tiny_data, "--out", str(out), "--folds", "3", "--only-folds", "1", *TINY,
            "--variant", "stages=4 loss=ce", "--variant", "stages=2,4 loss=wtopk"]
    assert cli_main(argv) == 0
    assert [(c.stages, c.loss, c.fold) for c in calls] == [((4,), "ce", 1), ((2, 4), "wtopk", 1)]
    res = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in res["variants"]] == ["stages=4 loss=ce", "stages=2,4 loss=wtopk"]
    # the fake fit writes no config.yaml; give one fold the settings of another epoch count
    (out / "stages-4_loss-ce" / "fold1" / "config.yaml").write_text("epochs: 7\nloss: ce\n")
    with pytest.raises(MineralNetError, match=r"other settings \(epochs: 7 -> 1\)"):
        crossval.cross_validate(dict(data=tiny_data, out=str(out), backbone="resnet18", image_size=32,
                                     batch_size=4, workers=0, epochs=1, lr=0.05, scheduler="none",
                                     precision="fp32", normalize="imagenet", seed=3, optimizer="sgd"),
                                variants=crossval.parse_variants(["stages=4 loss=ce"]), folds=3, only_folds=[1])


@pytest.mark.parametrize("spec, message", [
    (["stages=4 stages=2"], "sets stages twice"),
    (["stages"], "must be FIELD=VALUE pairs"),
    (["stages=4", "stages=4"], "given twice"),
    (["colour=red"], "'colour' is not a training setting"),
])
def test_bad_variants(spec, message):
    with pytest.raises(MineralNetError, match=message):
        crossval.parse_variants(spec)


def test_grid_over_seed_keeps_one_set_of_folds(tiny_data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "fit", _fake_fit(calls))
    out = tmp_path / "cv"
    assert cli_main(["cv", "--data", tiny_data, "--out", str(out), "--folds", "3", "--only-folds", "0", *TINY,
                     "--grid", "seed=1", "2"]) == 0
    assert sorted(c.seed for c in calls) == [1, 2]
    assert {c.split_seed for c in calls} == {3}  # TINY's --seed 3: the folds of folds.json
    assert json.loads((out / "folds.json").read_text())["seed"] == 3


def test_a_fold_that_died_before_its_first_checkpoint_is_cleared_but_a_presets_members_are_kept(tmp_path):
    run = tmp_path / "fold0"
    for d in (run / "members" / "m0", run / "ensemble", run / "eval"):
        d.mkdir(parents=True)
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "members" / "m0" / "result.json").write_text("{}")
    assert crossval._prepare_fold_dir(run, keep=("members", "ensemble")) is False
    assert sorted(p.name for p in run.iterdir()) == ["ensemble", "members"]
    assert (run / "members" / "m0" / "result.json").is_file()
    assert crossval._prepare_fold_dir(run) is False and not run.exists()
