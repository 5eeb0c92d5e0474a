"""Distillation (`train --teacher RUN_OR_ENSEMBLE`): the KD loss against a by-hand numpy computation, kd_weight=0
equal to the plain loss, the config's checks, and a tiny demo-preset student trained from a tiny teacher run end to
end (its cached soft labels checked against the teacher's own logits, reused on a second call, eval/export on it),
plus the refusal of a teacher of other classes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.config import load_config
from mineralnet.errors import MineralNetError
from mineralnet.infer import Predictor
from mineralnet.losses import DistillationLoss, build_loss, kd_loss
from mineralnet.runs import RunDir, read_split
from mineralnet.train import teacher as mteacher


def _np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_loss_equals_a_by_hand_kl(t):
    rng = np.random.default_rng(0)
    s, z = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    teacher_log_probs = _np_log_softmax(z)
    pt, ls = np.exp(_np_log_softmax(z / t)), _np_log_softmax(s / t)
    by_hand = t * t * np.mean([sum(pt[i, j] * (np.log(pt[i, j]) - ls[i, j]) for j in range(5)) for i in range(6)])
    got = kd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(teacher_log_probs, dtype=torch.float32), t)
    assert got.item() == pytest.approx(by_hand, rel=1e-5)
    # the teacher's logits give the same as its log-probabilities (softmax is shift-invariant)
    assert kd_loss(torch.tensor(s), torch.tensor(z), t).item() == pytest.approx(by_hand, rel=1e-6)
    # a student equal to the teacher has no soft loss
    assert kd_loss(torch.tensor(z), torch.tensor(teacher_log_probs), t).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_mixes_the_hard_and_soft_losses_and_weight_0_is_the_plain_loss():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 4, requires_grad=True), torch.randint(0, 4, (8,))
    rows = torch.log_softmax(torch.randn(8, 4), 1)
    hard = build_loss("wtopk", k=0.5, alpha=0.2)
    plain = hard(logits, y)
    zero = DistillationLoss(hard, 4.0, 0.0)(logits, y, None, rows)
    assert torch.equal(zero, plain)
    g_plain, = torch.autograd.grad(plain, logits)
    g_zero, = torch.autograd.grad(DistillationLoss(hard, 4.0, 0.0)(logits, y, None, rows), logits)
    assert torch.equal(g_plain, g_zero)
    mixed = DistillationLoss(hard, 2.0, 0.7)(logits, y, None, rows)
    assert mixed.item() == pytest.approx(0.3 * plain.item() + 0.7 * kd_loss(logits, rows, 2.0).item(), rel=1e-6)
    with pytest.raises(MineralNetError, match="teacher"):
        DistillationLoss(hard, 2.0, 0.7)(logits, y)


def test_config_fields_flags_and_checks(tmp_path, capsys):
    cfg = load_config(None)
    assert cfg.teacher is None and cfg.kd_temperature == 4.0 and cfg.kd_weight == 0.7
    for bad, needle in (({"kd_temperature": 0}, "--kd-temperature 0"), ({"kd_weight": 1.5}, "--kd-weight 1.5"),
                        ({"teacher": str(tmp_path / "nope")}, "does not exist"),
                        ({"teacher": str(tmp_path), "mixup": 0.2}, "--mixup/--cutmix")):
        with pytest.raises(MineralNetError, match=needle.replace("/", ".")):
            load_config(None, **bad)
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--teacher" in text and "--kd-temperature" in text and "--kd-weight" in text


# ----------------------------------------------------------------------------- end to end
TINY = ["--config", "demo", "--backbone", "resnet18", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--precision", "fp32", "--split-seed", "0", "--val-split", "0.3", "--image-size", "32"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    data = str(mdata.make_demo_dataset(root / "demo", classes=3, per_class=10, size=48, seed=3))
    run = root / "teacher"
    assert cli_main(["train", "--data", data, "--out", str(run), "--seed", "1", *TINY]) == 0
    return root, data, run


def test_student_trains_from_a_teacher_and_is_a_normal_run(teacher_run, tmp_path, monkeypatch):
    root, data, teacher = teacher_run
    student = tmp_path / "student"
    assert cli_main(["train", "--data", data, "--out", str(student), "--teacher", str(teacher), "--kd-weight",
                     "0.5", "--kd-temperature", "2", *TINY]) == 0
    run = RunDir(student)
    assert run.has_model() and run.teacher_file.is_file() and run.saved_config()["teacher"] == str(teacher)
    # the cached rows are the teacher's log-softmax(logits) of the training photos, in the split's order
    paths = [p for p, _ in read_split(student)["splits"]["train"]]
    with safe_open(str(run.teacher_file), framework="pt") as f:
        table = f.get_tensor("log_probs").numpy()
    z = Predictor(teacher).outputs(paths)["logits"].astype(np.float64)
    np.testing.assert_allclose(table, _np_log_softmax(z), atol=1e-5)
    # a second call (a resume) reads the cache and never runs the teacher again
    monkeypatch.setattr(mteacher, "compute_teacher_table", lambda *a, **k: pytest.fail("teacher re-run"))
    split = SimpleNamespace(train=read_split(student)["splits"]["train"], val=read_split(student)["splits"]["val"],
                            classes=json.loads((student / "model.json").read_text())["classes"])
    acc = SimpleNamespace(is_main_process=True, num_processes=1, device=torch.device("cpu"))
    again = mteacher.teacher_table(SimpleNamespace(teacher=str(teacher)), split, run, acc)
    np.testing.assert_array_equal(again.numpy(), table)
    # eval and export work on the student as on any run
    assert cli_main(["eval", str(student), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "metrics.json").is_file()
    assert cli_main(["export", str(student), "--out", str(tmp_path / "exp")]) == 0
    assert list((tmp_path / "exp").glob("*.onnx"))


def test_a_teacher_of_other_classes_is_one_clear_line(teacher_run, tmp_path, capsys):
    root, data, teacher = teacher_run
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    meta = json.loads((other / "model.json").read_text())
    meta["classes"] = ["x", "y", "z"]
    (other / "model.json").write_text(json.dumps(meta))
    for f in RunDir(other).calibration_files:
        f.unlink(missing_ok=True)
    capsys.readouterr()
    code = cli_main(["train", "--data", data, "--out", str(tmp_path / "s"), "--teacher", str(other), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("mineralnet: error:") and "knows the classes x, y, z" in err[-1]


def test_an_ensemble_teacher_gives_its_averaged_calibrated_probabilities(teacher_run, tmp_path):
    root, data, teacher = teacher_run
    second, ens = tmp_path / "second", tmp_path / "ens"
    assert cli_main(["train", "--data", data, "--out", str(second), "--seed", "2", *TINY]) == 0
    assert cli_main(["ensemble", str(teacher), str(second), "--out", str(ens)]) == 0
    student = tmp_path / "student"
    assert cli_main(["train", "--data", data, "--out", str(student), "--teacher", str(ens), *TINY]) == 0
    paths = [p for p, _ in read_split(student)["splits"]["train"]]
    with safe_open(str(RunDir(student).teacher_file), framework="pt") as f:
        table, meta = f.get_tensor("log_probs").numpy(), f.metadata()
    assert meta["source"] == "calibrated probabilities"
    np.testing.assert_allclose(np.exp(table), Predictor(ens).probabilities(paths), atol=1e-5)


def test_a_teacher_that_trained_on_the_students_validation_photos_is_refused(teacher_run, tmp_path, capsys):
    root, data, teacher = teacher_run
    leaky = tmp_path / "leaky"
    shutil.copytree(teacher, leaky)
    split = json.loads((leaky / "split.json").read_text())
    split["splits"] = {"train": split["splits"]["val"], "val": split["splits"]["train"]}  # trained on the val photos
    (leaky / "split.json").write_text(json.dumps(split))
    val = read_split(teacher)["splits"]["val"]
    with pytest.raises(MineralNetError, match=f"trained on {len(val)} of the student's {len(val)} validation"):
        mteacher.check_teacher_held_out(leaky, val)
    mteacher.check_teacher_held_out(teacher, val)  # the same split: nothing seen
    capsys.readouterr()
    code = cli_main(["train", "--data", data, "--out", str(tmp_path / "s"), "--teacher", str(leaky), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "validation photos" in err[-1] and "--split-seed" in err[-1]
