"""Training: run-directory contract, exact DDP semantics, resume, preemption, bad input."""
import json
import os
import shlex
import shutil
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
from mineralnet.errors import MineralNetError
from mineralnet.artifact import load_model
from mineralnet.runs import RunDir, read_split
from mineralnet.train import fit
from mineralnet.train.cli import resolve_resume

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
# A tiny, fast, deterministic setup: resnet18 at 32 px, frozen BN (so batch splitting cannot matter).
TINY = ["--config", "base", "--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0",
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
            "eval/metrics.json", "eval/per_class.csv", "eval/confusion.png",
            "calibration.json", "calibration.safetensors"]  # training ends by calibrating "unknown"


@pytest.mark.slow
def test_tiny_run_writes_the_run_directory_contract(tiny_data, tmp_path):
    out = tmp_path / "run"
    p = _run(["--data", tiny_data, "--out", str(out), "--epochs", "2", *TINY, "--loss", "wtopk"], tmp_path)
    # not a terminal: no progress bar (no carriage returns in a log), one summary line per epoch
    assert "\r" not in p.stderr and "it/s" not in p.stderr
    assert "epoch   1/2  loss" in p.stdout and "epoch   2/2  loss" in p.stdout
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


@pytest.mark.slow
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
    n_val = len(read_split(tmp_path / "two")["splits"]["val"])
    m = json.loads((tmp_path / "two" / "eval" / "metrics.json").read_text())
    assert n_val % 2 == 1  # the last batch cannot split evenly over 2 processes
    assert sum(map(sum, m["confusion"])) == n_val
    m1 = json.loads((tmp_path / "one" / "eval" / "metrics.json").read_text())
    assert m["top1"] == pytest.approx(m1["top1"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path, ema_decay):
    base = dict(data=tiny_data, backbone="resnet18", image_size=32, batch_size=8, workers=0, optimizer="sgd",
                lr=0.05, momentum=0.9, scheduler="cosine", precision="fp32", normalize="imagenet", seed=5,
                epochs=2, loss="wtopk", ema_decay=ema_decay)
    fit(load_config(None, **base, out=str(tmp_path / "straight")))
    # stop after the first epoch (a time budget), then resume for the second
    first = fit(load_config(None, **base, out=str(tmp_path / "halves"), max_train_minutes=1e-9))
    assert first["status"] == "time_budget"
    cfg = resolve_resume(load_config(None, resume=str(tmp_path / "halves")), {"max_train_minutes": None})
    second = fit(cfg)
    assert second["status"] == "finished"
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "halves")
    assert _max_diff(a, b) == 0.0
    if ema_decay:  # the average resumes too
        ea, eb = (load_file(str(tmp_path / n / "state" / "ema.safetensors")) for n in ("straight", "halves"))
        assert _max_diff(ea, eb) == 0.0
    lines = (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]


@pytest.mark.slow
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
from mineralnet.artifact import model_meta, save_model
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_batch_not_divisible_by_processes_is_clear(tiny_data, tmp_path):
    p = _run(["--data", tiny_data, "--out", str(tmp_path / "r"), *TINY, "--batch-size", "7"], tmp_path, procs=2,
             check=False)
    assert p.returncode != 0
    assert "does not divide over 2 processes" in p.stderr


@pytest.mark.slow
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
    # The printed next steps run exactly as printed (export's int8 calibration aside: test_export's job).
    lines = p.stdout.split("\nnext:\n", 1)[1].splitlines()
    steps = [shlex.split(ln) for ln in lines[:4]]
    assert [s[:2] for s in steps] == [["mineralnet", "eval"], ["mineralnet", "explain"],
                                      ["mineralnet-export", runs[0].relative_to(tmp_path).as_posix()],
                                      ["mineralnet", "predict"]]
    assert steps[0][2:] == [steps[3][2], "--split", "val"]
    for step in (steps[0], steps[1], steps[3]):
        exe = shutil.which(step[0], path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
        q = subprocess.run([exe, *step[1:]], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                           timeout=900)
        assert q.returncode == 0, (step, q.stderr[-3000:])
        assert "warning" not in q.stdout, (step, q.stdout)


def test_atomic_writes_have_normal_file_permissions(tmp_path):
    from mineralnet.files import atomic_write_text
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left


def test_model_ema_matches_an_independent_average():
    from mineralnet.train import ModelEma

    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))
    live(torch.randn(2, 3, 6, 6))
    ema = ModelEma(live, decay=0.99)
    ref = {k: v.clone().double() for k, v in live.state_dict().items()}
    for step in range(1, 40):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        live.train()(torch.randn(2, 3, 6, 6))  # moves BatchNorm running statistics
        ema.update(live, step)
        d = min(0.99, (1 + step) / (10 + step))
        for k, v in live.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone().double()
    got = ema.model.state_dict()
    for k, v in ref.items():
        assert torch.allclose(got[k].double(), v, atol=1e-5), k
    assert got["1.num_batches_tracked"].item() == live.state_dict()["1.num_batches_tracked"].item()
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


