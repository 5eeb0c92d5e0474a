"""Every export format on a calibrated run (what `mineralnet train` writes by default: the run's
open-set calibration with the default detector), through the same gates.

Before issue 27, `mineralnet-export RUN --openvino` stopped with a TypeError on every calibrated run
(the OpenVINO parity check called the PyTorch reference without the run's detector); the ONNX
formats worked. Here one export writes onnx, fp16, int8, openvino and triton from a calibrated run,
the CLI command of the defect runs as printed, TensorRT runs through the fake builder of
test_tensorrt.py, and the phone rows (tflite, executorch; when their packages are installed) go
through the same gates with the novelty output.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

sys.path.insert(0, str(Path(__file__).parent))
from test_export import CLASSES, MEAN, RESIZE, SIZE, STD, _photos, _preprocess, _probe_model  # noqa: E402
from test_tensorrt import DEVICE, FakeTensorRT  # noqa: E402

from mineralnet.calibration import Calibration, calibrate_run  # noqa: E402
from mineralnet.data import make_demo_dataset  # noqa: E402
from mineralnet.errors import MineralNetError  # noqa: E402
from mineralnet.export import BatchProfile, ExportOptions, export  # noqa: E402
from mineralnet.export import gates as xgates  # noqa: E402
from mineralnet.export import onnx as xonnx  # noqa: E402
from mineralnet.export import openvino as xov  # noqa: E402
from mineralnet.export import tensorrt as xtrt  # noqa: E402
from mineralnet.artifact import model_meta, save_model  # noqa: E402
from mineralnet.files import atomic_write_json  # noqa: E402

FLOAT_FILES = ("model.onnx", "model.fp16.onnx", "model.xml")
INT8_FILES = ("model.int8.onnx", "model.int8.xml")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", classes=3, per_class=10, size=96)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, photos):
    """A run with its split and the calibration training writes at its end (default detector)."""
    paths = _photos(photos)
    run = tmp_path_factory.mktemp("calibrated")
    model = _probe_model(paths)
    save_model(run, model, model_meta(model, classes=CLASSES, image_size=SIZE, mean=MEAN, std=STD, resize=RESIZE))
    train, val = paths[0::3] + paths[1::3], paths[2::3]
    rel = lambda ps: [str(Path(p).relative_to(photos)) for p in ps]  # noqa: E731
    atomic_write_json(run / "split.json", {"kind": "val_split", "root": str(photos), "classes": CLASSES,
                                           "train": rel(train), "val": rel(val)})
    calibrate_run(run, log=None)
    assert Calibration.load(run) is not None
    return run


@pytest.fixture(scope="module")
def exported(calibrated, photos, tmp_path_factory):
    """onnx + fp16 + int8 + openvino + triton of the calibrated run, in one export, fixed batch 2."""
    out, repo = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("triton")
    opts = ExportOptions(out_dir=out, quant_data=photos, quant_size=16, profile=BatchProfile.static(2),
                         triton_dir=repo, triton_kind="cpu", int8_gate="drop=100,bound=100")
    arts = export(calibrated, ["fp16", "int8", "openvino"], opts)
    return out, repo, {a.path.name: a for a in arts}


def test_every_cpu_format_is_written_with_the_novelty_output(exported):
    out, repo, arts = exported
    assert set(FLOAT_FILES + INT8_FILES) <= set(arts)
    assert {"mineralnet_onnx_fp32", "mineralnet_onnx_fp16", "mineralnet_onnx_int8"} <= {p.name for p in repo.iterdir()}
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["calibration"]["detector"] == Calibration.load(manifest["exported_from"]).detector
    for name in FLOAT_FILES + INT8_FILES:
        assert "novelty" in manifest["exports"][name]["outputs"], name
    assert xov.IRRunner(out / "model.xml").meta["calibration"]["threshold"] == manifest["calibration"]["threshold"]


def test_float_files_pass_the_same_parity_gate_on_every_output(exported):
    _, _, arts = exported
    for name in FLOAT_FILES:
        parity = arts[name].record["parity"]
        assert parity["passed"], name
        assert set(parity["max_abs_diff"]) == {"logits", "probs", "novelty"}, name
        assert parity["top1_equal"] == parity["top1_required"] > 0, name


def test_int8_files_pass_the_same_agreement_gate(exported):
    _, _, arts = exported
    for name in INT8_FILES:
        gate = arts[name].record["int8"]
        assert set(gate["agreement"]) == {"top1", "images", "source"}, name
        assert gate["agreement"]["top1"] >= 0.8 and gate["agreement"]["images"] > 0, name


def test_novelty_of_every_file_equals_the_calibration_in_numpy(calibrated, exported, photos):
    """The detector in the graph against Calibration.novelty (numpy, float64) on the files' own logits."""
    out, _, _ = exported
    cal = Calibration.load(calibrated)
    x = _preprocess(_photos(photos)[:6]).numpy()
    runs = {"model.onnx": xonnx.run_session(xonnx.ort_session(out / "model.onnx"), x),
            "model.xml": xov.IRRunner(out / "model.xml").run(x)}
    for name, got in runs.items():
        want = cal.novelty(got["logits"].astype(np.float64), None)
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got["novelty"] - want).max() <= 1e-4 * scale, name


