"""OpenVINO IR export and runtime: parity with PyTorch, int8 agreement, metadata in rt_info,
Predictor over the IR equals Predictor over ONNX, and score_photos equals `mineralnet eval`."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

sys.path.insert(0, str(Path(__file__).parent))
from test_export import CLASSES, MEAN, RESIZE, SIZE, STD, _photos, _probe_model  # noqa: E402

from mineralnet.data import make_demo_dataset  # noqa: E402
from mineralnet.errors import MineralNetError  # noqa: E402
from mineralnet.export import BatchProfile, ExportOptions, export  # noqa: E402
from mineralnet.export import onnx as xonnx  # noqa: E402
from mineralnet.export import gates as xgates  # noqa: E402
from mineralnet.export import openvino as xov  # noqa: E402
from mineralnet.infer import openvino as iov  # noqa: E402
from mineralnet.infer import Predictor, score_photos  # noqa: E402
from mineralnet.artifact import model_meta, save_model  # noqa: E402


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
def exported(tmp_path_factory, run_dir, photos):
    """fp32 + int8 ONNX and IR, fixed batch 2 (the last chunk of an odd count is padded)."""
    calib = make_demo_dataset(tmp_path_factory.mktemp("calib") / "set", classes=3, per_class=10, size=96, seed=1)
    opts = ExportOptions(quant_data=calib, quant_size=24, profile=BatchProfile.static(2), val_data=photos,
                         int8_gate="drop=100,bound=100")  # 30 held-out photos cannot show a 2-point bound
    arts = export(run_dir, ["int8", "openvino"], opts)
    return {a.path.name: a for a in arts}


def _torch_logits(run_dir, x):
    import torch

    from mineralnet.artifact import load_model

    model, _ = load_model(run_dir)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_fp32_ir_equals_pytorch_within_the_onnx_tolerance(exported, run_dir):
    out = run_dir / "export"
    assert {"model.xml", "model.bin", "model.int8.xml", "model.int8.bin"} <= {p.name for p in out.iterdir()}
    runner = iov.IRRunner(out / "model.xml")
    assert runner.batch == 2
    x = np.random.default_rng(0).normal(size=(5, 3, SIZE, SIZE)).astype(np.float32)
    got = runner.run(x)
    ref = _torch_logits(run_dir, x)
    assert got["logits"].shape == (5, 3)
    assert np.abs(got["logits"] - ref).max() <= xgates.FP32_ATOL
    np.testing.assert_allclose(got["probs"], xgates.torch_outputs(runner_model(run_dir), x, ["probs"])["probs"],
                               atol=1e-5)
    record = json.loads((out / "model.json").read_text())["exports"]["model.xml"]
    assert record["parity"]["passed"] and record["parity"]["max_abs_diff"]["logits"] <= xgates.FP32_ATOL
    assert record["weights"]["file"] == "model.bin"


def runner_model(run_dir):
    from mineralnet.artifact import load_model

    return load_model(run_dir)[0]


def test_ir_carries_the_metadata_and_fp32_weights(exported, run_dir):
    import openvino as ov

    out = run_dir / "export"
    model = ov.Core().read_model(str(out / "model.xml"))
    meta = iov.read_metadata(model, "model.xml")
    run_meta = json.loads((run_dir / "model.json").read_text())
    for key in ("classes", "image_size", "resize", "mean", "std", "backbone", "stages"):
        assert meta[key] == run_meta[key], key
    assert meta["precision"] == "fp32"
    assert iov.read_metadata(ov.Core().read_model(str(out / "model.int8.xml")), "x")["precision"] == "int8"
    # fp32 weights (save_model's default would halve them): the .bin is about the ONNX file's size
    assert (out / "model.bin").stat().st_size > 0.9 * (out / "model.onnx").stat().st_size


def test_int8_ir_passes_the_agreement_gate_and_records_accuracy(exported, run_dir, photos):
    record = json.loads((run_dir / "export" / "model.json").read_text())["exports"]["model.int8.xml"]
    agree = record["int8"]["agreement"]
    assert agree["source"] == "30 --val-data photos" and agree["images"] == 30 and agree["top1"] >= 0.9
    fp32 = score_photos(run_dir, photos, device="cpu")
    int8 = score_photos(run_dir / "export" / "model.int8.xml", photos, reference=fp32["preds"])
    assert int8["agreement"] == pytest.approx(agree["top1"])
    assert record["int8"]["accuracy"]["int8"] == pytest.approx(int8["top1"])
    assert record["quantization"] == {"method": "qdq", "from": "model.int8.onnx"}


def test_predictor_over_ir_equals_predictor_over_onnx(exported, run_dir, photos):
    paths = _photos(photos)[:7]
    ir, onnx_ = Predictor(run_dir / "export" / "model.xml"), Predictor(run_dir / "export" / "model.onnx")
    assert ir.kind == "openvino" and ir.classes == CLASSES
    np.testing.assert_allclose(ir.probabilities(paths), onnx_.probabilities(paths), atol=1e-5)
    assert [p.top for p in ir.predict(paths, topk=1)][0][0][0] == onnx_.predict(paths, topk=1)[0].top[0][0]


def test_nncf_int8_ir_is_gated_too(run_dir, photos, tmp_path):
    pytest.importorskip("nncf")
    opts = ExportOptions(quant_data=photos, quant_size=16, out_dir=tmp_path, openvino_int8="nncf", int8_gate="drop=100,bound=100")
    arts = {a.path.name: a for a in export(run_dir, ["int8", "openvino"], opts)}
    record = arts["model.int8.xml"].record
    assert record["quantization"]["method"] == "nncf" and record["quantization"]["photos"] == 16
    assert record["int8"]["agreement"]["top1"] >= 0.9
    x = np.random.default_rng(1).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    assert iov.IRRunner(tmp_path / "model.int8.xml").run(x)["logits"].shape == (2, 3)


def _ir_tail(model) -> set[str]:
    """Friendly names of the IR's global pooling (ReduceMean) and every op after it."""
    todo = [op for op in model.get_ordered_ops() if op.get_type_name() == "ReduceMean"]
    seen = {}
    while todo:
        op = todo.pop()
        if op.get_friendly_name() not in seen:
            seen[op.get_friendly_name()] = op
            todo += [t.get_node() for out in op.outputs() for t in out.get_target_inputs()]
    return set(seen)