@pytest.mark.slow
def test_ema_run_keeps_the_averaged_weights_as_the_model(tiny_data, tmp_path):
    out = tmp_path / "ema"
    _run(["--data", tiny_data, "--out", str(out), "--epochs", "1", *TINY, "--ema-decay", "0.9"], tmp_path)
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"val_top1_live", "val_mean_class_acc_live"} <= set(line)
    kept, ema, live = (load_file(str(out / f)) for f in ("model.safetensors", "state/ema.safetensors",
                                                         "state/model.safetensors"))
    assert _max_diff(kept, ema) == 0.0 and _max_diff(kept, live) > 0.0
    assert json.loads((out / "model.json").read_text())["ema_decay"] == 0.9
    p = _run(["--data", tiny_data, "--out", str(tmp_path / "bad"), *TINY, "--ema-decay", "1.5"], tmp_path,
             check=False)
    assert p.returncode != 0 and "--ema-decay 1.5" in p.stderr + p.stdout


def test_progressive_resizing_schedule_and_dataset():
    from mineralnet.data import PhotoDataset

    cfg = load_config(None, image_size=128, train_crop_min=64, epochs=20, progressive_until=0.75)
    sizes = [cfg.train_size_at(e) for e in range(cfg.epochs)]
    # linear from 64 at epoch 0 to 128 at epoch round(0.75 * 20) - 1 = 14, floored to 16 px steps
    expect = [max(64, int((64 + 64 * e / 14) // 16) * 16) if e < 14 else 128 for e in range(20)]
    assert sizes == expect and sizes[0] == 64 and sizes[13] < 128 == sizes[14] == sizes[-1]
    assert all(a <= b for a, b in zip(sizes, sizes[1:])) and all(s % 16 == 0 for s in sizes)
    assert load_config(None, image_size=96, epochs=5).train_size_at(0) == 96  # off by default
    assert load_config(None, image_size=128, train_crop_size=96, epochs=5).train_size_at(0) == 96

    tf = mdata.build_transforms(128, [0.5] * 3, [0.25] * 3, train=True)
    img = (torch.rand(150, 170, 3) * 255).to(torch.uint8).numpy()
    ds = PhotoDataset([("a.jpg", 0)], tf, size_at=cfg.train_size_at)
    ds.cache = [img]
    for e in (0, 7, 19):
        ds.set_epoch(e)
        assert ds[0][0].shape == (3, sizes[e], sizes[e])
    with pytest.raises(MineralNetError, match="--train-crop-min 200"):
        load_config(None, image_size=128, train_crop_min=200).validate()


@pytest.mark.slow
def test_progressive_run_logs_the_crop_and_validates_at_image_size(tiny_data, tmp_path):
    out = tmp_path / "prog"
    _run(["--data", tiny_data, "--out", str(out), "--epochs", "3", *TINY, "--train-crop-min", "16",
          "--progressive-until", "1"], tmp_path)
    crops = [json.loads(l)["train_crop"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert crops == [16, 16, 32]
    assert json.loads((out / "model.json").read_text())["image_size"] == 32


def test_batch_mix_mixup_cutmix_against_direct_computation():
    from mineralnet.data import BatchMix

    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 20, 24), torch.tensor([0, 1, 2, 0, 1, 2])
    onehot = torch.nn.functional.one_hot(y, 3).float()
    mixup = BatchMix(3, mixup=0.4, seed=1)
    for step in range(5):
        lam, box = mixup.params(step, 20, 24)
        assert box is None and 0.0 <= lam <= 1.0
        xm, t = mixup(x, y, step)
        assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
        assert torch.allclose(t, lam * onehot + (1 - lam) * onehot.flip(0)) and torch.allclose(t.sum(1), torch.ones(6))
    assert mixup.params(3, 20, 24) == mixup.params(3, 20, 24) != mixup.params(4, 20, 24)  # seeded by step
    assert BatchMix(3, mixup=0.4, seed=1, rank=1).params(3, 20, 24) != mixup.params(3, 20, 24)

    cutmix = BatchMix(3, cutmix=1.0, seed=2)
    seen_box = False
    for step in range(10):
        lam, box = cutmix.params(step, 20, 24)
        xc, t = cutmix(x, y, step)
        inside = torch.zeros(20, 24, dtype=torch.bool)
        y0, y1, x0, x1 = box
        inside[y0:y1, x0:x1] = True
        seen_box |= bool(inside.any())
        assert lam == pytest.approx(1 - inside.float().mean().item())  # the exact kept area
        assert torch.equal(xc[:, :, inside], x.flip(0)[:, :, inside]) and torch.equal(xc[:, :, ~inside], x[:, :, ~inside])
        assert torch.allclose(t, lam * onehot + (1 - lam) * onehot.flip(0))
    assert seen_box
    off = BatchMix(3, mixup=1.0, cutmix=1.0, prob=0.0)
    xo, to = off(x, y, 0)
    assert torch.equal(xo, x) and torch.equal(to, onehot)
    both = BatchMix(3, mixup=1.0, cutmix=1.0, seed=0)
    kinds = {both.params(s, 20, 24)[1] is None for s in range(40)}
    assert kinds == {True, False}  # switches between mixup and CutMix
    with pytest.raises(MineralNetError, match="center loss"):
        load_config(None, loss="center", mixup=0.2).validate()


def test_losses_take_the_soft_targets_of_mixing():
    from mineralnet.losses import build_loss

    torch.manual_seed(0)
    logits, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    for name in ("ce", "wtopk"):
        fn = build_loss(name, num_classes=4, feature_dim=1, scope="local")
        assert fn(logits, onehot).item() == pytest.approx(fn(logits, y).item(), rel=1e-6)
    soft = 0.7 * onehot + 0.3 * onehot.flip(0)
    per = -(soft * logits.log_softmax(1)).sum(1)  # independent soft cross-entropy
    assert build_loss("ce", num_classes=4, feature_dim=1)(logits, soft).item() == pytest.approx(per.mean().item(), rel=1e-6)
    top = per.sort(descending=True).values
    ref = top[:4].mean() + 0.2 * top[4:].mean()  # Eq. 5 with k=0.5, alpha=0.2 (weights 1/(kN), alpha/((1-k)N))
    got = build_loss("wtopk", k=0.5, alpha=0.2, num_classes=4, feature_dim=1, scope="local")(logits, soft)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("preset", ["paper", "cpu", "demo"])
def test_presets_load_and_validate(preset):
    cfg = load_config(preset).validate()
    assert cfg.epochs >= 1 and cfg.batch_size >= 1
    if preset == "paper":  # the paper's recipe, as the issue fixes it
        assert (cfg.backbone, tuple(cfg.stages), cfg.loss, cfg.k, cfg.alpha) == ("resnet50", (2, 4), "wtopk", 0.5, 0.2)
        assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.scheduler, cfg.batch_size, cfg.epochs, cfg.image_size) == \
            ("sgd", 1e-3, 0.9, "plateau", 50, 100, 224)
        assert cfg.pretrained_value is True
    if preset == "cpu":  # from scratch, ending at the size it evaluates
        assert cfg.pretrained_value is False
        assert cfg.train_size_at(cfg.epochs - 1) == cfg.image_size


def test_split_seed_fixes_the_split_whatever_the_seed(tiny_data, tmp_path):
    from mineralnet.train import prepare_data

    def split(name, **kw):
        cfg = load_config(None, data=tiny_data, folds=3, fold=1, batch_size=8, **kw).validate()
        (tmp_path / name).mkdir()
        prepare_data(cfg, RunDir(tmp_path / name))
        s = read_split(tmp_path / name)
        return {"val": sorted(p for p, _ in s["splits"]["val"]), **s["info"]}

    a, b, c = split("a", seed=1, split_seed=7), split("b", seed=2, split_seed=7), split("c", seed=7)
    assert a["val"] == b["val"] == c["val"] and a["seed"] == 7
    assert split("d", seed=1)["val"] != a["val"]  # without it, the seed moves the folds (as before)


@pytest.mark.realdata
@pytest.mark.slow
def test_cpu_preset_runs_on_the_real_photos(minet7_dir, tmp_path):
    """The cpu preset end to end on minet7 for 2 epochs (its accuracy is measured in bench/RESULTS.md)."""
    out = tmp_path / "cpu"
    _run(["--config", "cpu", "--data", minet7_dir, "--folds", "5", "--fold", "0", "--epochs", "2",
          "--out", str(out)], tmp_path, timeout=900)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["train_crop"] for l in lines] == [64, 96]  # progressive resizing ends at the eval size
    assert all("val_top1_live" in l for l in lines)  # EMA on
    meta = json.loads((out / "model.json").read_text())
    assert meta["image_size"] == 96 and meta["ema_decay"] == 0.998 and len(meta["classes"]) == 7
    assert meta["backbone"] == "resnet10t"
    n_val = len(read_split(out)["splits"]["val"])  # fold 0 of 5 over 1,656 photos: 331-333 (duplicate groups move a few)
    assert 320 <= n_val <= 340 and json.loads((out / "eval" / "metrics.json").read_text())["n"] == n_val


@pytest.mark.slow
def test_eval_split_val_reproduces_training_validation_from_the_files(tmp_path, capsys):
    """With photos cached in RAM, validation during training and `mineralnet eval RUN --split val`
    (which decodes the files again) score the same tensors: same confusion matrix."""
    # photos much larger than the cache side, so that caching them resized any other way shows
    data = str(mdata.make_demo_dataset(tmp_path / "big", classes=3, per_class=14, size=150, seed=2))
    out = tmp_path / "run"
    _run(["--data", data, "--out", str(out), "--epochs", "1", *TINY, "--folds", "3", "--fold", "1",
          "--cache-images"], tmp_path)
    trained = json.loads((out / "eval" / "metrics.json").read_text())
    assert cli_main(["eval", str(out), "--split", "val", "--workers", "0", "--out", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["n"] == trained["n"] == 14 and again["split"] == "val"
    assert again["confusion"] == trained["confusion"]
    assert again["top3"] == pytest.approx(trained["top3"])
    assert cli_main(["eval", str(out), "--split", "train", "--workers", "0", "--out", str(tmp_path / "tr")]) == 0
    assert json.loads((tmp_path / "tr" / "metrics.json").read_text())["n"] == 42 - 14
    # a run without split.json (e.g. a copied model) names the fix
    (out / "split.json").unlink()
    capsys.readouterr()
    assert cli_main(["eval", str(out), "--split", "val", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "split.json" in err and "--data DIR" in err


def test_cached_validation_photos_give_the_tensors_evaluation_gives_from_the_files(tmp_path):
    from mineralnet.data import PhotoDataset

    data = mdata.make_demo_dataset(tmp_path / "big", classes=2, per_class=3, size=150, seed=4)
    samples = mdata.scan_dataset(data).samples
    eval_tf = mdata.build_transforms(32, [0.5] * 3, [0.25] * 3, train=False, resize=36)
    cached = PhotoDataset(samples, eval_tf, cache_side=46)
    files = mdata.ImageDataset(samples, eval_tf)  # what `mineralnet eval` reads
    for i in range(len(samples)):
        assert torch.equal(cached[i][0], files[i][0]), samples[i][0]


def test_backbone_lr_scale_gives_the_backbone_a_fraction_of_the_scheduled_lr():
    from mineralnet.config import TrainConfig
    from mineralnet.model import FusionNet
    from mineralnet.train.state import LRControl, build_optimizer

    model = FusionNet("resnet18", (2, 4), 3, pretrained=False)
    cfg = TrainConfig(backbone="resnet18", lr=0.01, backbone_lr_scale=0.1, scheduler="cosine", epochs=2,
                      warmup_epochs=0.5, optimizer="adamw").validate()
    opt = build_optimizer(cfg, model)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    seen = {id(p) for g in opt.param_groups for p in g["params"]}
    assert seen == {id(p) for p in model.parameters()}  # every parameter, once
    by_scale = {g["lr_scale"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_scale[0.1] == backbone_ids and by_scale[1.0] == {id(p) for p in model.head.parameters()}
    control = LRControl(cfg, opt, steps_per_epoch=10)
    for step in (0, 4, 7, 15):
        head_lr = control.step(step)
        lrs = {g["lr_scale"]: g["lr"] for g in opt.param_groups}
        assert lrs[1.0] == pytest.approx(head_lr) and lrs[0.1] == pytest.approx(0.1 * head_lr)
    # scale 1 keeps the single group plain training always had
    plain = build_optimizer(TrainConfig(backbone="resnet18").validate(), model)
    assert len(plain.param_groups) == 1
    with pytest.raises(MineralNetError, match="backbone-lr-scale"):
        TrainConfig(backbone_lr_scale=0.0).validate()
