"""Quantization-aware fine-tuning (`train --qat RUN`): the fake quantization against onnxruntime's own range
formulas and against its QDQ model of the same network, the conv -> BatchNorm pairs of two timm families, the plain
weights a QAT model saves, and a tiny run end to end (fine-tune, resume, eval/export, the refusals)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from mineralnet import data as mdata
from mineralnet.artifact import load_model, model_meta, plain_key, save_model
from mineralnet.cli import main as cli_main
from mineralnet.errors import MineralNetError
from mineralnet.model import FusionNet
from mineralnet.quantize import qat as q
from mineralnet.runs import read_split


@pytest.mark.parametrize("lo,hi", [(-0.3, 5.0), (0.0, 6.0), (0.2, 3.0), (-2.5, -0.1), (-1.0, 1.0)])
def test_activation_range_is_onnxruntimes_minmax(lo, hi):
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    zero, scale = compute_scale_zp(np.float32(min(lo, 0)), np.float32(max(hi, 0)), np.uint8(0), np.uint8(255))
    got_scale, got_zero = q.act_qparams(lo, hi)
    assert got_scale == pytest.approx(float(scale), rel=1e-6) and got_zero == int(zero)


@pytest.mark.parametrize("reduce_range,qmax", [(True, 64), (False, 127)])
def test_folded_weight_is_quantized_per_channel_as_the_export_does(reduce_range, qmax):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    lo, hi = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=reduce_range, symmetric=True)
    assert (int(lo), int(hi)) == (-qmax, qmax) == (-q.weight_qmax(reduce_range), q.weight_qmax(reduce_range))
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(4, 6, 3, bias=False), torch.nn.BatchNorm2d(6).eval()
    bn.weight.data, bn.running_var = torch.randn(6) * 2, torch.rand(6) * 3 + 0.1
    fq = q.FoldedWeightFQ(bn, qmax)
    w = conv.weight.detach().double().numpy()
    g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()[:, None, None, None]
    folded = w * g  # by hand: what the exported (BN-folded) convolution holds, quantized per output channel
    scale = np.abs(folded).reshape(6, -1).max(1)[:, None, None, None] / qmax
    expected = np.clip(np.round(folded / scale), -qmax, qmax) * scale
    got = (fq(conv.weight).detach().double().numpy()) * g  # BN multiplies by g again: the folded int8 weight
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # the rounding passes its gradient straight through
    w_ = conv.weight.detach().clone().requires_grad_()
    fq(w_).sum().backward()
    np.testing.assert_allclose(w_.grad.numpy(), np.ones_like(w_.grad.numpy()), rtol=1e-5)


def test_conv_bn_pairs_of_a_resnet_and_an_efficientnet():
    res = FusionNet("resnet18", (2, 4), 3).backbone
    pairs = q.trace(res, 32)[0]
    assert pairs["conv1"] == "bn1" and pairs["layer1.0.conv2"] == "layer1.0.bn2"
    assert pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert len(pairs) == sum(isinstance(m, torch.nn.Conv2d) for m in res.modules()) and None not in pairs.values()
    eff = FusionNet("tf_efficientnet_lite0", (2, 4), 3).backbone
    pairs = q.trace(eff, 64)[0]
    assert pairs["conv_stem"] == "bn1" and pairs["blocks.1.0.conv_dw"] == "blocks.1.0.bn2"
    assert pairs["blocks.1.0.conv_pwl"] == "blocks.1.0.bn3"
    assert len(pairs) == sum(isinstance(m, torch.nn.Conv2d) for m in eff.modules()) and None not in pairs.values()


def _sqnr(ref, x):
    return 10 * np.log10((ref ** 2).sum() / max(((ref - x) ** 2).sum(), 1e-30))


@pytest.mark.parametrize("backbone,size", [("resnet18", 32), ("tf_efficientnet_lite0", 64)])
def test_the_simulation_makes_onnxruntimes_int8_error(backbone, size):
    """The point of QAT: training sees the error the export's int8 file will make. Against the float model, the
    simulated int8 model comes within 0.75 dB of logit SQNR of onnxruntime's QDQ model of the same network (7-bit
    weights, as on a CPU without VNNI); simulating 8-bit weights instead misses it by more (measured: 0.16/0.04 dB
    against 1.8/2.3 dB). On a trained student the simulation also reproduces which way the logits move: 28.9 dB
    between the simulated and onnxruntime's int8 logits (docs/RESULTS.md, "Quantization-aware fine-tuning")."""
    import copy

    from mineralnet.export.onnx import onnx_proto
    from mineralnet.quantize import graph as g, recipe as rc

    torch.manual_seed(0)
    base = FusionNet(backbone, (2, 4), 5).eval()
    rng = np.random.default_rng(0)
    calib, test = (rng.normal(size=(n, 3, size, size)).astype(np.float32) for n in (32, 48))
    pre = rc.preprocess(onnx_proto(base, image_size=size, outputs=("logits",), dynamic=True))
    fp32 = g.logits(g.session(pre), test)
    ort = _sqnr(fp32, g.logits(g.session(rc.quantize(pre, calib, rc.Recipe(reduce_range=True))), test))
    sim = {}
    for bits in (7, 8):
        model = copy.deepcopy(base)
        qat = q.attach(model, reduce_range=bits == 7, image_size=size)
        qat.calibrate(torch.from_numpy(calib).split(16))
        with torch.no_grad():
            sim[bits] = _sqnr(fp32, model(torch.from_numpy(test)).numpy())
        qat.detach()  # taking the wrappers off gives the float model back
        with torch.no_grad():
            np.testing.assert_allclose(model(torch.from_numpy(test)).numpy(), fp32, rtol=1e-4, atol=1e-4)
    assert abs(sim[7] - ort) < 0.75, (sim, ort)
    assert sim[8] - ort > 0.75, (sim, ort)


