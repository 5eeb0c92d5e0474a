"""WebDataset shards: `mineralnet data shard` and `train --data SHARDS` (issue 26), with their bad input."""
import errno
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.config import load_config
from mineralnet.data import shards as mshards
from mineralnet.errors import MineralNetError
from mineralnet.runs import RunDir, read_split
from mineralnet.train import inputs, shard_inputs

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return str(mdata.make_demo_dataset(tmp_path_factory.mktemp("demo"), classes=3, per_class=14, size=40, seed=1))


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    mshards.write_shards(mdata.scan_dataset(photos), out, size=38, shard_size="5", val_split=0.2, seed=0, progress=False, log=None)
    return out


def _members(tar_path):
    """{key: {ext: bytes}} of a tar, read with the standard library (not webdataset)."""
    out = {}
    with tarfile.open(tar_path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def _cfg(data, **kw):
    base = dict(data=str(data), backbone="resnet18", image_size=32, batch_size=4, workers=0, precision="fp32",
                normalize="dataset", seed=0, val_split=0.2)
    base.update(kw)
    return load_config(None, **base)


# ---- writing -------------------------------------------------------------------------------------------

def test_shards_hold_every_readable_photo_once_with_its_class_split_and_size(photos, shards):
    info = json.loads((shards / "_info.json").read_text())
    assert info["format"] == mshards.SHARDS_FORMAT and info["classes"] == ["malachite", "pyrite", "quartz"]
    assert not list(shards.glob(".*")), "no temporary file is left"
    split = json.loads((shards / "split.json").read_text())
    seen = {}
    for name in ("train", "val"):
        entry = info["splits"][name]
        assert entry["filenames"] == sorted(entry["filenames"]) and entry["filenames"][0] == f"{name}-000000.tar"
        counts, paths = [0] * 3, []
        for fname, length in zip(entry["filenames"], entry["shard_lengths"]):
            members = _members(shards / fname)
            assert len(members) == length <= 5
            for key, m in members.items():
                meta = json.loads(m["json"])
                label = int(m["cls"])
                assert info["classes"][label] == meta["class"] == Path(meta["path"]).parent.name
                assert meta["split"] == name and key not in seen
                img = cv2.imdecode(np.frombuffer(m["jpg"], np.uint8), cv2.IMREAD_COLOR)
                assert min(img.shape[:2]) == 38 and (img.shape[1], img.shape[0]) == (meta["width"], meta["height"])
                seen[key] = meta["path"]
                paths.append(meta["path"])
                counts[label] += 1
        assert entry["num_samples"] == sum(entry["shard_lengths"]) and entry["class_counts"] == counts
        assert sorted(p for p, _ in split["splits"][name]) == sorted(paths)
    assert len(seen) == len(set(seen.values())) == 42
    # training photos are shuffled before writing: the first shard holds more than one class
    first = _members(shards / "train-000000.tar")
    assert len({int(m["cls"]) for m in first.values()}) > 1


def test_shard_split_and_mean_std_equal_the_folder_paths(photos, shards, tmp_path):
    folder = inputs.prepare_data(_cfg(photos), RunDir.open(tmp_path / "a", resuming=False, is_main=True))
    streamed = shard_inputs.prepare_shards(_cfg(shards), RunDir.open(tmp_path / "b", resuming=False, is_main=True))
    assert isinstance(streamed, shard_inputs.ShardSplit)
    assert sorted(streamed.train) == sorted(folder.train) and sorted(streamed.val) == sorted(folder.val)
    assert streamed.mean == pytest.approx(folder.mean, abs=1e-12) and streamed.std == pytest.approx(folder.std, abs=1e-12)
    # the run's split.json names the original photos, so eval --split val / calibrate find them
    saved = read_split(tmp_path / "b")
    assert sorted(saved["splits"]["val"]) == sorted(folder.val) and saved["info"]["kind"] == "shards"


def test_folds_match_the_folder_paths_folds(photos, tmp_path):
    out = tmp_path / "k"
    info = mshards.write_shards(mdata.scan_dataset(photos), out, size=36, shard_size="4", folds=3, seed=2, progress=False, log=None)
    assert list(info["splits"]) == ["fold0", "fold1", "fold2"] and "without_fold1" in info["stats"]
    for fold in range(3):
        folder = inputs.prepare_data(_cfg(photos, folds=3, fold=fold, seed=2),
                                     RunDir.open(tmp_path / f"a{fold}", resuming=False, is_main=True))
        streamed = shard_inputs.prepare_shards(_cfg(out, folds=3, fold=fold, seed=2),
                                       RunDir.open(tmp_path / f"b{fold}", resuming=False, is_main=True))
        assert sorted(streamed.val) == sorted(folder.val) and sorted(streamed.train) == sorted(folder.train)
        assert streamed.mean == pytest.approx(folder.mean, abs=1e-12)
        assert all(u.split("/")[-1].startswith(("fold0", "fold1", "fold2")) and f"fold{fold}-" not in u
                   for u in streamed.train_urls)
    with pytest.raises(MineralNetError, match="written in 3 folds; pass --folds 3"):
        shard_inputs.prepare_shards(_cfg(out), RunDir.open(tmp_path / "c", resuming=False, is_main=True))


def test_unreadable_photos_are_skipped_and_counted(photos, tmp_path):
    import shutil

    src = tmp_path / "p"
    shutil.copytree(photos, src)
    victim = sorted((src / "quartz").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated JPEG
    lines = []
    info = mshards.write_shards(mdata.scan_dataset(src), tmp_path / "s", size=36, shard_size="50", progress=False, log=lines.append)
    assert info["skipped"]["unreadable"] == 1
    assert sum(s["num_samples"] for s in info["splits"].values()) == 41
    assert any("skipped 1 unreadable" in l and victim.name in l for l in lines)


def test_a_failed_write_leaves_no_half_shard_and_no_info(photos, tmp_path, monkeypatch):
    real, calls = mshards.reencode, []

    def disk_full(path, size, quality):
        calls.append(path)
        if len(calls) == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, size, quality)

    monkeypatch.setattr(mshards, "reencode", disk_full)
    out = tmp_path / "s"
    with pytest.raises(MineralNetError, match="No space left on device.*free space or pass another --out"):
        mshards.write_shards(mdata.scan_dataset(photos), out, size=36, shard_size="5", progress=False, log=None, threads=1)
    assert not (out / "_info.json").exists() and not list(out.glob(".*"))
    done = sorted(out.glob("*.tar"))
    assert [p.name for p in done] == ["train-000000.tar", "train-000001.tar"]
    assert all(len(_members(p)) == 5 for p in done)  # every file named as a shard is complete
    with pytest.raises(MineralNetError, match="no _info.json.*unfinished"):
        shard_inputs.prepare_shards(_cfg(out), RunDir.open(tmp_path / "r", resuming=False, is_main=True))
    monkeypatch.setattr(mshards, "reencode", real)  # a second attempt into the same folder finishes
    mshards.write_shards(mdata.scan_dataset(photos), out, size=36, shard_size="5", progress=False, log=None)
    with pytest.raises(MineralNetError, match="already holds finished shards"):
        mshards.write_shards(mdata.scan_dataset(photos), out, size=36, progress=False, log=None)


@pytest.mark.parametrize("text,expect", [("1000", (1000, 10**15)), ("500MB", (10**12, 500 * 2**20)),
                                         ("2gb", (10**12, 2 * 2**30))])
def test_shard_size_parses_counts_and_sizes(text, expect):
    assert mshards.parse_shard_size(text) == expect


def test_bad_shard_size_and_options_are_one_line(photos, tmp_path, capsys):
    with pytest.raises(MineralNetError, match="photo count"):
        mshards.parse_shard_size("many")
    assert cli_main(["data", "shard", photos, "--out", str(tmp_path / "x"), "--val-split", "1.5"]) == 2
    assert "--val-split 1.5 must be in (0, 1)" in capsys.readouterr().err


# ---- reading -------------------------------------------------------------------------------------------

def test_validation_stream_reads_every_photo_once(shards, tmp_path):
    split = shard_inputs.prepare_shards(_cfg(shards), RunDir.open(tmp_path / "r", resuming=False, is_main=True))
    _, val_loader = shard_inputs.build_shard_loaders(_cfg(shards), split)
    labels = torch.cat([y for _, y in val_loader]).tolist()
    assert sorted(labels) == sorted(y for _, y in split.val)


def _rank_loader(split, cfg, rank, world, workers=0):
    tf = mdata.build_transforms(cfg.train_size, split.mean, split.std, train=True, resize=cfg.eval_resize)
    ds = shard_inputs.ShardStream(split.train_urls, split.train_lengths, tf, len(split.classes), train=True,
                                  seed=cfg.seed, rank=rank, world=world)
    return shard_inputs.ShardLoader(ds, cfg.batch_size // world, split.n_train // cfg.batch_size,
                                    torch.device("cpu"), dict(num_workers=workers))


def test_ranks_take_the_same_steps_from_disjoint_shards(shards, tmp_path):
    cfg = _cfg(shards, batch_size=8)
    split = shard_inputs.prepare_shards(cfg, RunDir.open(tmp_path / "r", resuming=False, is_main=True))
    assert len(split.train_urls) == 7  # 33 photos in shards of 5: unequal shares over 2 ranks
    for epoch in (0, 1):
        opened, steps = [], []
        for rank in (0, 1):
            loader = _rank_loader(split, cfg, rank, 2)
            loader.set_epoch(epoch)
            batches = [x.shape[0] for x, _ in loader]
            steps.append(len(batches))
            assert batches and set(batches) == {4}
            opened.append(set(loader.dataset.opened))
        assert steps == [split.n_train // 8] * 2
        assert not opened[0] & opened[1] and opened[0] | opened[1] == set(split.train_urls)


def test_resume_mid_epoch_streams_only_the_steps_left(shards, tmp_path):
    cfg = _cfg(shards, batch_size=8)
    split = shard_inputs.prepare_shards(cfg, RunDir.open(tmp_path / "r", resuming=False, is_main=True))
    loader = _rank_loader(split, cfg, 0, 1)
    rest = loader.skip_first_batches(3)
    assert len(rest) == len(loader) - 3 and rest.dataset.restart == 3 and loader.dataset.restart == 0
    assert sum(1 for _ in rest) == len(loader) - 3
    assert rest.dataset.rank_shards() != loader.dataset.rank_shards() or len(split.train_urls) == 1


def test_the_loop_resumes_a_stream_without_accelerates_skip():
    from mineralnet.train import loop

    class Stream:
        def __init__(self, n):
            self.n, self.epoch = n, None

        def skip_first_batches(self, done):
            return Stream(self.n - done)

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter([(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))] * self.n)

    class Acc:
        device, num_processes = torch.device("cpu"), 1

        def skip_first_batches(self, *a):
            raise AssertionError("Accelerate's skip reads an endless stream")

        def autocast(self):
            import contextlib
            return contextlib.nullcontext()

        def backward(self, loss):
            loss.backward()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x, return_features=False):
            out = x.mean((1, 2, 3))[:, None] * self.w
            return torch.cat([out, -out], 1), out

    model = Model()
    progress = SimpleNamespace(step_in_epoch=3, global_step=3, epoch=0)
    parts = SimpleNamespace(model=model, loss_fn=lambda l, y, f: l.sum() * 0 + model.w.sum(), progress=progress,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_loader=Stream(5), augment=None,
                            mix=None, ema=None, teacher=None, writer=None, lr_control=SimpleNamespace(step=lambda s: 0.1),
                            cfg=SimpleNamespace(log_every=100, freeze_bn=False, channels_last=False))
    loop.train_one_epoch(parts, Acc())
    assert progress.step_in_epoch == 5


