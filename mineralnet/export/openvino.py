"""OpenVINO IR export (fp32, int8) and the OpenVINO runtime used by `Predictor` and the benchmarks.

    mineralnet-export RUN --openvino                            # model.xml + model.bin (fp32)
    mineralnet-export RUN --openvino --int8 --calib-data DIR    # + model.int8.xml + model.int8.bin
    mineralnet-export RUN --openvino --openvino-int8 nncf       # model.xml + model.int8.xml by NNCF (no ONNX int8)

The IR is converted from the parity-gated ONNX file, never from PyTorch directly, so every format
of one export computes the same graph. int8 comes either from the int8 QDQ ONNX (`qdq`, the
default: OpenVINO turns its Q/DQ pairs into FakeQuantize and runs them with its own int8 kernels),
or from NNCF post-training quantization of the fp32 ONNX graph on the same quantization photos, converted
to the IR (`nncf`, `export.ir.quantize_nncf`), which does not need model.int8.onnx: `--openvino-int8 nncf` asks for the int8 IR by itself, so a run whose QDQ int8 file
the gate refuses can still get an OpenVINO int8 judged by its own gate.
bench/RESULTS.md ("OpenVINO on this CPU") has the measurement behind the default.

The metadata of the ONNX file (classes, preprocessing, precision, ...) is carried in the IR's
rt_info under `mineralnet`, as the same JSON strings, so `read_metadata` gives `Predictor` the same
dict as the ONNX metadata_props. Weights are stored as fp32 (OpenVINO's `save_model` would halve
them to fp16 by default, which the parity gate would then measure, not the conversion).

Runtime precision: OpenVINO runs an fp32 IR in bf16 by default on CPUs with bf16 hardware. Here
the hint is explicit: `fp32` (exact; the default everywhere in MineralNet) or `bf16`/`fp16`
(faster where the CPU has it, not parity-gated: the benchmark reports its accuracy).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from mineralnet.errors import MineralNetError
from mineralnet.quantize.recipe import default_recipe
from mineralnet.export.ir import IR_NAMES, INT8_METHODS, NEEDS_NNCF, quantize_nncf, save_ir
from mineralnet.infer.openvino import IRRunner, _ov, bin_path, convert


def check(options, run=None) -> None:
    if options.openvino_int8 not in INT8_METHODS:
        raise MineralNetError(f"--openvino-int8 {options.openvino_int8!r}: choose one of {', '.join(INT8_METHODS)}")
    if options.openvino_int8 == "nncf":  # before the fp32 export, not after it
        from importlib.util import find_spec

        from mineralnet.export import int8 as xint8

        if find_spec("nncf") is None:
            raise MineralNetError(NEEDS_NNCF)
        xint8.check(options, run)  # the quantization photos and the gate, as for model.int8.onnx


def wants_int8(ctx) -> bool:
    """An int8 IR: with --int8 (from model.int8.onnx, or by NNCF), or by NNCF alone (--openvino-int8 nncf)."""
    return "int8" in ctx.formats or ctx.options.openvino_int8 == "nncf"


def write(ctx) -> list:
    """model.xml (fp32, parity-gated like model.onnx) and, when int8 is asked, model.int8.xml
    (from model.int8.onnx, or NNCF on the quantization photos; held-out int8 gate, report beside it)."""
    check(ctx.options)
    _ov()
    return [_export_ir(ctx, p, ctx.options.openvino_int8) for p in ["fp32", *(["int8"] if wants_int8(ctx) else [])]]


def _export_ir(ctx, precision: str, method: str):
    from mineralnet.export import gates
    from mineralnet.export.metadata import onnx_props
    from mineralnet.infer.ort import ort_session, run_session
    from mineralnet.files import atomic_write_bytes

    o = ctx.options
    source = ctx.files["int8" if precision == "int8" and method == "qdq" else "fp32"]
    props = onnx_props(ctx.meta, precision=precision, outputs=o.outputs, batch=ctx.batch_info())
    record = {"format": "openvino", "precision": precision, "source": Path(source).name,
              "outputs": list(o.outputs), "batch": ctx.batch_info()}
    if precision == "int8" and method == "nncf":
        photos, _ = ctx.quantization_photos()
        seven_bit = default_recipe().reduce_range  # the QDQ recipe's rule: 7-bit weights where the CPU lacks VNNI
        qdq = quantize_nncf(source, photos, None if o.profile.dynamic else o.profile.max, reduce_range=seven_bit)
        with tempfile.TemporaryDirectory(prefix="mineralnet-ov-") as tmp:
            (Path(tmp) / "nncf.onnx").write_bytes(qdq)
            model = convert(Path(tmp) / "nncf.onnx", props)
        record["quantization"] = {"method": "nncf", "preset": "performance (symmetric int8)",
                                  "fast_bias_correction": True, "float_tail": True,
                                  "weights_7bit": seven_bit, "photos": int(len(photos))}
    else:
        model = convert(source, props)
        if precision == "int8":
            record["quantization"] = {"method": "qdq", "from": Path(source).name}
    with tempfile.TemporaryDirectory(prefix="mineralnet-ov-") as tmp:
        xml = save_ir(model, tmp, IR_NAMES[precision])
        runner = IRRunner(xml, precision="fp32")
        if precision == "fp32":
            record["parity"] = gates.parity(ctx, runner.run, precision="fp32", what="OpenVINO parity gate",
                                            hint="the IR does not reproduce the PyTorch model (report it with the "
                                                 "OpenVINO version)")
        else:
            # the int8 IR against the fp32 ONNX on the held-out photos, the same gate as model.int8.onnx;
            # its report is model.int8.xml.report.*
            fp32 = ort_session(ctx.files["fp32"])
            record["int8"] = gates.int8_gate(ctx, lambda x: run_session(fp32, x), runner.run,
                                             what="OpenVINO int8 gate", stem="model.int8.xml.report")
        xml_bytes, bin_bytes = xml.read_bytes(), bin_path(xml).read_bytes()
    ir_bin = bin_path(ctx.path(IR_NAMES[precision]))
    atomic_write_bytes(ir_bin, bin_bytes)  # weights first: an .xml without its .bin cannot load
    record.update(weights={"file": ir_bin.name, "bytes": len(bin_bytes)}, openvino=_ov().__version__)
    art = ctx.save(IR_NAMES[precision], xml_bytes, record)
    art.record["bytes"] += len(bin_bytes)  # the log line gives the size of the pair
    return art