def test_nncf_alone_asks_for_the_int8_ir_with_a_float_tail(run_dir, photos, tmp_path, monkeypatch):
    """--openvino --openvino-int8 nncf without --int8: model.int8.xml by NNCF, no model.int8.onnx; NNCF gets the
    ONNX graph with its float tail named exactly (quantize.graph.tail_nodes), so no FakeQuantize of the IR feeds
    the pooling or anything after it; the weights get 7 bits exactly where the QDQ recipe would use reduce_range
    (NNCF's overflow fix on every layer)."""
    nncf = pytest.importorskip("nncf")
    import onnx
    from nncf.quantization.advanced_parameters import OverflowFix

    from mineralnet.quantize import graph as g
    from mineralnet.quantize import recipe as rc

    seen, original = {}, nncf.quantize

    def spy(model, dataset, **kwargs):
        seen.update(kwargs, model=model)
        return original(model, dataset, **kwargs)

    monkeypatch.setattr(nncf, "quantize", spy)
    opts = ExportOptions(quant_data=photos, quant_size=16, out_dir=tmp_path, openvino_int8="nncf",
                         int8_gate="drop=100,bound=100")
    arts = {a.path.name: a for a in export(run_dir, ["openvino"], opts)}
    assert "model.int8.xml" in arts and not (tmp_path / "model.int8.onnx").exists()
    expected = OverflowFix.ENABLE if rc.default_recipe().reduce_range else OverflowFix.DISABLE
    assert seen["advanced_parameters"].overflow_fix == expected and seen["fast_bias_correction"] is True
    assert isinstance(seen["model"], onnx.ModelProto)
    assert sorted(seen["ignored_scope"].names) == g.tail_nodes(seen["model"])
    assert arts["model.int8.xml"].record["quantization"]["float_tail"] is True

    ov = iov._ov()
    int8 = ov.Core().read_model(str(tmp_path / "model.int8.xml"))
    kinds = {op.get_friendly_name(): op.get_type_name() for op in int8.get_ordered_ops()}
    tail = _ir_tail(int8)
    assert {kinds[n] for n in tail} >= {"ReduceMean", "Concat", "Softmax"}
    fq_fed = {t.get_node().get_friendly_name() for op in int8.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
              for out in op.outputs() for t in out.get_target_inputs()}
    assert fq_fed and not fq_fed & tail
    assert any(kinds.get(n) == "Convolution" for n in fq_fed)
    assert iov.IRRunner(tmp_path / "model.int8.xml").meta["classes"] == CLASSES


