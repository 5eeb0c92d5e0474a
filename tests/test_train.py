"""Training: run-directory contract, exact DDP semantics, resume, preemption, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.config import load_config
from mineralnet.runs import load_model
from mineralnet.train import fit, resolve_resume

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
# A tiny, fast, deterministic setup: resnet18 at 32 px, frozen BN (so batch splitting cannot matter).
TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--optimizer", "sgd", "--lr", "0.05", "--scheduler", "none", "--precision", "fp32",
        "--normalize", "imagenet", "--seed", "3"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(mdata.make_demo_dataset(tmp_path_factory.mktemp("demo"), classes=3, per_class=14, size=40, seed=1))


def _env(tmp_path):
    env = dict(os.environ, MINERALNET_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(args, tmp_path, procs=1, check=True, timeout=300):
    if procs > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + os.getpid() % 1000), TRAIN, *args]
    else:
        cmd = [sys.executable, TRAIN, *args]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _weights(run):
    return load_file(str(Path(run) / "state" / "model.safetensors"))


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


CONTRACT = ["config.yaml", "model.safetensors", "model.json", "metrics.jsonl", "state", "tb",
            "eval/metrics.json", "eval/per_class.csv", "eval/confusion.png"]


def test_tiny_run_writes_the_run_directory_contract(tiny_data, tmp_path):
    out = tmp_path / "run"
    _run(["--data", tiny_data, "--out", str(out), "--epochs", "2", *TINY, "--loss", "wtopk"], tmp_path)
    for name in CONTRACT:
        assert (out / name).exists(), name
    meta = json.loads((out / "model.json").read_text())
    for key in ("backbone", "stages", "num_classes", "classes", "image_size", "mean", "std", "resize",
                "metrics", "versions"):
        assert key in meta, key
    assert meta["classes"] == sorted(meta["classes"]) and meta["num_classes"] == 3 and meta["stages"] == [2, 4]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    for key in ("epoch", "lr", "train_loss", "val_top1", "val_mean_class_acc", "img_per_s", "seconds"):
        assert key in lines[0]
    model, meta2 = load_model(out)
    assert meta2["classes"] == meta["classes"]
    # weights are never pickled (Accelerate's optimizer/RNG state for resume is not weights)
    assert not list(out.rglob("*.pt*")) and not list(out.rglob("pytorch_model*"))
    assert (out / "state" / "model.safetensors").is_file()
    # model.json's metric is the best epoch's, and equals what metrics.jsonl says of that epoch
    best = max(lines, key=lambda l: l["val_top1"])
    assert meta["metrics"]["top1"] == pytest.approx(best["val_top1"])


def test_ddp_global_scope_equals_one_process_and_local_differs(tiny_data, tmp_path):
    common = ["--data", tiny_data, "--epochs", "2", *TINY, "--freeze-bn", "--loss", "wtopk", "--k", "0.25",
              "--alpha", "0.1"]
    _run([*common, "--out", str(tmp_path / "one")], tmp_path)
    _run([*common, "--out", str(tmp_path / "two"), "--loss-scope", "global"], tmp_path, procs=2)
    _run([*common, "--out", str(tmp_path / "loc"), "--loss-scope", "local"], tmp_path, procs=2)
    one, two, loc = (_weights(tmp_path / n) for n in ("one", "two", "loc"))
    steps = (tmp_path / "one" / "metrics.jsonl").read_text().count("\n")
    assert steps == 2
    assert _max_diff(one, two) < 1e-5
    assert _max_diff(one, loc) > 1e-4  # local mining picks other hard samples: the test can tell
    # evaluation under 2 processes counts each validation image exactly once (val size is odd here)
    n_val = len(json.loads((tmp_path / "two" / "split.json").read_text())["val"])
    m = json.loads((tmp_path / "two" / "eval" / "metrics.json").read_text())
    assert n_val % 2 == 1  # the last batch cannot split evenly over 2 processes
    assert sum(map(sum, m["confusion"])) == n_val
    m1 = json.loads((tmp_path / "one" / "eval" / "metrics.json").read_text())
    assert m["top1"] == pytest.approx(m1["top1"], abs=1e-9)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path):
    base = dict(data=tiny_data, backbone="resnet18", image_size=32, batch_size=8, workers=0, optimizer="sgd",
                lr=0.05, momentum=0.9, scheduler="cosine", precision="fp32", normalize="imagenet", seed=5,
                epochs=2, loss="wtopk")
    fit(load_config(None, **base, out=str(tmp_path / "straight")))
    # stop after the first epoch (a time budget), then resume for the second
    first = fit(load_config(None, **base, out=str(tmp_path / "halves"), max_train_minutes=1e-9))
    assert first["status"] == "time_budget"
    cfg = resolve_resume(load_config(None, resume=str(tmp_path / "halves")), {"max_train_minutes": None})
    second = fit(cfg)
    assert second["status"] == "finished"
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "halves")
    assert _max_diff(a, b) == 0.0
    lines = (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]


def test_sigterm_saves_state_and_leaves_a_loadable_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, TRAIN, "--data", tiny_data, "--out", str(out), "--epochs", "200", *TINY]
    p = subprocess.Popen(args, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert (out / "metrics.jsonl").exists(), p.stderr.read() if p.poll() is not None else "no epoch finished"
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "state saved" in stdout and "--resume" in stdout
    model, meta = load_model(out)
    assert (out / "state" / "model.safetensors").is_file()
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"


KILL_WRITER = r"""
import sys, torch
from mineralnet.model import FusionNet
from mineralnet.runs import model_meta, save_model
m = FusionNet("resnet18", (2, 4), 3)
meta = model_meta(m, classes=["a", "b", "c"], image_size=32, mean=[.5]*3, std=[.2]*3, resize=37)
i = 0
while True:
    with torch.no_grad():
        m.head.bias.fill_(i)
    save_model(sys.argv[1], m, meta)
    i += 1
    print(i, flush=True)
