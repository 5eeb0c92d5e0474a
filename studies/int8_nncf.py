"""Would NNCF's post-training quantization give a run a better int8 model than ONNX Runtime's QDQ recipe?

    python studies/int8_nncf.py RUN [--export DIR] [--out studies/results/int8-nncf-NAME.json]

The export (`mineralnet-export RUN --int8 --report`) wrote model.onnx and model.int8.report.json (the recipe it
chose). On the export's own photo sets (`quantize.exporting.plan_photos`: calibration = training photos, ranking
= other training photos through the training augmentation, held-out = the run's validation photos) this script
makes full int8 models (no fallback) four ways and measures each on the ranking AND the held-out photos (logit
SQNR, flips, the int8 gate) and for latency (batch 1, in the runtime that would run it, beside fp32 there):

- qdq: ONNX Runtime's quantize_static with the export's recipe (model.int8.onnx before its fallback);
- nncf-onnx: NNCF on the ONNX file (`export.ir.quantize_nncf`: its performance preset, fast bias correction, the
  float tail and the 7-bit weights of the recipe), run in ONNX Runtime; also how many Convs ONNX Runtime fuses
  into int8 kernels;
- nncf-bias-qdq: the bias-corrected biases of nncf-onnx written into the fp32 model, then the qdq recipe (does
  NNCF's correction carry over to ONNX Runtime's placement?);
- nncf-ir: the OpenVINO int8 IR that `mineralnet-export RUN --openvino --openvino-int8 nncf` makes: nncf-onnx
  (`export.ir.quantize_nncf`) converted to the IR, run in OpenVINO;
- nncf-ov-backend: NNCF's OpenVINO backend on the converted fp32 IR with the same settings (the way the export
  made the int8 IR before 2026-12-07, then also without the float tail and the 7-bit weights), run in OpenVINO.

The held-out columns judge the variants; which one the export uses was not chosen by them (see docs/RESULTS.md,
"NNCF for the int8 model").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def transplant_biases(pre_fp32: bytes, source: bytes) -> tuple[bytes, int]:
    """`pre_fp32` with every Conv bias replaced by the bias of the Conv of the same name in `source` (an NNCF
    model, whose fast bias correction rewrote them); returns (model bytes, biases replaced)."""
    import onnx
    from onnx import numpy_helper

    proto, src = onnx.load_from_string(pre_fp32), onnx.load_from_string(source)
    src_inits = {i.name: i for i in src.graph.initializer}
    inits = {i.name: i for i in proto.graph.initializer}
    src_bias = {n.name: n.input[2] for n in src.graph.node if n.op_type == "Conv" and len(n.input) > 2}
    done = 0
    for node in proto.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or src_bias.get(node.name) not in src_inits:
            continue
        old = inits[node.input[2]]
        new = numpy_helper.to_array(src_inits[src_bias[node.name]]).astype(numpy_helper.to_array(old).dtype)
        old.CopyFrom(numpy_helper.from_array(new, old.name))
        done += 1
    return proto.SerializeToString(), done


def nncf_ov_backend(onnx_path, props: dict, images: np.ndarray, batch, reduce_range: bool):
    """NNCF's OpenVINO backend on the converted fp32 IR, with the export's settings (float tail: the IR's global
    pooling and every op after it; fast bias correction; overflow fix where `reduce_range`): the other way to
    make the int8 IR."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from mineralnet.export.ir import import_nncf, nncf_items
    from mineralnet.infer.openvino import convert

    nncf = import_nncf()
    model = convert(onnx_path, props)
    todo = [op for op in model.get_ordered_ops() if op.get_type_name() == "ReduceMean"]
    tail: dict = {}
    while todo:
        op = todo.pop()
        if op.get_friendly_name() not in tail:
            tail[op.get_friendly_name()] = op
            todo += [t.get_node() for out in op.outputs() for t in out.get_target_inputs()]
    items = nncf_items(images, batch)
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE if reduce_range else OverflowFix.DISABLE)
    return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), fast_bias_correction=True,
                         ignored_scope=nncf.IgnoredScope(names=sorted(tail), validate=False),
                         advanced_parameters=advanced)