def test_the_openvino_command_of_the_defect_works_on_a_calibrated_run(calibrated, tmp_path, capsys):
    from mineralnet.cli import main

    rc = main(["export", str(calibrated), "--openvino", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err and (tmp_path / "model.xml").is_file() and (tmp_path / "model.bin").is_file()
    assert "wrote" in out and "model.xml" in out


def test_a_novelty_mismatch_fails_the_gate_in_one_line(calibrated, tmp_path, monkeypatch, capsys):
    """The gate really compares the novelty output: a detector off by 1% in the graph is refused."""
    import torch

    real = Calibration.graph_module

    def skewed(self):
        module = real(self)

        class Off(torch.nn.Module):
            def forward(self, fused, logits):
                return module(fused, logits) * 1.01 + 0.01

        return Off()

    monkeypatch.setattr(Calibration, "graph_module", skewed)  # what goes into the graph
    # the PyTorch reference keeps the true detector
    monkeypatch.setattr(xgates, "reference", lambda ctx, images: xgates.torch_outputs(
        ctx.model, images, ctx.options.outputs, novelty=real(Calibration.load(ctx.run))))
    from mineralnet.cli import main

    rc = main(["export", str(calibrated), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "parity gate FAILED" in err and "novelty" in err
    assert not (tmp_path / "model.onnx").exists()


def test_tensorrt_engines_of_a_calibrated_run_through_the_fake_builder(calibrated, photos, tmp_path, monkeypatch):
    fake = FakeTensorRT(11)
    monkeypatch.setattr(xtrt, "_tensorrt", lambda: fake)
    monkeypatch.setattr(xtrt, "tensorrt_missing", lambda: None)
    monkeypatch.setattr(xtrt, "device_info", lambda: {**DEVICE, "tensorrt_version": fake.__version__})
    opts = ExportOptions(out_dir=tmp_path, quant_data=photos, quant_size=16, profile=BatchProfile.range(1, 2, 4),
                         int8_gate="drop=100,bound=100")
    arts = {a.path.name: a for a in export(calibrated, ["fp16", "int8", "trt"], opts)}
    assert {"model.fp16.engine", "model.int8.engine"} <= set(arts) and "model.engine" not in arts
    assert fake.failures == []
    cal = Calibration.load(calibrated)
    for engine in ("model.fp16.engine", "model.int8.engine"):
        side = json.loads((tmp_path / f"{engine}.json").read_text())
        assert "novelty" in side["outputs"] and side["calibration"]["threshold"] == cal.threshold
    assert arts["model.int8.onnx"].record["quantization"]["tensorrt_compatible"] is True
    assert arts["model.int8.onnx"].record["int8"]["agreement"]["top1"] >= 0.8


def test_the_reference_refuses_novelty_without_a_detector():
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with pytest.raises(MineralNetError, match="calibrate"):
        xgates.torch_outputs(None, x, ["logits", "novelty"])


# ----------------------------------------------------------------------------- phone rows (issue 29)
HAS_LITERT = all(importlib.util.find_spec(m) for m in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"))
HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None


@pytest.fixture(scope="module")
def phone_exported(calibrated, photos, tmp_path_factory):
    """tflite (fp32 + int8) and executorch (fp32 + int8) of the calibrated run, in one export, batch 2."""
    if not (HAS_LITERT and HAS_EXECUTORCH):
        pytest.skip("litert-torch / ai-edge-litert / ai-edge-quantizer / executorch not installed")
    out = tmp_path_factory.mktemp("phone")
    opts = ExportOptions(out_dir=out, quant_data=photos, quant_size=16, profile=BatchProfile.static(2),
                         int8_gate="drop=100,bound=100", val_data=photos)  # toy model: gate wide open
    arts = export(calibrated, ["tflite", "executorch", "int8"], opts)
    return out, {a.path.name: a for a in arts}


def test_phone_files_pass_the_same_gates_with_the_novelty_output(phone_exported):
    out, arts = phone_exported
    assert {"model.tflite", "model.int8.tflite", "model.pte", "model.int8.pte"} <= set(arts)
    assert "model.fp16.tflite" not in arts  # --fp16 not asked
    manifest = json.loads((out / "model.json").read_text())
    for name in ("model.tflite", "model.pte"):
        parity = arts[name].record["parity"]
        assert parity["passed"] and set(parity["max_abs_diff"]) == {"logits", "probs", "novelty"}, name
        assert parity["top1_equal"] == parity["top1_required"] > 0, name
        assert "novelty" in manifest["exports"][name]["outputs"], name
    for name in ("model.int8.tflite", "model.int8.pte", "model.int8.onnx"):
        gate = arts[name].record["int8"]  # one gate, one record shape for every int8 file
        assert set(gate["agreement"]) == {"top1", "images", "source"}, name
        assert gate["agreement"]["top1"] >= 0.8 and gate["agreement"]["images"] > 0, name


def test_novelty_of_the_phone_files_equals_the_calibration_in_numpy(calibrated, phone_exported, photos):
    from mineralnet.export.executorch import ExecuTorchRunner
    from mineralnet.export.tflite import LiteRTRunner

    out, _ = phone_exported
    cal = Calibration.load(calibrated)
    x = _preprocess(_photos(photos)[:6]).numpy()
    for name, runner in (("model.tflite", LiteRTRunner), ("model.pte", ExecuTorchRunner)):
        r = runner(out / name)
        got = r.run(x)
        assert r.meta["calibration"]["threshold"] == cal.threshold, name
        want = cal.novelty(got["logits"].astype(np.float64), None)
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got["novelty"] - want).max() <= 1e-4 * scale, name


def test_eval_flags_unknown_at_the_calibrated_rate(calibrated, tmp_path, capsys):
    """`eval --split val` scores the very photos the thresholds were set on, so it flags as unknown the
    share calibration let through (1 - acceptance, to a photo); it used to feed log-probabilities to the
    energy detector and flag 100%."""
    from mineralnet.cli import main as cli_main

    cal = Calibration.load(calibrated)
    assert cli_main(["eval", str(calibrated), "--split", "val", "--workers", "0", "--out", str(tmp_path)]) == 0
    flagged = json.loads((tmp_path / "metrics.json").read_text())["calibration"]["known_flagged_unknown"]
    n = 10  # val photos: every third of 30
    assert abs(flagged - (1 - cal.acceptance)) <= 1 / n + 1e-9, flagged
