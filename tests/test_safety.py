"""Runs and photo folders from elsewhere (issue 15): no code execution, no hangs, clear refusals."""
import shutil
from pathlib import Path

import pytest
import torch

from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.errors import MineralNetError

TINY = ["--config", "base", "--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--optimizer", "sgd", "--lr", "0.05", "--scheduler", "none", "--precision", "fp32",
        "--normalize", "imagenet", "--seed", "3"]


class _Plant:
    """Unpickling this creates `path` (a harmless stand-in for running code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(mdata.make_demo_dataset(tmp_path_factory.mktemp("demo"), classes=3, per_class=8, size=40, seed=1))


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "r"
    assert cli_main(["train", "--data", tiny_data, "--out", str(run), "--epochs", "1", *TINY]) == 0
    return run


def _copy(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def _err(capsys, argv):
    code = cli_main(argv)
    e = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and e and e[-1].startswith("mineralnet: error:"), (code, e)
    return e[-1]


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "extra.pkl"])
def test_planted_pickle_in_state_is_refused_and_never_unpickled(trained_run, tmp_path, capsys, name):
    run, marker = _copy(trained_run, tmp_path), tmp_path / "marker"
    torch.save({"x": _Plant(marker)}, run / "state" / name)
    torch.load(run / "state" / name, weights_only=False)["x"].close()  # the plant works when unpickled ...
    assert marker.exists()
    marker.unlink()
    line = _err(capsys, ["train", "--resume", str(run), "--epochs", "2"])
    assert not marker.exists()  # ... and resuming does not unpickle it
    assert name in line and "trust" in line


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors", "progress.json", "random_states_0.pkl"])
def test_truncated_checkpoint_file_is_one_line_naming_it(trained_run, tmp_path, capsys, name):
    run = _copy(trained_run, tmp_path)
    f = run / "state" / name
    assert f.is_file(), sorted(p.name for p in (run / "state").iterdir())
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    line = _err(capsys, ["train", "--resume", str(run), "--epochs", "2"])
    assert name in line and "damaged" in line


def test_pretrained_file_is_read_without_unpickling_objects(tmp_path):
    from mineralnet.model import FusionNet

    marker, bad = tmp_path / "marker", tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Plant(marker)}, bad)
    with pytest.raises(MineralNetError, match="refusing to unpickle"):
        FusionNet("resnet18", (2, 4), 3, pretrained=str(bad))
    assert not marker.exists()
    # a plain state dict (torch or safetensors) still loads, classifier filtered as before
    from safetensors.torch import save_file
    import timm

    full = {k: v.clone() for k, v in timm.create_model("resnet18").state_dict().items()}  # a timm weights file
    save_file(full, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": full}, tmp_path / "w2.pth")
    for f in ("w.safetensors", "w2.pth"):
        m = FusionNet("resnet18", (2, 4), 3, pretrained=str(tmp_path / f))
        got = m.backbone.state_dict()
        assert got and all(torch.equal(got[k], full[k]) for k in got if k in full)


# ----------------------------------------------------------------------------- photos from elsewhere
def _photo_dir(tmp_path, n=3):
    import numpy as np
    from PIL import Image

    root = tmp_path / "photos"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(root / c / f"ok{i}.jpg")
    return root


def _data_check(root, tmp_path):
    import os
    import subprocess
    import sys

    code = "import sys; from mineralnet.cli import main; sys.exit(main(['data', 'check', sys.argv[1]]))"
    return subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)


def test_fifo_and_device_photos_are_reported_not_read(tmp_path):
    import os

    root = _photo_dir(tmp_path)
    os.mkfifo(root / "a" / "pipe.jpg")
    os.symlink("/dev/zero", root / "b" / "zero.jpg")
    p = _data_check(root, tmp_path)  # would hang (FIFO) or exhaust memory (/dev/zero) if opened and read
    assert p.returncode == 1, p.stderr[-2000:]
    lines = [l for l in p.stdout.splitlines() if "not a regular file" in l]
    assert len(lines) == 2 and any("pipe.jpg" in l for l in lines) and any("zero.jpg" in l for l in lines)


def test_strip_eps_and_unsupported_formats_are_refused_with_reasons(tmp_path, monkeypatch):
    import subprocess

    import numpy as np
    from PIL import Image

    from mineralnet.data import decode
    from mineralnet.data.scan import scan_dataset

    root = _photo_dir(tmp_path)
    Image.fromarray(np.zeros((1, 4000, 3), np.uint8)).save(root / "a" / "strip.png")
    Image.fromarray(np.zeros((210, 10, 3), np.uint8)).save(root / "a" / "tall.png")  # 21:1
    Image.fromarray(np.zeros((200, 10, 3), np.uint8)).save(root / "a" / "edge.png")  # 20:1 is allowed
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "b" / "first.gif")  # GIF: first frame is read
    (root / "b" / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\nshowpage\n")
    (root / "b" / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(40))
    calls = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError))
    index = scan_dataset(root)
    bad = {Path(p).name: r for p, r in index.bad}
    assert set(bad) == {"strip.png", "tall.png", "eps.jpg", "phone.heic"}, bad
    assert "20x" in bad["strip.png"] and "20x" in bad["tall.png"]
    assert "EPS" in bad["eps.jpg"] and "JPEG, PNG" in bad["eps.jpg"]
    assert ".heic" in bad["phone.heic"] and "convert" in bad["phone.heic"]
    assert not calls  # no external program (Ghostscript) was started
    names = {Path(p).name for p, _ in index.samples}
    assert {"edge.png", "first.gif"} <= names
    assert decode.load_image(root / "b" / "first.gif").shape == (40, 40, 3)


def test_photo_size_cap(tmp_path, monkeypatch):
    from mineralnet.data import decode

    root = _photo_dir(tmp_path)
    f = root / "a" / "ok0.jpg"
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", f.stat().st_size - 1)
    assert "MB limit" in decode.verify_image(f)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", f.stat().st_size)
    assert decode.verify_image(f) is None


def test_duplicate_manifest_rows_are_used_once_or_refused(tmp_path):
    from mineralnet.data.scan import scan_dataset

    root = _photo_dir(tmp_path)
    csv = root / "m.csv"
    csv.write_text("path,label\na/ok0.jpg,a\nb/ok0.jpg,b\n./a/ok0.jpg,a\nb/ok1.jpg,b\n")
    with pytest.warns(UserWarning, match="1 duplicate row"):
        index = scan_dataset(csv)
    assert sorted(Path(p).parent.name + "/" + Path(p).name for p, _ in index.samples) == \
        ["a/ok0.jpg", "b/ok0.jpg", "b/ok1.jpg"]
    csv.write_text("path,label\na/ok0.jpg,a\nb/ok0.jpg,b\na/ok0.jpg,b\n")
    with pytest.raises(MineralNetError, match="line 4.*labelled 'b'.*line 2"):
        scan_dataset(csv)


def test_resume_keeps_the_saved_split_and_reports_added_and_removed_photos(tmp_path, capsys):
    import json

    data = Path(mdata.make_demo_dataset(tmp_path / "d", classes=3, per_class=8, size=40, seed=2))
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY]) == 0
    before = (run / "split.json").read_text()
    doc = json.loads(before)
    val0 = doc["splits"]["val"][0][0]
    (data / val0).unlink()  # one validation photo removed, two photos added
    for i, f in enumerate(sorted(data.glob("*/*.jpg"))[:2]):
        shutil.copy(f, f.with_name(f"new{i}.jpg"))
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 photo(s)" in out and "new since" in out and "1 photo(s) of the run's split are missing" in out
    assert (run / "split.json").read_text() == before  # never re-split
    n_train, n_val = len(doc["splits"]["train"]), len(doc["splits"]["val"]) - 1
    assert f"on {n_train} photos, validating on {n_val}" in out


HOLD = "import sys, time; from mineralnet.runs import RunDir; r = RunDir.open(sys.argv[1], resuming=False, " \
       "is_main=True); print('held', flush=True); time.sleep(600)"


def test_one_owner_per_run_folder(tiny_data, tmp_path, capsys):
    import os
    import subprocess
    import sys

    from mineralnet.analysis.crossval import cross_validate

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _err(capsys, ["train", "--data", tiny_data, "--out", str(run), "--epochs", "1", *TINY])
        assert f"in use by process {holder.pid}" in line
        with pytest.raises(MineralNetError, match=f"in use by process {holder.pid}"):
            cross_validate({"data": tiny_data, "out": str(run)}, folds=2)
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its holder; then a run starts normally into that folder
    assert cli_main(["train", "--data", tiny_data, "--out", str(run), "--epochs", "1", *TINY]) == 0
    assert (run / ".lock").read_text().strip() == str(os.getpid())


def test_non_empty_folder_that_is_not_a_run_is_refused(tiny_data, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "state").mkdir(parents=True)
    (mine / "notes.txt").write_text("my own files")
    line = _err(capsys, ["train", "--data", tiny_data, "--out", str(mine), "--epochs", "1", *TINY])
    assert "not a run" in line and "notes.txt" in line
    assert (mine / "notes.txt").is_file() and (mine / "state").is_dir()


def test_torn_metrics_line_is_tolerated_and_repaired_on_resume(trained_run, tmp_path, capsys):
    import json

    from mineralnet.runs import read_metrics

    run = _copy(trained_run, tmp_path)
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(good + '{"epoch": 2, "lr": 0.0')  # a kill during the append
    assert read_metrics(run) == [json.loads(good)]
    assert cli_main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    assert all(json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines())
    (run / "metrics.jsonl").write_text('{"epoch": 1\n' + good)  # damage in the middle is not guessed at
    with pytest.raises(MineralNetError, match="line 1 is not JSON"):
        read_metrics(run)


@pytest.mark.slow
def test_signal_to_the_whole_process_group_with_workers_saves_state(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    # enough photos that the workers are alive for most of an epoch (they are not kept between epochs)
    data = mdata.make_demo_dataset(tmp_path / "d", classes=3, per_class=60, size=40, seed=1)
    out = tmp_path / "run"
    args = [sys.executable, str(root / "launch" / "train.py"), "--data", str(data), "--out", str(out),
            "--epochs", "200", *TINY, "--workers", "2"]
    p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (out / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert (out / "metrics.jsonl").exists(), p.communicate()[1][-2000:]
    time.sleep(2.0)
    os.killpg(p.pid, signal.SIGTERM)  # every process of the group: main and its DataLoader workers
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr[-2000:]
    assert "state saved" in stdout
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"


def test_loading_a_model_never_reaches_the_network(tmp_path, monkeypatch):
    import json
    import socket

    from mineralnet.model import FusionNet
    from mineralnet.artifact import load_model, model_meta, save_model

    def no_network(*a, **k):
        raise AssertionError("network access while loading a model")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    m = FusionNet("resnet18", (2, 4), 3)
    meta = model_meta(m, classes=["a", "b", "c"], image_size=32, mean=[.5] * 3, std=[.2] * 3, resize=37)
    save_model(tmp_path, m, meta)
    assert load_model(tmp_path)[1]["backbone"] == "resnet18"  # built with pretrained=False, offline
    meta["backbone"] = "hf-hub:someone/resnet18"
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(MineralNetError, match="offline"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- validation at the door
@pytest.mark.parametrize("flags,expected", [
    (["--log-every", "0"], "--log-every 0 must be at least 1"),
    (["--seed", "-1"], "--seed -1 must be >= 0"),
    (["--split-seed", "-2"], "--split-seed -2 must be >= 0"),
    (["--backbone", "resnet5O"], "--backbone 'resnet5O' is not a timm architecture"),
])
def test_config_values_that_would_fail_later_are_refused_up_front(tiny_data, tmp_path, capsys, flags, expected):
    args = ["train", "--data", tiny_data, "--out", str(tmp_path / "r"), "--epochs", "1", *TINY, *flags]
    assert expected in _err(capsys, args)
    assert not (tmp_path / "r").exists()


def test_known_backbone_names_pass_validation():
    from mineralnet.config import load_config

    for name in ("resnet50", "resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k"):
        load_config(None, backbone=name).validate()


@pytest.fixture(scope="module")
def small_export_run(tmp_path_factory):
    from mineralnet.model import FusionNet
    from mineralnet.artifact import model_meta, save_model

    root = tmp_path_factory.mktemp("export")
    photos = mdata.make_demo_dataset(root / "photos", classes=3, per_class=4, size=40, seed=4)
    torch.manual_seed(0)
    m = FusionNet("resnet18", (2, 4), 3).eval()
    meta = model_meta(m, classes=sorted(p.name for p in Path(photos).iterdir() if p.is_dir()), image_size=32,
                      mean=[.5] * 3, std=[.25] * 3, resize=37)
    save_model(root / "run", m, meta)
    return root / "run", photos


@pytest.mark.parametrize("flags,expected", [
    (["--dynamic", "--max-batch", "0"], "--max-batch 0 must be at least 1"),
    (["--dynamic", "--min-batch", "-1"], "--min-batch -1 must be at least 1"),
    (["--batch", "0"], "--batch 0 must be at least 1"),
    (["--int8-gate", "drop=3,bound=2"], "bound (2) must be at least drop (3)"),
    (["--int8-gate", "agreement=0.9"], "--int8-gate 'agreement=0.9': write comma-separated KEY=NUMBER"),
])
def test_export_gate_and_batch_flags_are_checked(small_export_run, tmp_path, capsys, flags, expected):
    from mineralnet.cli import export_main

    run, _ = small_export_run
    assert export_main([str(run), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "o").exists()


def test_int8_gate_flag_and_a_failed_gate_writes_no_int8_model(small_export_run, tmp_path):
    import argparse

    from mineralnet.export import ExportOptions, export
    from mineralnet.export.cli import add_arguments, options_from_args

    run, photos = small_export_run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    o = options_from_args(parser.parse_args([str(run), "--int8-gate", "drop=0.5,bound=1.5", "--int8-fallback", "auto",
                                                  "--int8-min-share", "0.7"]))
    assert (o.int8_gate, o.int8_fallback, o.int8_min_share) == ("drop=0.5,bound=1.5", "auto", 0.7)
    # a gate no model can pass (bound 0: even zero flips leave the Wilson asymmetry above it): one line naming the
    # drop, its bound and the report, and no int8 file
    opts = ExportOptions(out_dir=tmp_path / "o", quant_data=photos, quant_size=8, int8_gate="drop=0,bound=0")
    with pytest.raises(MineralNetError, match=r"int8 gate FAILED, no int8 file written: accuracy drop .* upper bound "
                                              r".*report: .*model\.int8\.report\.md"):
        export(run, ["int8"], opts)
    assert not (tmp_path / "o" / "model.int8.onnx").exists() and (tmp_path / "o" / "model.int8.report.md").is_file()
    opts.int8_gate, opts.out_dir = "drop=100,bound=100", tmp_path / "o2"  # 100 points: nothing can fail it
    export(run, ["int8"], opts)
    assert (tmp_path / "o2" / "model.int8.onnx").is_file()


def test_int8_fallback_floor_refuses_a_mostly_float_model_and_says_so(small_export_run, tmp_path):
    """--int8-min-share 1: the fallback may float nothing, so a gate that fails stays failed; the error line names
    the floor and the flag, and the report records that the floor stopped the walk. Out-of-range shares are
    refused before anything is written."""
    import json

    from mineralnet.export import ExportOptions, export

    run, photos = small_export_run
    for bad in (-0.1, 1.5):
        with pytest.raises(MineralNetError, match=r"--int8-min-share .*from 0 to 1"):
            export(run, ["int8"], ExportOptions(out_dir=tmp_path / "bad", int8_min_share=bad))
    assert not (tmp_path / "bad").exists()
    # 4 of the 8 non-held-out photos calibrate, the other 4 rank the nodes (the fallback needs ranking photos)
    opts = ExportOptions(out_dir=tmp_path / "o", quant_data=photos, quant_size=4, int8_gate="drop=0,bound=0",
                         int8_min_share=1.0)
    with pytest.raises(MineralNetError, match=r"FAILED, no int8 file written: .*stopped at the 100% floor of MACs "
                                              r"in int8 \(--int8-min-share"):
        export(run, ["int8"], opts)
    report = json.loads((tmp_path / "o" / "model.int8.report.json").read_text())
    assert report["fallback"]["floated"] == [] and report["fallback"]["stopped_by_floor"] is True
    assert report["fallback"]["int8_mac_share"] == report["fallback"]["full_int8_mac_share"]


def test_data_check_reports_byte_identical_photos_within_and_across_classes(tmp_path, capsys):
    import shutil

    from mineralnet import data as mdata
    from mineralnet.cli import main

    demo = mdata.make_demo_dataset(tmp_path / "d", classes=2, per_class=3, size=32, seed=3)
    a, b = sorted(p.name for p in demo.iterdir() if p.is_dir())[:2]
    src = sorted((demo / a).iterdir())[0]
    shutil.copy(src, demo / b / "copy-across.png")  # the same bytes filed under another mineral
    shutil.copy(src, demo / a / "copy-within.png")
    main(["data", "check", str(demo)])
    out = capsys.readouterr().out
    assert "byte-identical photos: 1 group(s), 1 of them filed under more than one class" in out
    assert "copy-across.png" in out and "copy-within.png" in out
    groups = mdata.identical_groups(mdata.scan_dataset(demo).samples)
    assert len(groups) == 1 and len(groups[0]) == 3


def test_predict_on_a_folder_reports_photos_in_formats_it_does_not_read(tmp_path, capsys):
    from PIL import Image

    from mineralnet.infer.cli import expand_images

    Image.new("RGB", (40, 40), (120, 60, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "b.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    assert expand_images([str(tmp_path)]) == [str(tmp_path / "a.jpg")]
    err = capsys.readouterr().err
    assert "b.heic" in err and "not read" in err