def ort_int8_kernels(model: bytes) -> dict:
    """Convs ONNX Runtime runs as int8 kernels (QLinearConv after its graph optimisation) and those left float."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mineralnet-study-") as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    return {"int8_convs": ops.count("QLinearConv"), "float_convs": ops.count("Conv") + ops.count("FusedConv")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder that was exported with --int8 --report")
    ap.add_argument("--export", help="its export folder (default RUN/export)")
    ap.add_argument("--out", help="JSON of the results (default studies/results/int8-nncf-<run name>.json)")
    a = ap.parse_args(argv)

    from mineralnet.errors import MineralNetError
    from mineralnet.quantize.exporting import read_int8_report

    run = Path(a.run)
    try:
        export, report = read_int8_report(run, a.export, prog="int8_nncf")
    except MineralNetError as e:
        sys.exit(str(e))
    try:
        import nncf  # noqa: F401
    except ImportError:
        sys.exit('int8_nncf: needs NNCF: pip install -e ".[openvino]"')

    from mineralnet.artifact import load_model
    from mineralnet.export.ir import quantize_nncf, save_ir
    from mineralnet.export.metadata import onnx_props
    from mineralnet.infer import Preprocessor
    from mineralnet.infer.openvino import IRRunner, convert
    from mineralnet.quantize import graph as g
    from mineralnet.quantize import recipe as rc
    from mineralnet.quantize.exporting import load_photo_sets, plan_photos
    from mineralnet.quantize.stats import GateSpec, evaluate_gate

    recipe = rc.Recipe(**report["recipe"].get("recipe", report["recipe"]))
    _, meta = load_model(run)
    calib, select, held = load_photo_sets(plan_photos(run, meta["classes"]), meta, Preprocessor(meta))
    pre = rc.preprocess(export / "model.onnx")
    fp32 = g.session(pre)
    ref_sel, ref_held = g.logits(fp32, select.images), g.logits(fp32, held.images)
    image = held.images[0]
    rows = {}

    def measure(name: str, logits, seconds: float, latency: dict, **extra):
        sel, hold = logits(select.images), logits(held.images)
        gate = evaluate_gate(ref_held, hold, held.labels, spec=GateSpec())
        rows[name] = {"ranking_flips": int((sel.argmax(1) != ref_sel.argmax(1)).sum()),
                      "ranking_sqnr_db": round(rc.logit_sqnr_db(ref_sel, sel), 2),
                      "heldout_flips": int(len(hold) - gate.agreement.k),
                      "heldout_sqnr_db": round(rc.logit_sqnr_db(ref_held, hold), 2),
                      "heldout_drop": round(100 * gate.drop, 2), "heldout_bound": round(100 * gate.drop_high, 2),
                      "heldout_passed": gate.passed, "seconds": round(seconds, 1), **latency, **extra}
        r = rows[name]
        print(f"{name:14s} ranking {r['ranking_flips']} flips {r['ranking_sqnr_db']:5.2f} dB | held-out "
              f"{r['heldout_flips']} flips {r['heldout_sqnr_db']:5.2f} dB drop {r['heldout_drop']:+.2f} bound "
              f"{r['heldout_bound']:.2f} {'PASS' if r['heldout_passed'] else 'FAIL'} | "
              f"{', '.join(f'{k} {v}' for k, v in latency.items())}", flush=True)

    def ort_run(model: bytes, name: str, seconds: float, **extra):
        sess = g.session(model)
        lat = {"ms": round(g.latency_ms(sess, image), 2), "fp32_ms": round(g.latency_ms(fp32, image), 2)}
        measure(name, lambda x: g.logits(sess, x), seconds, lat, **extra)

    t0 = time.perf_counter()
    qdq = rc.quantize(pre, calib.images, recipe)
    ort_run(qdq, "qdq", time.perf_counter() - t0, runtime="onnxruntime", **ort_int8_kernels(qdq))
    t0 = time.perf_counter()
    fixed = g.fixed_batch(fp32)
    nn = quantize_nncf(pre, calib.images, fixed, reduce_range=recipe.reduce_range)
    nncf_seconds = time.perf_counter() - t0
    ort_run(nn, "nncf-onnx", nncf_seconds, runtime="onnxruntime", **ort_int8_kernels(nn))
    t0 = time.perf_counter()
    corrected, replaced = transplant_biases(pre, nn)
    moved = rc.quantize(corrected, calib.images, recipe)
    ort_run(moved, "nncf-bias-qdq", time.perf_counter() - t0, runtime="onnxruntime", biases_replaced=replaced)

    props = onnx_props(meta, precision="int8", outputs=("logits", "probs"),
                       batch={"dynamic": fixed is None, "size": fixed, "min": 1, "opt": 1, "max": fixed or 1})
    with tempfile.TemporaryDirectory(prefix="mineralnet-study-") as tmp:
        fp32_ir = IRRunner(save_ir(convert(export / "model.onnx", props), tmp, "model.xml"), precision="fp32")
        (Path(tmp) / "nncf.onnx").write_bytes(nn)
        irs = {"nncf-ir": (save_ir(convert(Path(tmp) / "nncf.onnx", props), tmp, "nncf.xml"), nncf_seconds)}
        t0 = time.perf_counter()
        backend = nncf_ov_backend(export / "model.onnx", props, calib.images, fixed, recipe.reduce_range)
        irs["nncf-ov-backend"] = (save_ir(backend, tmp, "backend.xml"), time.perf_counter() - t0)
        for name, (xml, seconds) in irs.items():
            runner = IRRunner(xml, precision="fp32")
            lat = {"ms": round(_ov_latency_ms(runner, image), 2), "fp32_ms": round(_ov_latency_ms(fp32_ir, image), 2)}
            measure(name, lambda x, r=runner: np.concatenate([r.run(x[i:i + 1])["logits"] for i in range(len(x))]),
                    seconds, lat, runtime="openvino")
    out = Path(a.out or f"studies/results/int8-nncf-{run.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run.name, "recipe": recipe.to_dict(),
                               "photos": {"calibration": len(calib), "ranking": len(select), "held_out": len(held)},
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


def _ov_latency_ms(runner, image: np.ndarray, runs: int = 50) -> float:
    x = image[None]
    for _ in range(5):
        runner.run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.run(x)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


if __name__ == "__main__":
    raise SystemExit(main())