def test_nncf_without_nncf_installed_fails_before_anything_is_written(run_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(MineralNetError, match="needs NNCF"):
        export(run_dir, ["openvino"], ExportOptions(out_dir=tmp_path, openvino_int8="nncf"))
    assert not list(tmp_path.iterdir())


def test_score_photos_torch_row_equals_mineralnet_eval(run_dir, photos):
    from mineralnet.analysis.evaluate import predict_folder
    from mineralnet.metrics import compute_metrics

    targets, preds, probs, meta, index, acc = predict_folder(run_dir, photos, batch_size=8, workers=0)
    acc.end_training()
    expected = compute_metrics(targets, preds, probs, classes=meta["classes"])
    got = score_photos(run_dir, photos, reference=preds, device="cpu")
    assert got["images"] == len(targets)
    assert got["top1"] == pytest.approx(expected["top1"])
    assert got["mean_class_acc"] == pytest.approx(expected["mean_class_acc"])
    assert got["agreement"] == 1.0
    # an independent count: mean over classes of the per-class hit rate
    per_class = [np.mean(got["preds"][got["targets"] == c] == c) for c in range(len(CLASSES))]
    assert got["mean_class_acc"] == pytest.approx(float(np.mean(per_class)))


def test_timing_runtime_and_precision_hints(exported, run_dir):
    rt = iov.timing_runtime(run_dir / "export" / "model.xml", precision="bf16", threads=1)
    (x,) = rt.make_inputs(2, 1)
    result = rt.fn(x)
    assert len(result) == 2 and rt.precision == "bf16"
    with pytest.raises(MineralNetError, match="fixed batch of 2"):
        rt.make_inputs(8, 1)
    with pytest.raises(MineralNetError, match="choose one of fp32"):
        iov.compile_ir(run_dir / "export" / "model.xml", precision="int4")


def test_bad_ir_inputs_are_one_clear_line(exported, run_dir, tmp_path):
    xml = tmp_path / "model.xml"
    xml.write_bytes((run_dir / "export" / "model.xml").read_bytes())
    with pytest.raises(MineralNetError, match="model.bin beside it"):
        Predictor(xml)
    with pytest.raises(MineralNetError, match="OpenVINO's runtime hint"):
        Predictor(run_dir / "export" / "model.onnx", precision="bf16")


# ----------------------------------------------------------------------------- mineralnet bench --runtimes openvino --data
def _eval_preds(run_dir, photos, split=None):
    from mineralnet.analysis.evaluate import predict_folder
    from mineralnet.metrics import compute_metrics

    targets, preds, probs, meta, index, acc = predict_folder(run_dir, photos, batch_size=8, workers=0, split=split)
    acc.end_training()
    return preds, compute_metrics(targets, preds, probs, classes=meta["classes"])


def test_openvino_row_labels_and_hints():
    from mineralnet.bench.runtimes import BenchModel, _row_precisions, openvino_hint

    fp32 = BenchModel("m.xml", "openvino", "m.xml", None, 64, "fp32")
    int8 = BenchModel("m.int8.xml", "openvino", "m.int8.xml", None, 64, "int8")
    assert _row_precisions(fp32, ["fp32", "bf16"], "openvino") == ["fp32", "bf16"]
    assert _row_precisions(int8, ["fp32", "bf16"], "openvino") == ["int8", "int8+bf16"]
    assert _row_precisions(int8, ["bf16"], "openvino") == ["int8+bf16"]
    assert _row_precisions(int8, ["fp32", "bf16"], "ort-cpu") == ["int8"]  # ONNX Runtime: the file's own
    assert [openvino_hint("int8", p) for p in ("int8", "int8+bf16")] == ["fp32", "bf16"]
    assert [openvino_hint("fp32", p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_bench_data_rows_match_eval_and_each_other(exported, run_dir, photos, tmp_path):
    from mineralnet.cli import main

    out = run_dir / "export"
    files = [out / n for n in ("model.onnx", "model.int8.onnx", "model.xml", "model.int8.xml")]
    js = tmp_path / "bench.json"
    rc = main(["bench", str(run_dir), *map(str, files), "--runtimes", "torch,ort-cpu,openvino",
               "--precision", "fp32", "--batch-sizes", "2", "--warmup", "0", "--duration", "0.01",
               "--min-runs", "2", "--threads", "1", "--data", str(photos), "--json", str(js)])
    assert rc == 0
    rows = {(Path(r["path"]).name, r["runtime"], r["precision"]): r for r in json.loads(js.read_text())["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), [r["reason"] for r in rows.values()]
    run = run_dir.name
    assert set(rows) == {
        (run, "torch", "fp32"), ("model.onnx", "ort-cpu", "fp32"), ("model.int8.onnx", "ort-cpu", "int8"),
        ("model.onnx", "openvino", "fp32"), ("model.int8.onnx", "openvino", "int8"),
        ("model.xml", "openvino", "fp32"), ("model.int8.xml", "openvino", "int8")}
    assert rows[("model.int8.xml", "openvino", "int8")]["hint"] == "fp32"

    # the torch row is `mineralnet eval` on the same photos
    preds, expected = _eval_preds(run_dir, photos)
    torch_row = rows[(run, "torch", "fp32")]
    assert torch_row["images"] == len(preds) == 30 and torch_row["agreement"] == 1.0
    assert torch_row["top1"] == pytest.approx(expected["top1"])
    assert torch_row["mean_class_acc"] == pytest.approx(expected["mean_class_acc"])
    # every fp32 form predicts what PyTorch predicts
    for key in [("model.onnx", "ort-cpu", "fp32"), ("model.onnx", "openvino", "fp32"), ("model.xml", "openvino", "fp32")]:
        assert rows[key]["agreement"] == 1.0 and rows[key]["top1"] == pytest.approx(expected["top1"]), key
    # the int8 IR (converted from the QDQ file) and the QDQ file read by OpenVINO compute the same thing; the
    # agreement is the export gate's number, counted here independently from the IR's own predictions
    a, b = rows[("model.int8.onnx", "openvino", "int8")], rows[("model.int8.xml", "openvino", "int8")]
    assert (a["top1"], a["agreement"]) == (b["top1"], b["agreement"])
    ir_preds = Predictor(out / "model.int8.xml").probabilities(_photos_in_scan_order(photos)).argmax(1)
    assert b["agreement"] == pytest.approx(float(np.mean(ir_preds == preds)))
    record = json.loads((out / "model.json").read_text())["exports"]["model.int8.xml"]
    assert b["agreement"] == pytest.approx(record["int8"]["agreement"]["top1"])


def test_bench_bf16_hint_row_is_labelled_and_scored(exported, run_dir, photos):
    from mineralnet import bench
    from mineralnet.bench.report import render_markdown

    if iov.timing_runtime(run_dir / "export" / "model.int8.xml", precision="bf16", threads=1).effective != "bf16":
        pytest.skip("this CPU has no bf16 instructions: OpenVINO runs the bf16 hint as fp32, and the bench skips "
                    "that row (test_bench_skips_a_hint_the_cpu_lacks)")
    rows = bench.run_inference([str(run_dir / "export" / "model.int8.xml")], runtimes=["openvino"],
                               precisions=["bf16"], batch_sizes=[2], warmup_s=0, duration_s=0.01, min_runs=2,
                               threads=1, log=lambda *_: None)
    assert [(r["precision"], r["hint"], r["status"]) for r in rows] == [("int8+bf16", "bf16", "ok")]
    bench.score_rows(rows, bench.PhotoSet(photos), log=lambda *_: None)
    preds, _ = _eval_preds(run_dir, photos)
    own = Predictor(run_dir / "export" / "model.int8.xml", precision="bf16").probabilities(
        _photos_in_scan_order(photos)).argmax(1)
    assert rows[0]["agreement"] == pytest.approx(float(np.mean(own == preds))) and rows[0]["images"] == 30
    md = render_markdown(bench.make_report(rows, kind="inference", settings={"data": "photos"}))
    head = next(l for l in md.splitlines() if l.startswith("| model |")).strip("| ").split(" | ")
    line = next(l for l in md.splitlines() if l.startswith("| model.int8.xml | openvino | int8+bf16 "))
    cells = dict(zip(head, line.strip("| ").split(" | ")))
    r = rows[0]
    assert (cells["top-1"], cells["mean class acc"], cells["agrees w/ torch fp32"]) == (
        f"{100 * r['top1']:.2f}", f"{100 * r['mean_class_acc']:.2f}", f"{100 * r['agreement']:.2f}")
    assert "the bf16 hint" in md and "30 labelled photos of photos" in md


def test_bench_skips_a_hint_the_cpu_lacks(exported, run_dir, monkeypatch):
    from mineralnet import bench
    from mineralnet.infer import openvino as ir

    real = ir.timing_runtime
    monkeypatch.setattr(ir, "timing_runtime", lambda *a, **k: dataclasses.replace(real(*a, **k), effective="fp32"))
    rows = bench.run_inference([str(run_dir / "export" / "model.xml")], runtimes=["openvino"],
                               precisions=["fp32", "bf16"], batch_sizes=[2], warmup_s=0, duration_s=0.01,
                               min_runs=2, threads=1, log=lambda *_: None)
    assert [(r["precision"], r["status"]) for r in rows] == [("fp32", "ok"), ("bf16", "skipped")]
    assert rows[1]["reason"] == "OpenVINO runs the bf16 hint as fp32 on this CPU (no bf16 instructions)"


def _photos_in_scan_order(photos):
    from mineralnet.data import scan_dataset

    return [p for p, _ in scan_dataset(photos, classes=CLASSES).samples]


def test_bench_data_split_scores_the_held_out_photos(exported, run_dir, photos, tmp_path):
    import shutil

    from mineralnet.bench.accuracy import PhotoSet, score_rows
    from mineralnet.data import scan_dataset
    from mineralnet.data.splits import save_splits

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    index = scan_dataset(photos, classes=CLASSES)
    save_splits(run / "split.json", index, {"train": list(range(0, 30, 3)), "val": [i for i in range(30) if i % 3]})
    rows = [{"status": "ok", "runtime": "torch", "precision": "fp32", "path": str(run), "model": "run"},
            {"status": "ok", "runtime": "openvino", "precision": "int8", "hint": "fp32", "model": "ir",
             "path": str(run / "export" / "model.int8.xml")}]
    score_rows(rows, PhotoSet(photos, "val"), log=lambda *_: None)
    preds, expected = _eval_preds(run, photos, split="val")
    assert rows[0]["images"] == rows[1]["images"] == len(preds) == 20
    assert rows[0]["top1"] == pytest.approx(expected["top1"]) and rows[0]["agreement"] == 1.0
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("model.int8.xml", "model.int8.bin"):
        shutil.copy(run / "export" / name, loose / name)
    with pytest.raises(MineralNetError, match="sits in no run directory"):
        score_rows([dict(rows[1], path=str(loose / "model.int8.xml"))], PhotoSet(photos, "val"))


def test_bench_data_errors_are_one_line(run_dir, tmp_path, capsys):
    from mineralnet.cli import main

    assert main(["bench", str(run_dir), "--split", "val"]) == 2
    assert main(["bench", str(run_dir), "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mineralnet: error: --split needs --data DIR (the folder the run was trained on)",
                   f"mineralnet: error: --data {str(tmp_path / 'missing')!r} is not a folder; pass labelled photos "
                   f"(one sub-folder per mineral), e.g. ../shared/data/minet7"]


def test_openvino_leaves_the_callers_signal_stack_as_it_was(tmp_path):
    """OpenVINO's CPU plugin swaps in an alternate signal stack of its own and frees it later; a process that
    then gets a Python-handled signal (SIGCHLD of a subprocess under torch's DataLoader handler) died with
    SIGSEGV (the whole test suite did). compile_ir must hand the caller its own stack back. A fresh process, so
    that the plugin is loaded here and not by an earlier test."""
    import subprocess

    script = tmp_path / "stack.py"
    script.write_text("""
import faulthandler, gc, signal, subprocess, sys, threading
import numpy as np
import openvino as ov
import openvino.opset13 as op
from mineralnet.infer.openvino import compile_ir, signal_stack
faulthandler.enable()
before = signal_stack()
p = op.parameter([1, 4], np.float32)
held = [compile_ir(ov.Model([op.relu(p)], [p]))]
assert held[0](np.ones((1, 4), np.float32))[0].sum() == 4
after = signal_stack()
t = threading.Thread(target=lambda: (held.clear(), gc.collect()))  # the plugin may go from another thread
t.start(); t.join()
signal.signal(signal.SIGCHLD, lambda *a: None)
for _ in range(3):
    subprocess.run([sys.executable, "-c", "pass"], check=True)
print(before, after)
sys.exit(0 if after == before else 3)
""")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr[-2000:])
