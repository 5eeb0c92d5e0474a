"""Phone formats: LiteRT (.tflite fp32/fp16/int8), ExecuTorch (.pte fp32/int8), Core ML (.mlpackage).

Each format's export is checked in its own runtime against PyTorch (computed here independently, from the
run's model), its metadata round-trips (inside the file and in the sidecar), `Predictor` and the
torch-free edge runner give the same answers as for ONNX, and a missing package is one clear line.
Tests of a format skip when its package is not installed; the missing-package tests always run.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_export import CLASSES, MEAN, RESIZE, SIZE, STD, _photos, _probe_model  # noqa: E402

from mineralnet.data import make_demo_dataset  # noqa: E402
from mineralnet.errors import MineralNetError  # noqa: E402
from mineralnet.export import BatchProfile, ExportOptions, export  # noqa: E402
from mineralnet.export import phone  # noqa: E402
from mineralnet.infer import Predictor  # noqa: E402
from mineralnet.artifact import model_meta, save_model  # noqa: E402

HAS = {m: importlib.util.find_spec(m) is not None
       for m in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer", "executorch", "coremltools")}
needs_litert = pytest.mark.skipif(not (HAS["litert_torch"] and HAS["ai_edge_litert"] and HAS["ai_edge_quantizer"]),
                                  reason="litert-torch / ai-edge-litert / ai-edge-quantizer not installed")
needs_executorch = pytest.mark.skipif(not HAS["executorch"], reason="executorch not installed")
needs_coreml = pytest.mark.skipif(not HAS["coremltools"], reason="coremltools not installed")
EDGE = Path(__file__).resolve().parents[1] / "export" / "edge_predict.py"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", classes=3, per_class=10, size=96)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, photos):
    run = tmp_path_factory.mktemp("run")
    model = _probe_model(_photos(photos))
    save_model(run, model, model_meta(model, classes=CLASSES, image_size=SIZE, mean=MEAN, std=STD, resize=RESIZE))
    return run


def _torch(run_dir, x):
    """Independent reference: the saved model, loaded again, logits and softmax in float64."""
    import torch

    from mineralnet.artifact import load_model

    model, _ = load_model(run_dir)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double().numpy()
    e = np.exp(logits - logits.max(1, keepdims=True))
    return logits, e / e.sum(1, keepdims=True)


def _check_images(run_dir, photos):
    from mineralnet.infer import Preprocessor
    from mineralnet.artifact import read_meta

    return Preprocessor(read_meta(run_dir)).batch(_photos(photos)[:12])


# ----------------------------------------------------------------------------- missing packages (always run)
@pytest.mark.parametrize("fmt,module", [("tflite", "litert_torch"), ("executorch", "executorch"),
                                        ("coreml", "coremltools")])
def test_missing_package_is_one_line(run_dir, tmp_path, monkeypatch, fmt, module):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == module else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(MineralNetError) as e:
        export(run_dir, [fmt], ExportOptions(out_dir=tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and module.replace("_", "-") in msg and "pip install" in msg
    assert not list(tmp_path.iterdir())  # failed before writing anything


def test_missing_runtime_cli_one_line(tmp_path):
    """`mineralnet predict x.tflite` without ai-edge-litert: one line, exit code 2, no traceback."""
    model = tmp_path / "model.tflite"
    model.write_bytes(b"TFL3")
    code = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a, **k: None if n == 'ai_edge_litert' else real(n, *a, **k); "
            "from mineralnet.cli import main; sys.exit(main(['predict', sys.argv[1], sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ai-edge-litert" in lines[0] and "pip install" in lines[0], r.stderr


def test_dynamic_batch_refused(run_dir, tmp_path):
    with pytest.raises(MineralNetError, match="fixed-batch"):
        export(run_dir, ["coreml"] if HAS["coremltools"] else ["tflite"],
               ExportOptions(out_dir=tmp_path, profile=BatchProfile.range(1, 2, 4)))


def test_sidecar_meta_check(tmp_path):
    with pytest.raises(MineralNetError, match="carries no MineralNet metadata"):
        from mineralnet.infer.phone import check_meta

        check_meta({"classes": ["a"]}, tmp_path / "m.tflite")


# ----------------------------------------------------------------------------- LiteRT
@pytest.fixture(scope="module")
def tflite_export(run_dir, photos, tmp_path_factory):
    if not (HAS["litert_torch"] and HAS["ai_edge_litert"] and HAS["ai_edge_quantizer"]):
        pytest.skip("LiteRT packages not installed")
    out = tmp_path_factory.mktemp("tfl")
    opts = ExportOptions(out_dir=out, quant_data=photos, quant_size=24, profile=BatchProfile.static(2),
                         int8_gate="drop=100,bound=100", val_data=photos)  # toy model: gate wide open
    arts = export(run_dir, ["tflite", "fp16", "int8"], opts)
    return {a.path.name: a for a in arts}


@needs_litert
def test_tflite_files_and_gates(tflite_export):
    for name in ("model.tflite", "model.fp16.tflite", "model.int8.tflite"):
        art = tflite_export[name]
        assert art.path.is_file() and phone.sidecar_path(art.path).is_file()
        assert art.record["format"] == "tflite"
    assert tflite_export["model.tflite"].record["parity"]["passed"]
    assert tflite_export["model.fp16.tflite"].record["parity"]["passed"]
    assert tflite_export["model.int8.tflite"].record["int8"]["agreement"]["top1"] >= 0.75
    # smaller files: fp16 about half, int8 about a quarter of fp32
    sizes = {n: tflite_export[n].path.stat().st_size for n in tflite_export if n.endswith(".tflite")}
    assert sizes["model.fp16.tflite"] < 0.6 * sizes["model.tflite"]
    assert sizes["model.int8.tflite"] < 0.35 * sizes["model.tflite"]


def _op_types(path) -> dict:
    """{op name: (input dtypes, output dtypes)} of every op in a .tflite, read by the interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    kinds = {}
    for op in it._get_ops_details():
        dtypes = [it._get_tensor_details(t, 0)["dtype"] for t in op["inputs"] if t >= 0]
        kinds.setdefault(op["op_name"], set()).add(dtypes[0])
    return kinds, it