def _write_tar(path, samples):
    with tarfile.open(path, "w") as t:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_members_and_a_truncated_shard_are_skipped_and_counted(shards, tmp_path, capfd, workers):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    first = bad / "train-000000.tar"
    members = _members(first)
    keys = sorted(members)
    rows = []
    for i, k in enumerate(keys):
        m = dict(members[k])
        if i == 0:
            m.pop("jpg")  # a sample without its photo
        if i == 1:
            m["jpg"] = b"\xff\xd8\xff" + b"garbage" * 10  # a photo that does not decode
        rows += [(f"{k}.{ext}", v) for ext, v in sorted(m.items())]
    _write_tar(first, rows)
    second = bad / "train-000001.tar"
    second.write_bytes(second.read_bytes()[:3000])  # a shard cut off in its middle
    cfg = _cfg(bad, batch_size=4)
    split = shard_inputs.prepare_shards(cfg, RunDir.open(tmp_path / "r", resuming=False, is_main=True))
    loader = _rank_loader(split, cfg, 0, 1, workers)
    assert sum(1 for _ in loader) == len(loader)  # the epoch keeps its length
    err = capfd.readouterr().err
    assert "shards: skipped" in err and "unreadable or incomplete shard member(s) skipped in this epoch" in err
    assert loader.dataset.bad_count() >= 3


