"""Export: parity-gated ONNX (fp32/fp16), int8 QDQ, the edge runner (TensorRT: test_tensorrt.py).

One small FusionNet (resnet18, F2+F4, 64 px) whose head is a least-squares probe on its own
features of a synthetic photo set, so its predictions differ between photos and int8/fp32
agreement means something. The expensive exports run once per module.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mineralnet.data import build_transforms, load_image, make_demo_dataset
from mineralnet.errors import MineralNetError
from mineralnet.export import BatchProfile, ExportOptions, export
from mineralnet.export import onnx as xonnx
from mineralnet.infer.metadata import parse_metadata
from mineralnet.export import metadata as xmeta
from mineralnet.export import int8 as xint8
from mineralnet.export import gates as xgates
from mineralnet.export import tensorrt as xtrt
from mineralnet.model import FusionNet
from mineralnet.quantize.graph import CalibrationReader
from mineralnet.artifact import model_meta, save_model

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["pyrite", "malachite", "quartz"]
SIZE, RESIZE, MEAN, STD = 64, 73, [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]
ONNX_BLOCKED = "import sys; sys.modules['torch'] = None; sys.modules['mineralnet'] = None; "


def _photos(folder):
    return sorted(str(p) for p in Path(folder).rglob("*.jpg"))


def _preprocess(paths):
    t = build_transforms(SIZE, MEAN, STD, train=False, resize=RESIZE)
    return torch.stack([t(load_image(p)) for p in paths])


def _probe_model(photos) -> FusionNet:
    """Random backbone + a ridge-regression head on its features: predictions vary by photo."""
    torch.manual_seed(0)
    model = FusionNet("resnet18", (2, 4), len(CLASSES)).eval()
    labels = torch.tensor([CLASSES.index(Path(p).parent.name) for p in photos])
    with torch.no_grad():
        f = model.embed(_preprocess(photos)).double()  # (N, 640)
        f1 = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
        target = torch.nn.functional.one_hot(labels, len(CLASSES)).double() * 8 - 4
        w = torch.linalg.solve(f1.T @ f1 + 1e-2 * torch.eye(f1.shape[1], dtype=f.dtype), f1.T @ target)
        model.head.weight.copy_(w[:-1].T.float())
        model.head.bias.copy_(w[-1].float())
    return model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", classes=3, per_class=10, size=96)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, photos):
    run = tmp_path_factory.mktemp("run")
    model = _probe_model(_photos(photos))
    save_model(run, model, model_meta(model, classes=CLASSES, image_size=SIZE, mean=MEAN, std=STD, resize=RESIZE))
    return run


@pytest.fixture(scope="module")
def exported(run_dir, photos):
    """fp32 + fp16 + int8 (uint8 activations) ONNX, dynamic batch, all three outputs."""
    # a probe model on 10 held-out photos cannot show a 2-point bound: the gate's arithmetic is test_quantize's
    # int8_fallback="off": the tests below check the full-int8 QDQ structure (the fallback is test_quantize's)
    opts = ExportOptions(quant_data=photos, quant_size=24, profile=BatchProfile.range(1, 2, 4), int8_gate="drop=100,bound=100",
                         outputs=("logits", "probs", "embedding"), int8_fallback="off")
    arts = export(run_dir, ["fp16", "int8"], opts)
    return {a.path.name: a for a in arts}


def _torch_reference(run_dir, x: np.ndarray):
    from mineralnet.artifact import load_model

    model, _ = load_model(run_dir)
    with torch.no_grad():
        emb = model.embed(torch.from_numpy(x))
        return model.forward_head(emb).numpy(), emb.numpy()


# ----------------------------------------------------------------------------- fp32 / fp16
def test_fp32_onnx_is_checked_self_contained_and_carries_metadata(exported, run_dir):
    import onnx

    path = run_dir / "export" / "model.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(os.listdir(path.parent)) == ["model.fp16.onnx", "model.int8.onnx", "model.int8.report.json",
                                               "model.int8.report.md", "model.int8.report.png", "model.json",
                                               "model.onnx"]
    (inp,) = proto.graph.input
    assert inp.name == "images"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, SIZE, SIZE]
    assert [o.name for o in proto.graph.output] == ["logits", "probs", "embedding"]
    props = parse_metadata({p.key: p.value for p in proto.metadata_props})
    meta = json.loads((run_dir / "model.json").read_text())
    for key in ("classes", "image_size", "resize", "mean", "std", "backbone", "stages", "num_classes"):
        assert props[key] == meta[key], key
    assert props["precision"] == "fp32" and props["mineralnet_version"] == meta["versions"]["mineralnet"]
    manifest = json.loads((path.parent / "model.json").read_text())
    record = manifest["exports"]["model.onnx"]
    import hashlib
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["parity"]["passed"] and record["parity"]["max_abs_diff"]["logits"] <= 1e-4
    assert record["parity"]["source"] == "--calib-data photos"
    assert manifest["classes"] == CLASSES and manifest["mean"] == MEAN


def test_fp32_onnx_equals_pytorch_on_any_batch(exported, run_dir):
    session = xonnx.ort_session(run_dir / "export" / "model.onnx")
    x = np.random.default_rng(1).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    logits, probs, emb = session.run(None, {"images": x})
    ref_logits, ref_emb = _torch_reference(run_dir, x)
    assert np.abs(logits - ref_logits).max() <= 1e-4
    assert np.abs(emb - ref_emb).max() <= 1e-4 * max(1, np.abs(ref_emb).max())
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(ref_logits), 1).numpy(), atol=1e-5)
    assert emb.shape == (3, 128 + 512)  # resnet18 layer2 + layer4 channels


def test_fp16_onnx_is_half_the_size_and_within_its_tolerance(exported, run_dir):
    out = run_dir / "export"
    assert (out / "model.fp16.onnx").stat().st_size < 0.55 * (out / "model.onnx").stat().st_size
    session = xonnx.ort_session(out / "model.fp16.onnx")
    assert session.get_inputs()[0].type == "tensor(float)"  # float32 in and out, fp16 inside
    x = np.random.default_rng(2).normal(size=(4, 3, SIZE, SIZE)).astype(np.float32)
    logits = session.run(["logits"], {"images": x})[0]
    ref, _ = _torch_reference(run_dir, x)
    diff = np.abs(logits - ref).max()
    assert 0 < diff <= xgates.FP16_RTOL * max(1.0, np.abs(ref).max())  # really rounded, still close
    record = json.loads((out / "model.json").read_text())["exports"]["model.fp16.onnx"]
    assert record["precision"] == "fp16" and record["parity"]["passed"]


def test_compare_applies_the_stated_tolerances():
    ref = {"logits": np.array([[2.0, 1.0, 0.0], [0.0, 0.5, 0.50001]])}
    ok = xgates.compare(ref, {"logits": ref["logits"] + 5e-5}, precision="fp32", source="t")
    assert ok.passed and ok.max_abs_diff["logits"] == pytest.approx(5e-5)
    assert not xgates.compare(ref, {"logits": ref["logits"] + 2e-4}, precision="fp32", source="t").passed
    flipped = ref["logits"].copy()
    flipped[1, 1] += 2e-5  # within 1e-4 but changes the top-1 of the near-tie: fp32 fails
    assert not xgates.compare(ref, {"logits": flipped}, precision="fp32", source="t").passed
    half = xgates.compare(ref, {"logits": flipped}, precision="fp16", source="t")
    assert half.passed and half.top1_required == 1  # fp16 exempts the near-tie only
    assert not xgates.compare(ref, {"logits": ref["logits"] + 0.05}, precision="fp16", source="t").passed


def test_fp16_tolerance_rises_to_three_times_pytorchs_own_fp16_error_and_no_further():
    ref = {"logits": np.array([[6.0, 1.0, 0.0], [0.0, 4.0, 1.0]])}  # fp16 tolerance 1% of 6 = 0.06
    off = {"logits": ref["logits"] + 0.09}
    assert not xgates.compare(ref, off, precision="fp16", source="t").passed
    # PyTorch's own fp16 forward of the same graph errs by 0.04 on these images: 3 x 0.04 = 0.12 >= 0.09
    got = xgates.compare(ref, off, precision="fp16", source="t", floor={"logits": 0.04})
    assert got.passed and got.tolerance["logits"] == pytest.approx(xgates.FP16_FLOOR_FACTOR * 0.04)
    assert got.floor == {"logits": 0.04}
    assert not xgates.compare(ref, {"logits": ref["logits"] + 0.13}, precision="fp16", source="t",
                              floor={"logits": 0.04}).passed  # beyond 3x the format's own error: a broken graph
    # a tiny floor never lowers the stated tolerance, and fp32 ignores it
    assert xgates.compare(ref, {"logits": ref["logits"] + 0.05}, precision="fp16", source="t",
                          floor={"logits": 1e-6}).passed
    assert not xgates.compare(ref, {"logits": ref["logits"] + 2e-4}, precision="fp32", source="t",
                              floor={"logits": 1.0}).passed


def test_fp16_floor_is_pytorch_running_the_exported_half_graph(run_dir):
    """The floor's reference is the very graph model.fp16.onnx holds, run by PyTorch: close to the fp32 model, not
    equal to it, and ONNX Runtime's fp16 file lands within a few times that error."""
    from mineralnet.export.context import ExportContext

    ctx = ExportContext(run_dir, ExportOptions(outputs=("logits", "probs")))
    x = np.random.default_rng(5).normal(size=(6, 3, SIZE, SIZE)).astype(np.float32)
    half = xonnx.torch_fp16(ctx, x)
    ref, _ = _torch_reference(run_dir, x)
    assert set(half) == {"logits", "probs"} and half["logits"].dtype == np.float32
    err = np.abs(half["logits"] - ref).max()
    assert 0 < err < 0.05 * max(1.0, np.abs(ref).max())
    np.testing.assert_allclose(half["probs"], torch.softmax(torch.from_numpy(half["logits"]), 1).numpy(), atol=1e-6)