@needs_litert
def test_tflite_int8_default_keeps_the_tail_and_io_float(tflite_export):
    """float-tail: the convolutions read int8, the linear layer (and the I/O) float, as in model.int8.onnx."""
    kinds, it = _op_types(tflite_export["model.int8.tflite"].path)
    assert it.get_input_details()[0]["dtype"] == np.float32
    assert all(d["dtype"] == np.float32 for d in it.get_output_details())
    assert kinds["CONV_2D"] == {np.int8} and kinds["FULLY_CONNECTED"] == {np.float32}
    assert tflite_export["model.int8.tflite"].record["quantization"]["io"] == "float32"


@needs_litert
def test_tflite_int8_full_integer(run_dir, photos, tmp_path):
    opts = ExportOptions(out_dir=tmp_path, quant_data=photos, quant_size=24, profile=BatchProfile.static(2),
                         int8_gate="drop=100,bound=100", val_data=photos, tflite_int8="full")
    art = next(a for a in export(run_dir, ["tflite", "int8"], opts) if a.path.name == "model.int8.tflite")
    kinds, it = _op_types(art.path)
    assert it.get_input_details()[0]["dtype"] == np.int8
    assert all(d["dtype"] == np.int8 for d in it.get_output_details())
    assert kinds["FULLY_CONNECTED"] == {np.int8}
    x = _check_images(run_dir, photos)
    logits, _ = _torch(run_dir, x)
    assert (Predictor(art.path).outputs(x)["logits"].argmax(1) == logits.argmax(1)).mean() >= 0.75


def test_tflite_int8_recipe_is_checked_before_anything_runs(run_dir, tmp_path):
    with pytest.raises(MineralNetError, match="--tflite-int8 'half': choose one of float-tail, full"):
        export(run_dir, ["tflite"], ExportOptions(out_dir=tmp_path, tflite_int8="half"))