def test_a_qat_model_saves_and_loads_as_the_plain_model(tmp_path):
    assert plain_key("backbone.conv1.parametrizations.weight.original") == "backbone.conv1.weight"
    assert plain_key("backbone.bn1.running_mean") == "backbone.bn1.running_mean"
    torch.manual_seed(0)
    model = FusionNet("resnet18", (2, 4), 3).eval()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    qat = q.attach(model, reduce_range=True, image_size=32)
    assert any(".parametrizations." in k for k in model.state_dict())
    assert {plain_key(k) for k in model.state_dict()} == plain.keys()
    save_model(tmp_path, model, model_meta(model, classes=["a", "b", "c"], image_size=32, mean=[0.5] * 3,
                                           std=[0.25] * 3, resize=36, metrics={}))
    loaded, _ = load_model(tmp_path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, plain[k]), k
    qat.detach()
    assert model.state_dict().keys() == plain.keys()
    fresh = q.attach(model, reduce_range=True, image_size=32)  # a range must be observed before it quantizes
    with pytest.raises(MineralNetError, match="never observed"):
        fresh.acts["in:backbone.conv1"](torch.zeros(1))


# ----------------------------------------------------------------------------- end to end
TINY = ["--config", "demo", "--backbone", "resnet18", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--precision", "fp32", "--split-seed", "0", "--val-split", "0.3", "--image-size", "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    data = str(mdata.make_demo_dataset(root / "demo", classes=3, per_class=10, size=48, seed=3))
    run = root / "run"
    assert cli_main(["train", "--data", data, "--out", str(run), "--seed", "1", *TINY]) == 0
    return root, data, run


def test_qat_fine_tunes_a_run_into_a_normal_run(trained, tmp_path, monkeypatch):
    root, data, run = trained
    out = tmp_path / "run-qat"
    assert cli_main(["train", "--qat", str(run), "--out", str(out), "--epochs", "1", "--qat-bits", "7"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["qat"] == str(run) and cfg["freeze_bn"] and cfg["epochs"] == 1
    assert cfg["teacher"] == str(run) and cfg["kd_weight"] == 1.0  # it learns the run's own float answers
    assert cfg["lr"] == pytest.approx(0.002 / 20)  # the demo preset's lr, at the fine-tune's fraction
    saved = json.loads((out / q.QAT_FILE).read_text())
    assert saved["weight_qmax"] == 64 and saved["convs"] == 20 and len(saved["ranges"]) == saved["activations"]
    result = json.loads((out / "result.json").read_text())
    assert 0 <= result["best"]["simulated_int8_top1"] <= 1 and "qat" in json.loads((out / "model.json").read_text())
    # the same held-out photos as the run it came from, and plain weights that differ from its
    assert read_split(out)["splits"]["val"] == read_split(run)["splits"]["val"]
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(run / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert not torch.equal(a.get_tensor("backbone.conv1.weight"), b.get_tensor("backbone.conv1.weight"))
    # a resume reads the ranges back instead of calibrating again
    monkeypatch.setattr(q.Qat, "calibrate", lambda *a, **k: pytest.fail("calibrated again on resume"))
    assert cli_main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert json.loads((out / "result.json").read_text())["best"]["epoch"] in (1, 2)
    # eval and export treat it as any run
    assert cli_main(["eval", str(out), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    assert cli_main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    assert list((tmp_path / "exp").glob("*.onnx"))


@pytest.mark.parametrize("flags,message", [
    (["--qat-bits", "6"], "--qat-bits 6 must be 7 or 8"),
    (["--no-freeze-bn"], "needs --freeze-bn"),
    (["--split-seed", "1"], "validate on other photos"),
])
def test_qat_refusals_are_one_line(trained, tmp_path, capsys, flags, message):
    root, data, run = trained
    code = cli_main(["train", "--qat", str(run), "--out", str(tmp_path / "q"), *flags])
    err = capsys.readouterr().err
    assert code != 0 and message in err, err


def test_qat_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["train", "--qat", str(tmp_path / "empty"), "--out", str(tmp_path / "q")]) != 0
    assert "is not a run folder" in capsys.readouterr().err
    assert cli_main(["train", "--qat-bits", "7", "--data", str(tmp_path), "--out", str(tmp_path / "q")]) != 0
    assert "--qat-bits needs --qat RUN" in capsys.readouterr().err