def test_parity_gate_failure_is_an_error_and_leaves_no_file(exported, run_dir, tmp_path, monkeypatch, capsys):
    import onnx

    good = onnx.load(str(run_dir / "export" / "model.onnx"))

    def altered(*args, **kwargs):  # the export "goes wrong": one conv weight is off by 1%
        proto = onnx.ModelProto()
        proto.CopyFrom(good)
        init = next(t for t in proto.graph.initializer if len(t.dims) == 4)
        w = onnx.numpy_helper.to_array(init) * 1.01
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        return proto

    monkeypatch.setattr(xonnx, "onnx_proto", altered)
    from mineralnet.cli import main

    out = tmp_path / "out"
    rc = main(["export", str(run_dir), "--out", str(out), "--dynamic", "--outputs", "logits,probs,embedding"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "parity gate FAILED" in err and "max|d logits|" in err and "tol 1e-04" in err
    assert not out.exists() or os.listdir(out) == []


def test_gates_compare_on_the_runs_own_validation_photos_else_synthetic(run_dir, photos, tmp_path):
    """Without --val-data/--calib-data the parity gates use the validation photos recorded in the run's split
    (off-distribution stand-ins inflate fp16 rounding); a run without a split, or whose photos are gone, falls
    back to the synthetic images."""
    import shutil

    from mineralnet.data import save_splits, scan_dataset
    from mineralnet.export.context import ExportContext
    from mineralnet.runs import SPLIT_FILE

    assert ExportContext(run_dir, ExportOptions()).check_images()[1] == "synthetic images"
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    coll = tmp_path / "photos"
    shutil.copytree(photos, coll)
    index = scan_dataset(coll)
    val = list(range(0, len(index.samples), 3))
    save_splits(run / SPLIT_FILE, index, {"train": [i for i in range(len(index.samples)) if i not in val],
                                          "val": val})
    images, source = ExportContext(run, ExportOptions()).check_images()
    assert source == "validation photos of the run" and len(images) == len(val) == 10
    assert images.shape[1:] == (3, SIZE, SIZE)
    shutil.rmtree(coll)  # the collection moved away: back to stand-ins, no error
    assert ExportContext(run, ExportOptions()).check_images()[1] == "synthetic images"


# ----------------------------------------------------------------------------- int8
def test_int8_qdq_runs_agrees_with_fp32_and_is_smaller(exported, run_dir, photos):
    import onnx

    out = run_dir / "export"
    assert (out / "model.int8.onnx").stat().st_size < 0.35 * (out / "model.onnx").stat().st_size
    proto = onnx.load(str(out / "model.int8.onnx"))
    conv = [n for n in proto.graph.node if n.op_type == "Conv"]
    producer = {o: n for n in proto.graph.node for o in n.output}
    # the head (Gemm) and softmax stay float: probabilities are not multiples of 1/255
    assert all(producer[i].op_type != "DequantizeLinear" for n in proto.graph.node
               if n.op_type in ("Gemm", "Softmax") for i in n.input if i in producer)
    # every Conv reads int8 weights (per output channel, zero point 0) and quantized activations
    for n in conv:
        dq_w = producer[n.input[1]]
        assert dq_w.op_type == "DequantizeLinear" and producer[n.input[0]].op_type == "DequantizeLinear"
        q = {t.name: t for t in proto.graph.initializer}
        w, zp = q[dq_w.input[0]], q[dq_w.input[2]] if len(dq_w.input) > 2 else None
        assert w.data_type == onnx.TensorProto.INT8
        if n.op_type == "Conv":
            assert len(q[dq_w.input[1]].dims) == 1 and q[dq_w.input[1]].dims[0] == w.dims[0]  # per channel
        assert zp is None or not onnx.numpy_helper.to_array(zp).any()  # symmetric weights
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["quantization"])["activations"] == "uint8 asymmetric"
    assert json.loads(props["classes"]) == CLASSES
    paths = _photos(photos)
    x = _preprocess(paths).numpy()
    fp32 = xonnx.run_session(xonnx.ort_session(out / "model.onnx"), x)["logits"]
    int8 = xonnx.run_session(xonnx.ort_session(out / "model.int8.onnx"), x)["logits"]
    assert len(set(fp32.argmax(1))) == len(CLASSES)  # the probe really separates the photos
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.8
    assert not np.allclose(fp32, int8, atol=1e-4)  # it is really quantized
    record = json.loads((out / "model.json").read_text())["exports"]["model.int8.onnx"]["int8"]
    # every third labelled photo is held out for the gate (no --val-data, no split.json): 20 calibrate
    assert record["quantization_photos"]["images"] == 20 and record["agreement"]["top1"] >= 0.8
    assert record["agreement"]["images"] == 10 and (out / "model.int8.report.md").is_file()
    assert record["coverage"]["quantized"] == record["coverage"]["conv_gemm_matmul"] == len(conv)


def test_int8_symmetric_activations_have_zero_points_of_zero(exported, run_dir, photos):
    import onnx

    x = _preprocess(_photos(photos)[::3]).numpy()
    data = xint8.quantize_int8(run_dir / "export" / "model.onnx", x, activations="int8", batch=2)
    proto = onnx.load_from_string(data)
    inits = {t.name: t for t in proto.graph.initializer}
    zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zps and all(z.data_type == onnx.TensorProto.INT8 for z in zps)
    assert not any(onnx.numpy_helper.to_array(z).any() for z in zps)  # what TensorRT requires
    logits = xonnx.run_session(xonnx.ort_session(data), x)["logits"]
    ref = xonnx.run_session(xonnx.ort_session(run_dir / "export" / "model.onnx"), x)["logits"]
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_int8_calibration_uses_every_batch(exported, run_dir, photos):
    """Ranges collected batch by batch equal one pass over all batches (onnxruntime 1.32's
    CalibMaxIntermediateOutputs silently dropped every full group of 16 batches)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = run_dir / "export" / "model.onnx"
    x = _preprocess(_photos(photos)[:18]).numpy()  # 18 batches of 1: more than 16
    ours = onnx.load_from_string(xint8.quantize_int8(src, x, batch=1))
    pre, ref = run_dir / "pre.onnx", run_dir / "ref.onnx"
    quant_pre_process(str(src), str(pre))
    reader = CalibrationReader(x, xonnx.INPUT_NAME, 1, True)
    quantize_static(str(pre), str(ref), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    nodes_to_exclude=xint8.float_tail_nodes(onnx.load(str(pre))),  # head/softmax stay float
                    extra_options={"WeightSymmetric": True})
    a = {t.name: onnx.numpy_helper.to_array(t) for t in ours.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(ref)).graph.initializer}
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # and the scales really depend on the last batches: dropping them changes some
    fewer = onnx.load_from_string(xint8.quantize_int8(src, x[:2], batch=1))
    c = {t.name: onnx.numpy_helper.to_array(t) for t in fewer.graph.initializer}
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.endswith("_scale"))


def test_int8_without_or_with_missing_calibration_data_is_one_line(run_dir, tmp_path, capsys):
    from mineralnet.cli import export_main

    rc = export_main([str(run_dir), "--int8", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("mineralnet-export: error: --int8 needs --calib-data DIR")
    rc = export_main([str(run_dir), "--int8", "--calib-data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nope" in err and "not a folder" in err
    assert not (tmp_path / "o").exists()  # failed before exporting anything


def test_bad_arguments_are_one_line_each(run_dir, tmp_path, capsys):
    from mineralnet.cli import export_main

    cases = {
        ("--batch", "4", "--dynamic"): "--batch N fixes the batch",
        ("--max-batch", "8"): "only apply to a dynamic batch",
        ("--dynamic", "--min-batch", "8", "--max-batch", "4"): "1 <= min <= opt <= max",
        ("--outputs", "logits,scores"): "--outputs logits,scores",
        ("--opset", "13"): "--opset 13",
    }
    for flags, expected in cases.items():
        rc = export_main([str(run_dir), *flags, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and expected in err, (flags, err)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert export_main([str(empty)]) == 2
    assert "has no model.safetensors" in capsys.readouterr().err


# ----------------------------------------------------------------------------- edge runner
def _edge_module():
    spec = importlib.util.spec_from_file_location("edge_predict", REPO / "export" / "edge_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_edge_preprocessing_equals_the_library_eval_transform(photos):
    from mineralnet.infer import Preprocessor

    edge = _edge_module()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in ((96, 96), (60, 90), (300, 200), (73, 73), (151, 460))]  # enlarge, shrink, >= 2x
    for size, resize in ((64, 73), (32, 48), (56, 64)):
        meta = {"image_size": size, "resize": resize, "mean": MEAN, "std": STD}
        lib, mine = Preprocessor(meta), edge.Preprocess(size, resize, MEAN, STD)
        for item in _photos(photos)[::4] + arrays:
            img = load_image(item, min_size=resize) if isinstance(item, str) else item
            a, b = lib(img), mine(img)
            assert a.shape == b.shape == (3, size, size)
            levels = np.abs(a - b) * np.array(STD)[:, None, None] * 255  # in grey levels
            assert levels.max() <= 1.01 and (levels > 0.5).mean() <= 0.01, (size, resize, img.shape)
        for p in _photos(photos)[:3]:  # Pillow decoding (with DCT scaling) == the library's decoder
            np.testing.assert_array_equal(edge.load_rgb(p, resize), load_image(p, min_size=resize))


def test_edge_onnx_and_pytorch_predictors_agree(exported, run_dir, photos):
    from mineralnet.infer import Predictor

    paths = _photos(photos)[::2]
    torch_p = Predictor(run_dir).probabilities(paths)
    onnx_p = Predictor(run_dir / "export" / "model.onnx").probabilities(paths)
    edge = _edge_module().EdgeModel(str(run_dir / "export" / "model.onnx"))
    x = np.stack([edge.preprocess(_edge_module().load_rgb(p, RESIZE)) for p in paths])
    edge_p = edge.probabilities(x)
    assert len(set(torch_p.argmax(1))) > 1
    for other in (onnx_p, edge_p):
        assert (other.argmax(1) == torch_p.argmax(1)).all()
        assert np.abs(other - torch_p).max() <= 1e-5


def test_edge_runner_needs_neither_torch_nor_mineralnet(exported, run_dir, photos):
    from mineralnet.infer import Predictor

    paths = _photos(photos)[:4]
    model = run_dir / "export" / "model.int8.onnx"
    code = (ONNX_BLOCKED + "import runpy; sys.argv = ['edge_predict.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(REPO / 'export' / 'edge_predict.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(model), *paths, "--json", "--topk", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["precision"] == "int8"
    ref = Predictor(model).predict(paths, topk=2)
    for got, want in zip(result["predictions"], ref):
        assert [t["label"] for t in got["top"]] == [name for name, _ in want.top]
        assert np.allclose([t["prob"] for t in got["top"]], [p for _, p in want.top], atol=1e-5)
    proc = subprocess.run([sys.executable, str(REPO / "export" / "edge_predict.py"), str(model), "missing.jpg"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "missing.jpg" in proc.stderr


def test_thin_entry_script_is_the_cli(run_dir):
    proc = subprocess.run([sys.executable, str(REPO / "export" / "export.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: mineralnet-export")
    for flag in ("--onnx", "--fp16", "--int8", "--calib-data", "--calib-size", "--trt", "--batch", "--dynamic",
                 "--min-batch", "--opt-batch", "--max-batch", "--opset", "--outputs", "--out", "--val-data"):
        assert flag in proc.stdout