def test_a_rank_whose_shards_yield_nothing_stops_with_one_line(shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    for p in bad.glob("train-*.tar"):
        p.write_bytes(b"not a tar at all")
    cfg = _cfg(bad, batch_size=4)
    split = shard_inputs.prepare_shards(cfg, RunDir.open(tmp_path / "r", resuming=False, is_main=True))
    with pytest.raises(MineralNetError, match="yields a sample"):
        list(_rank_loader(split, cfg, 0, 1))


def test_missing_info_other_version_and_missing_shard_are_one_line(shards, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(shards, other)
    info = json.loads((other / "_info.json").read_text())
    (other / "_info.json").write_text(json.dumps(dict(info, format="mineralnet-shards/0", version="0.0.1")))
    with pytest.raises(MineralNetError, match=r"format 'mineralnet-shards/0' \(written by MineralNet 0.0.1\).*again"):
        shard_inputs.prepare_shards(_cfg(other), RunDir.open(tmp_path / "a", resuming=False, is_main=True))
    (other / "_info.json").write_text("{ not json")
    with pytest.raises(MineralNetError, match="cannot read the shard description"):
        shard_inputs.prepare_shards(_cfg(other), RunDir.open(tmp_path / "b", resuming=False, is_main=True))
    gone = tmp_path / "gone"
    shutil.copytree(shards, gone)
    (gone / "val-000000.tar").unlink()
    with pytest.raises(MineralNetError, match="val-000000.tar listed in .* is missing"):
        shard_inputs.prepare_shards(_cfg(gone), RunDir.open(tmp_path / "c", resuming=False, is_main=True))


def test_options_shards_cannot_honour_are_one_line(shards, tmp_path):
    for kw, match in ((dict(folds=3), "fixed train/val split; drop --folds"),
                      (dict(sampling="balanced"), "--sampling uniform with shards"),
                      (dict(augment_on="device"), "--augment-on workers")):
        with pytest.raises(MineralNetError, match=match):
            shard_inputs.prepare_shards(_cfg(shards, **kw), RunDir.open(tmp_path / "r", resuming=False, is_main=True))


def test_a_pipe_spec_finds_its_info_and_trains_on_the_shards_it_names(shards, tmp_path):
    spec = f"pipe:cat {shards}/train-{{000000..000002}}.tar"
    assert mshards.is_shard_source(spec) and mshards.is_shard_source(shards)
    assert not mshards.is_shard_source(shards.parent.parent) and not mshards.is_shard_source(None)
    split = shard_inputs.prepare_shards(_cfg(spec), RunDir.open(tmp_path / "r", resuming=False, is_main=True))
    assert split.train_urls == [f"pipe:cat {shards}/train-00000{i}.tar" for i in range(3)]
    assert split.n_train == 15 and split.val_urls == [f"pipe:cat {shards}/val-00000{i}.tar" for i in range(2)]
    with pytest.raises(MineralNetError, match="not a shard of the training set"):
        shard_inputs.prepare_shards(_cfg(f"pipe:cat {shards}/val-000000.tar"),
                            RunDir.open(tmp_path / "s", resuming=False, is_main=True))


def test_shards_given_where_photos_are_needed_say_what_to_pass(photos, shards, tmp_path, capsys):
    with pytest.raises(MineralNetError, match="needs the original photos.*" + str(Path(photos).name)):
        mdata.scan_dataset(shards)
    assert cli_main(["cv", "--data", str(shards), "--out", str(tmp_path / "cv"), "--folds", "2"]) == 2
    err = capsys.readouterr().err
    assert "folder of WebDataset shards" in err and len(err.strip().splitlines()) == 1
    from mineralnet.model import FusionNet
    from mineralnet.artifact import model_meta, save_model

    model = FusionNet("resnet18", (2, 4), 3)
    save_model(tmp_path / "run", model, model_meta(model, classes=["malachite", "pyrite", "quartz"], image_size=32,
                                                   mean=[.5] * 3, std=[.2] * 3, resize=37))
    for argv in (["eval", str(tmp_path / "run"), "--data", str(shards)], ["data", "check", str(shards)],
                 ["calibrate", str(shards)]):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "WebDataset shards" in err and len(err.strip().splitlines()) == 1, (argv, err)


# ---- training ------------------------------------------------------------------------------------------

TINY = ["--config", "base", "--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--optimizer", "sgd", "--lr", "0.05", "--scheduler", "none", "--precision", "fp32", "--normalize", "dataset",
        "--seed", "3"]


def _env(tmp_path):
    env = dict(os.environ, MINERALNET_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_training_from_shards(shards, photos, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), TRAIN, "--data", str(shards), "--out", str(out), "--epochs", "2", *TINY]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    # every epoch has the folder path's length: training photos // 8 global steps of 8 photos
    n_train = json.loads((shards / "_info.json").read_text())["splits"]["train"]["num_samples"]
    assert all(l["img_per_s"] * l["seconds"] == pytest.approx(n_train // 8 * 8) for l in lines)
    assert (out / "calibration.json").is_file()  # calibrated on the original photos named in split.json


def _rank_main(rank, world, port, shards, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    warnings.simplefilter("ignore")
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from mineralnet.infer.loop import evaluate

    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    cfg = _cfg(shards, batch_size=8)
    run = RunDir.open(Path(out) / "run", resuming=False, is_main=acc.is_main_process)
    split = shard_inputs.prepare_shards(cfg, run)
    train_loader, val_loader = shard_inputs.build_shard_loaders(cfg, split)
    model = torch.nn.Conv2d(3, 3, 32)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = model

        def forward(self, x, return_features=False):
            logits = self.conv(x).flatten(1)
            return logits, logits

    net, train_loader, val_loader = acc.prepare(Net(), train_loader, val_loader)
    result = {}
    for epoch in (0, 1):
        train_loader.set_epoch(epoch)
        steps = sum(1 for _ in train_loader)
        result[epoch] = (steps, sorted(train_loader.dataset.opened))
        train_loader.dataset.opened.clear()
    ev = evaluate(net, val_loader, acc)
    result["val"] = sorted(ev["targets"].tolist())
    result["val_expected"] = sorted(y for _, y in split.val)
    with open(f"{out}/res.{rank}", "w") as f:
        f.write(repr(result))
    acc.end_training()


@pytest.mark.slow
def test_ddp_ranks_step_together_on_disjoint_shards_and_validate_every_photo_once(shards, tmp_path):
    import ast

    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(2, _free_port(), str(shards), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    r0, r1 = (ast.literal_eval((tmp_path / f"res.{r}").read_text()) for r in range(2))
    n_train = json.loads((shards / "_info.json").read_text())["splits"]["train"]["num_samples"]
    for epoch in (0, 1):
        assert r0[epoch][0] == r1[epoch][0] == n_train // 8
        assert not set(r0[epoch][1]) & set(r1[epoch][1])
    assert r0["val"] == r0["val_expected"] and r1["val"] == r0["val"]
