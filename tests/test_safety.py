"""Runs and photo folders from elsewhere (issue 15): no code execution, no hangs, clear refusals."""
import shutil
from pathlib import Path

import pytest
import torch

from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.errors import MineralNetError

TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0",
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
    with pytest.raises(MineralNetError, match="pickled objects"):
        FusionNet("resnet18", (2, 4), 3, pretrained=str(bad))
    assert not marker.exists()
    # a plain state dict (torch or safetensors) still loads, classifier filtered as before
    from safetensors.torch import save_file
    ref = FusionNet("resnet18", (2, 4), 3)
    sd = {k: v.clone() for k, v in ref.backbone.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "w2.pth")
    for f in ("w.safetensors", "w2.pth"):
        m = FusionNet("resnet18", (2, 4), 3, pretrained=str(tmp_path / f))
        got = m.backbone.state_dict()
        assert all(torch.equal(got[k], sd[k]) for k in sd)