@needs_litert
def test_tflite_metadata_round_trip(tflite_export, run_dir):
    from mineralnet.infer.litert import read_metadata
    from mineralnet.artifact import read_meta

    meta = read_meta(run_dir)
    for name in ("model.tflite", "model.int8.tflite"):
        path = tflite_export[name].path
        inner = read_metadata(path.read_bytes())
        side = json.loads(phone.sidecar_path(path).read_text())
        for key in ("classes", "image_size", "resize", "mean", "std"):
            assert inner[key] == meta[key] == side[key]
        assert inner["outputs"] == ["logits", "probs"] and side["file"] == name
        assert inner["precision"] == ("int8" if "int8" in name else "fp32")


@needs_litert
def test_tflite_predictor_matches_torch(tflite_export, run_dir, photos):
    x = _check_images(run_dir, photos)
    logits, probs = _torch(run_dir, x)
    out = Predictor(tflite_export["model.tflite"].path).outputs(x)
    assert np.abs(out["logits"] - logits).max() < 1e-4
    assert np.abs(out["probs"] - probs).max() < 1e-5
    int8 = Predictor(tflite_export["model.int8.tflite"].path).outputs(x)
    assert (int8["logits"].argmax(1) == logits.argmax(1)).mean() >= 0.75


@needs_litert
def test_tflite_metadata_from_sidecar_only(tflite_export, tmp_path):
    """A .tflite without the embedded entry (e.g. stripped by a tool) still works from its sidecar."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    src = tflite_export["model.tflite"].path
    model = schema.ModelT.InitFromPackedBuf(bytearray(src.read_bytes()), 0)
    model.metadata = [m for m in model.metadata if m.name not in (b"mineralnet", "mineralnet")]
    b = flatbuffers.Builder(0)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(bytes(b.Output()))
    with pytest.raises(MineralNetError, match="no bare.tflite.json"):
        Predictor(bare)
    phone.sidecar_path(bare).write_text(phone.sidecar_path(src).read_text())
    assert Predictor(bare).classes == CLASSES


# ----------------------------------------------------------------------------- ExecuTorch
@pytest.fixture(scope="module")
def pte_export(run_dir, photos, tmp_path_factory):
    if not HAS["executorch"]:
        pytest.skip("executorch not installed")
    out = tmp_path_factory.mktemp("pte")
    opts = ExportOptions(out_dir=out, quant_data=photos, quant_size=24,
                         int8_gate="drop=100,bound=100", val_data=photos)  # toy model: gate wide open
    arts = export(run_dir, ["executorch", "int8"], opts)
    return {a.path.name: a for a in arts}


@needs_executorch
def test_pte_files_metadata_and_parity(pte_export, run_dir, photos):
    from mineralnet.infer.executorch import ExecuTorchRunner
    from mineralnet.artifact import read_meta

    fp32, int8 = pte_export["model.pte"], pte_export["model.int8.pte"]
    assert fp32.record["parity"]["passed"] and int8.record["int8"]["agreement"]["top1"] >= 0.75
    meta = read_meta(run_dir)
    runner = ExecuTorchRunner(fp32.path)
    side = json.loads(phone.sidecar_path(fp32.path).read_text())
    for key in ("classes", "image_size", "resize", "mean", "std"):
        assert runner.meta[key] == meta[key] == side[key]
    x = _check_images(run_dir, photos)
    logits, _ = _torch(run_dir, x)
    assert np.abs(runner.run(x)["logits"] - logits).max() < 1e-4
    assert int8.path.stat().st_size < 0.4 * fp32.path.stat().st_size


@needs_executorch
def test_pte_int8_from_the_runs_own_split(run_dir, photos, tmp_path):
    """No --calib-data: the int8 .pte is quantized on the run's training photos (split.json) and gated on its
    validation photos, and the record names where its quantization photos came from (this crashed when
    quant_data was None)."""
    import shutil

    from mineralnet.data import save_splits, scan_dataset

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    index = scan_dataset(photos, verify=False)
    val = list(range(0, len(index.samples), 3))
    save_splits(run / "split.json", index, {"train": [i for i in range(len(index.samples)) if i not in val],
                                            "val": val}, info={})
    arts = export(run, ["executorch", "int8"], ExportOptions(out_dir=tmp_path / "out", quant_size=12,
                                                             int8_gate="drop=100,bound=100"))
    record = next(a for a in arts if a.path.name == "model.int8.pte").record
    assert record["quantization_photos"]["source"].startswith("training photos of the run (12 of ")
    assert record["quantization_photos"]["images"] == 12
    assert record["int8"]["agreement"]["images"] == len(val)


# ----------------------------------------------------------------------------- Core ML
@needs_coreml
def test_coreml_structure(run_dir, tmp_path):
    import coremltools as ct

    arts = export(run_dir, ["coreml"], ExportOptions(out_dir=tmp_path))
    art = next(a for a in arts if a.path.name == "model.mlpackage")
    assert art.path.is_dir() and art.record["check"]["type"] == "mlProgram"
    spec = ct.models.MLModel(str(art.path), skip_model_load=True).get_spec()
    meta = json.loads(spec.description.metadata.userDefined["mineralnet"])
    assert meta["classes"] == CLASSES and meta["image_size"] == SIZE and meta["precision"] == "fp16"
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 3, SIZE, SIZE]
    assert json.loads(phone.sidecar_path(art.path).read_text())["classes"] == CLASSES
    with pytest.raises(MineralNetError, match="only on macOS"):
        Predictor(art.path)


@needs_coreml
def test_coreml_check_catches_wrong_shape(run_dir, tmp_path):
    from mineralnet.export.coreml import structural_check

    arts = export(run_dir, ["coreml"], ExportOptions(out_dir=tmp_path))
    meta = json.loads(phone.sidecar_path(arts[-1].path).read_text())
    meta.pop("file"), meta.pop("sha256")
    with pytest.raises(MineralNetError, match="input shape"):
        structural_check(arts[-1].path, meta, batch=4)
    with pytest.raises(MineralNetError, match="round-trip"):
        structural_check(arts[-1].path, {**meta, "classes": ["x"]}, batch=1)


# ----------------------------------------------------------------------------- same answers as ONNX
@needs_litert
@needs_executorch
def test_predict_json_same_as_onnx(tflite_export, pte_export, photos):
    """`mineralnet predict --json` over .tflite and .pte: the same records as over model.onnx."""
    onnx = tflite_export["model.onnx"].path
    base = _predict_json(onnx, photos)
    for model in (tflite_export["model.tflite"].path, pte_export["model.pte"].path):
        got = _predict_json(model, photos)
        assert [r["file"] for r in got] == [r["file"] for r in base]
        assert [r["top"][0]["label"] for r in got] == [r["top"][0]["label"] for r in base]
        for a, b in zip(got, base):
            assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) < 1e-4
            assert a["unknown"] is None and b["unknown"] is None


def _predict_json(model, photos):
    r = subprocess.run([sys.executable, "-m", "mineralnet.cli", "predict", str(model), str(photos), "--json",
                        "--topk", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["predictions"]


@needs_litert
def test_edge_runner_tflite_without_torch(tflite_export, photos):
    """export/edge_predict.py on a .tflite with torch and mineralnet blocked: the ONNX file's answers."""
    blocked = "import sys; sys.modules['torch'] = None; sys.modules['mineralnet'] = None; "
    out = {}
    for name in ("model.onnx", "model.tflite"):
        code = blocked + f"sys.argv = ['edge_predict.py', {str(tflite_export[name].path)!r}, {str(photos)!r}, " \
                         f"'--json']; exec(open({str(EDGE)!r}).read())"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out[name] = json.loads(r.stdout)["predictions"]
    assert [p["top"][0]["label"] for p in out["model.tflite"]] == [p["top"][0]["label"] for p in out["model.onnx"]]
    for a, b in zip(out["model.tflite"], out["model.onnx"]):
        assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) < 1e-4