"""


def test_sigkill_during_saves_never_leaves_a_corrupt_model(tmp_path):
    run = tmp_path / "run"
    for delay in (0.0, 0.05, 0.13, 0.31):
        p = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(run)], env=_env(tmp_path),
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "1"  # one save has completed; more are under way
        time.sleep(delay)
        p.kill()
        p.wait()
        model, meta = load_model(run)  # loads completely, whatever moment the kill hit
        b = model.head.bias
        assert torch.all(b == b[0])


def test_bad_inputs_are_one_clear_line(tiny_data, tmp_path, capsys):
    def err(argv):
        code = cli_main(["train", *argv])
        e = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and e and e[-1].startswith("mineralnet: error:"), (code, e)
        return e[-1]

    assert "does not exist" in err(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r1"), *TINY])
    (tmp_path / "empty").mkdir()
    assert "no class folders" in err(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r2"), *TINY])
    one = tmp_path / "one"
    (one / "quartz").mkdir(parents=True)
    import shutil
    for f in sorted(Path(tiny_data).glob("*/*.jpg"))[:12]:
        shutil.copy(f, one / "quartz" / f.name)
    assert "at least 2" in err(["--data", str(one), "--out", str(tmp_path / "r3"), *TINY])
    assert "--k" in err(["--data", tiny_data, "--k", "1.5", *TINY])
    # resuming a run with data of other classes
    run = tmp_path / "r4"
    assert cli_main(["train", "--data", tiny_data, "--out", str(run), "--epochs", "1", *TINY]) == 0
    other = tmp_path / "other"
    for c in ("x", "y"):
        (other / c).mkdir(parents=True)
        for f in sorted(Path(tiny_data).glob("*/*.jpg"))[:10]:
            shutil.copy(f, other / c / f.name)
    assert "classes" in err(["--resume", str(run), "--data", str(other), "--epochs", "2"])


def test_batch_not_divisible_by_processes_is_clear(tiny_data, tmp_path):
    p = _run(["--data", tiny_data, "--out", str(tmp_path / "r"), *TINY, "--batch-size", "7"], tmp_path, procs=2,
             check=False)
    assert p.returncode != 0
    assert "does not divide over 2 processes" in p.stderr


def test_no_argument_demo_produces_a_complete_run(tmp_path):
    p = subprocess.run([sys.executable, TRAIN], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    for name in CONTRACT:
        assert (runs[0] / name).exists(), name
    assert "this was the demo" in p.stdout and "--data" in p.stdout
    assert json.loads((runs[0] / "model.json").read_text())["metrics"]["top1"] > 0.5  # it learned something


def test_atomic_writes_have_normal_file_permissions(tmp_path):
    from mineralnet.runs import atomic_write_text
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left
