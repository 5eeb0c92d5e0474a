"""The ensemble preset (`train --config cpu-ensemble`, issue 30): members on the student's split, their calibrated
ensemble, the distilled student as a normal run, a resume that skips finished members, and one-line refusals.
End to end with tiny members from a YAML preset of the same format (a few seconds each)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors import safe_open

from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.config import load_config, member_configs
from mineralnet.ensemble.preset import check_same_split
from mineralnet.errors import MineralNetError
from mineralnet.infer import Predictor
from mineralnet.runs import RunDir, read_split

TINY_PRESET = {"backbone": "resnet18", "stages": [2, 4], "pretrained": "false", "image_size": 32, "epochs": 1,
               "batch_size": 8, "workers": 0, "precision": "fp32", "val_split": 0.3, "loss": "ce", "seed": 5,
               "kd_weight": 0.5, "kd_temperature": 2.0,
               "members": [{"seed": 0}, {"seed": 1, "image_size": 40}]}


def test_the_cpu_ensemble_preset_loads_and_its_members_share_the_students_split_seed():
    cfg = load_config("cpu-ensemble", seed=7)
    members = member_configs(cfg)
    assert [(m.backbone, m.image_size, m.seed) for m in members] == [
        ("tf_efficientnet_lite0", 224, 0), ("tf_efficientnet_lite0", 192, 1), ("tf_efficientnet_lite1", 240, 2)]
    assert {m.split_seed for m in members} == {7} and all(m.members is None and m.teacher is None for m in members)
    assert cfg.backbone == "tf_efficientnet_lite0" and cfg.kd_weight == 0.7


@pytest.mark.parametrize("members, needle", [
    ([{"seed": 0}, {"val_split": 0.2}], "members[1] sets val_split"),
    ([{"seed": 0}, {"sed": 1}], "members[1] has unknown field(s) sed"),
    ([{"seed": 0}, {"lr": -1}], "members[1]: --lr -1.0 must be positive"),
    ([{"seed": 0}], "at least 2 mappings"),
])
def test_bad_members_are_one_line(members, needle):
    with pytest.raises(MineralNetError) as e:
        load_config("demo", members=members)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset")
    data = str(mdata.make_demo_dataset(root / "demo", classes=3, per_class=10, size=48, seed=3))
    preset = root / "tiny-ensemble.yaml"
    preset.write_text(yaml.safe_dump(TINY_PRESET))
    run = root / "run"
    assert cli_main(["train", "--config", str(preset), "--data", data, "--out", str(run)]) == 0
    return root, data, run


def test_the_preset_trains_members_ensemble_and_a_distilled_student(preset_run, tmp_path, capsys):
    root, data, run = preset_run
    rd = RunDir(run)
    members = [rd.members_dir / "m0", rd.members_dir / "m1"]
    ens = rd.ensemble_dir
    # the layout: the student is a finished, calibrated run; members and the calibrated ensemble inside it
    assert rd.has_model() and rd.result()["status"] == "finished" and rd.calibration_files[0].is_file()
    for m in members:
        assert RunDir(m).result()["status"] == "finished" and RunDir(m).calibration_files[0].is_file()
    spec = json.loads((ens / "ensemble.json").read_text())
    assert "calibration" in spec and [s["path"] for s in spec["members"]] == ["../members/m0", "../members/m1"]
    # members: their own fields, the student's split seed (5), the same validation photos as the student
    saved = [RunDir(m).saved_config() for m in members]
    assert [(c["seed"], c["image_size"], c["split_seed"]) for c in saved] == [(0, 32, 5), (1, 40, 5)]
    student_val = sorted(p for p, _ in read_split(run)["splits"]["val"])
    for m in members:
        assert sorted(p for p, _ in read_split(m)["splits"]["val"]) == student_val
    # the student's teacher is the ensemble: its cached table is the ensemble's log-probabilities
    assert rd.saved_config()["teacher"] == str(ens.resolve())
    paths = [p for p, _ in read_split(run)["splits"]["train"]]
    with safe_open(str(rd.teacher_file), framework="pt") as f:
        table, meta = f.get_tensor("log_probs").numpy(), f.metadata()
    assert meta["teacher"] == str(ens.resolve()) and meta["source"] == "calibrated probabilities"
    np.testing.assert_allclose(np.exp(table), Predictor(ens).probabilities(paths), atol=1e-5)
    # the student works as any run
    assert cli_main(["eval", str(run), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    assert cli_main(["predict", str(run), paths[0], "--json"]) == 0
    capsys.readouterr()


def test_a_resume_skips_finished_members(preset_run, monkeypatch, capsys):
    root, data, run = preset_run
    rd = RunDir(run)
    m0, m1 = rd.members_dir / "m0", rd.members_dir / "m1"
    (m1 / "result.json").unlink()  # m1 "stopped" after its checkpoint; m0 finished
    weights = (m0 / "model.safetensors").stat().st_mtime_ns
    calls = []
    mfit = sys.modules["mineralnet.train.fit"]  # the module (mineralnet.train.fit is also the function's name)
    real = mfit.fit
    monkeypatch.setattr(mfit, "fit", lambda cfg, **kw: calls.append((cfg.out, cfg.resume)) or real(cfg, **kw))
    assert cli_main(["train", "--resume", str(run)]) == 0
    assert calls == [(str(m1), str(m1)), (str(run), str(run))]  # m0 not trained again, m1 and the student resumed
    assert (m0 / "model.safetensors").stat().st_mtime_ns == weights
    assert "finished earlier" in capsys.readouterr().out
    assert RunDir(m1).result()["status"] == "finished"


def test_members_on_other_splits_and_an_early_resume_are_one_line(preset_run, tmp_path, capsys):
    root, data, run = preset_run
    rd = RunDir(run)
    odd = tmp_path / "odd"
    shutil.copytree(rd.members_dir / "m1", odd)
    split = json.loads((odd / "split.json").read_text())
    split["splits"]["val"], split["splits"]["train"] = split["splits"]["val"][1:], split["splits"]["train"] + \
        split["splits"]["val"][:1]
    (odd / "split.json").write_text(json.dumps(split))
    with pytest.raises(MineralNetError, match="the members must share one split"):
        check_same_split([rd.members_dir / "m0", odd])
    half = tmp_path / "half"
    (half / "members" / "m0").mkdir(parents=True)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(half)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run the same command again without --resume" in err
    assert cli_main(["train", "--config", "cpu-ensemble", "--data", data]) == 2
    assert "needs --out RUN" in capsys.readouterr().err
    assert cli_main(["train", "--config", "cpu-ensemble", "--data", data, "--out", str(tmp_path / "t"), "--teacher",
                     str(rd.members_dir / "m0")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drop --teacher" in err


@pytest.mark.slow
def test_the_preset_under_two_process_ddp(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): every rank trains each member in turn in one
    process group, the main process builds the ensemble, and the student trains with it as teacher."""
    data = str(mdata.make_demo_dataset(tmp_path / "demo", classes=3, per_class=10, size=48, seed=3))
    preset = tmp_path / "tiny-ensemble.yaml"
    preset.write_text(yaml.safe_dump(TINY_PRESET))
    run = tmp_path / "run"
    train = str(Path(__file__).resolve().parents[1] / "launch" / "train.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000), train, "--config", str(preset), "--data", data,
           "--out", str(run)]
    env = dict(os.environ, MINERALNET_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    rd = RunDir(run)
    assert rd.result()["status"] == "finished" and rd.teacher_file.is_file()
    assert all(RunDir(rd.members_dir / m).result()["status"] == "finished" for m in ("m0", "m1"))
    assert "calibration" in json.loads((rd.ensemble_dir / "ensemble.json").read_text())
    assert p.stdout.count("ensemble preset: member 1/2") == 1  # said once, by the main process


def test_cv_runs_the_preset_per_fold_with_rows_for_members_and_ensemble(tmp_path, capsys):
    """`mineralnet cv --config ENSEMBLE_PRESET`: each fold trains members, ensemble and student on the fold's split;
    the student is the variant's row, each member and the ensemble get their own row on the same photos; a second
    call trains nothing and adds no row."""
    data = str(mdata.make_demo_dataset(tmp_path / "demo", classes=3, per_class=8, size=40, seed=4))
    preset = tmp_path / "tiny-ensemble.yaml"
    preset.write_text(yaml.safe_dump({k: v for k, v in TINY_PRESET.items() if k != "val_split"}))
    out = tmp_path / "cv"
    argv = ["cv", "--config", str(preset), "--data", data, "--out", str(out), "--folds", "3", "--only-folds", "1"]
    assert cli_main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["variants"]
    base = rows[0]["name"]
    assert [r["name"] for r in rows] == [base, f"{base} [m0]", f"{base} [m1]", f"{base} [ensemble]"]
    fold_dir = out / rows[0]["slug"] / "fold1"
    want_val = sorted(json.loads((out / "folds.json").read_text())["val"][1])
    for row, path in zip(rows, [fold_dir, fold_dir / "members" / "m0", fold_dir / "members" / "m1",
                                fold_dir / "ensemble"]):
        metrics = json.loads((path / "eval" / "metrics.json").read_text())
        (f,) = row["folds"]
        assert f["fold"] == 1 and f["top1"] == metrics["top1"] and metrics["n"] == len(want_val)
        if path.name != "ensemble":  # members and student validated on exactly the fold's photos
            assert sorted(os.path.relpath(p, data) for p, _ in read_split(path)["splits"]["val"]) == want_val
        if row is not rows[0]:
            assert row["vs_baseline"]["folds"] == [1]
    assert rows[1]["folds"][0]["member"] == {"backbone": "resnet18", "image_size": 32, "seed": 0}
    assert rows[2]["folds"][0]["member"]["image_size"] == 40
    assert rows[3]["folds"][0]["train_seconds"] == pytest.approx(
        rows[1]["folds"][0]["train_seconds"] + rows[2]["folds"][0]["train_seconds"])
    # the student distilled from this fold's ensemble, never from photos of the fold's validation split
    assert RunDir(fold_dir).saved_config()["teacher"] == str((fold_dir / "ensemble").resolve())
    md = (out / "results.md").read_text()
    assert f"| {base} [ensemble] |" in md
    capsys.readouterr()
    assert cli_main(argv) == 0
    assert "training ->" not in capsys.readouterr().out
    assert [r["name"] for r in json.loads((out / "results.json").read_text())["variants"]] == [r["name"] for r in rows]
    # label issues from a member's out-of-fold predictions: the member runs of each fold
    from mineralnet.analysis.label_issues import fold_runs

    assert fold_runs(out, variant=f"{base} [m1]") == [fold_dir / "members" / "m1"]
