"""int8: static QDQ quantization of model.onnx into model.int8.onnx, and its table row `write`.

    mineralnet-export RUN --int8 [--calib-data DIR --calib-size N] [--int8-gate drop=1,bound=2]
                                 [--int8-fallback auto] [--report]

The int8 ranges are measured on the *quantization photos* (DIR, spread over its folders, through the
evaluation preprocessing; default: the training photos of the run's split.json). The CLI keeps the flag names `--calib-*` (ONNX Runtime's and TensorRT's word
for this step; `--quant-data/--quant-size/--quant-method` are the same flags), but in MineralNet
"calibration" means only the open-set calibration of a run (temperature, unknown threshold, conformal
sets), which an int8 file carries like every other format.

Weights are int8 symmetric per channel; activations uint8 (x86 CPUs) or int8 (TensorRT, ARM); the
pooling and everything after it (fusion, head, softmax, novelty) stays float. The row's `write` hands
the work to mineralnet/quantize/ (`quantize.exporting.gated_int8`): the recipe is chosen by measurement
on selection photos, the file is judged on held-out photos by the one int8 gate (`quantize.stats`, the
same gate as export/gates.py `int8_gate` for the OpenVINO int8 IR: accuracy drop and its upper bound),
and model.int8.report.{json,md,png} is written beside it, also when the gate fails.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.export.onnx import INPUT_NAME
from mineralnet.quantize.graph import CalibrationReader

NEEDS_PHOTOS = ("--int8 needs --calib-data DIR: a folder of representative photos (e.g. the training set) to "
                "measure the int8 ranges on (the quantization photos); a run with its split.json uses its training "
                "photos")


INT8_ACTIVATIONS = ("uint8", "int8")
RANGE_METHODS = ("minmax", "percentile", "entropy")  # how ranges are estimated from the quantization photos
# The int8 model for TensorRT (strongly typed: the graph is the precision). Q/DQ only on the inputs
# of the ops TensorRT runs as int8 kernels (weighted ops, and Add so the residual add fuses into the
# int8 Conv), not on their outputs, as TensorRT's Q/DQ placement guide recommends (so the logits
# are not rounded to int8); everything else stays float and is converted to fp16, so layers
# between Q/DQ pairs do not run in fp32. Softmax (probs) stays fp32.
TRT_QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add")
# fp16 Q/DQ scales need QuantizeLinear/DequantizeLinear-19; TensorRT 10.0 parses opsets up to 20.
TRT_INT8_OPSET = 19


def quantize_int8(fp32_path, photos: np.ndarray, *, activations: str = "uint8",
                  method: str = "minmax", batch: int | None = None, reduce_range: bool = False,
                  for_tensorrt: bool = False) -> bytes:
    """Static QDQ int8 quantization of the fp32 ONNX at `fp32_path`; returns the model bytes.

    Weights: int8, symmetric, per output channel. Activations: `activations` = "uint8"
    (asymmetric; fastest in ONNX Runtime on x86 CPUs with VNNI, where Relu folds into the zero
    point) or "int8" (symmetric, zero point 0: what TensorRT's explicit quantization accepts and
    ARM CPUs prefer). Ranges come from running the quantization `photos` (already through the eval
    preprocessing) with `method`. ONNX Runtime's pre-processing (symbolic shape inference and
    basic graph optimisation) runs first, as its quantization guide asks. `reduce_range` (7-bit
    weights) only helps x86 CPUs without VNNI, where u8 x s8 products can saturate.

    `for_tensorrt`: the model a strongly typed TensorRT build needs (int8 activations required):
    Q/DQ on TRT_QUANTIZED_OPS only, float biases (TensorRT quantizes them itself), and the float
    parts in fp16 (`qdq_float_parts_to_fp16`).

    Why ONNX Runtime's calibrator and not NVIDIA ModelOpt (`modelopt.onnx.quantization`, whose
    default high-precision dtype is fp16): ModelOpt's int8 mode runs a patched copy of this same
    ORT `quantize_static` underneath, then applies TensorRT placement rules and an fp16 conversion,
    which is what the two steps here do. Measured on minet7 (resnet10t run, 128 quantization and
    332 held-out photos, same fp32 file): top-1 agreement with fp32 98.2% here vs 98.8% (ModelOpt
    "max") and 97.9% (its default "entropy"); 3.4 s vs 8.3 s / 20.6 s; 5.0 MB vs 9.9 MB (ModelOpt
    keeps fp16 weights behind Q/DQ). ModelOpt needs torch >= 2.8 to import its int8 path, and pins
    onnx ~= 1.21 and onnxruntime-gpu ~= 1.24 (plus cupy) on x86 Linux, which conflict with the onnx
    and onnxruntime this package uses; a 0.6-point difference (2 photos) does not pay for that
    (bench/RESULTS.md, "The ONNX files that feed TensorRT").
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activations not in INT8_ACTIVATIONS or (for_tensorrt and activations != "int8"):
        raise MineralNetError(f"int8 activations {activations!r}: choose uint8 (x86 CPUs) or int8 (TensorRT, ARM); "
                              f"TensorRT needs int8")
    if method not in RANGE_METHODS:
        raise MineralNetError(f"--calib-method {method!r}: choose one of {', '.join(RANGE_METHODS)}")
    with tempfile.TemporaryDirectory(prefix="mineralnet-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(os.fspath(fp32_path), os.fspath(pre))
        import onnx

        keep_float = float_tail_nodes(onnx.load(os.fspath(pre)))
        extra = {"WeightSymmetric": True, "ActivationSymmetric": activations == "int8",
                 # Feed ORT's range calibrator one batch per collect_data call: ranges (MinMax) and
                 # histograms (percentile/entropy) are merged call by call, so memory stays at one
                 # batch of activations (a histogram method would otherwise hold every activation
                 # of every image: ~100 MB per 224-px image for ResNet-50). Not
                 # CalibMaxIntermediateOutputs: in onnxruntime 1.32 it discards every full group
                 # of batches instead of merging it.
                 "CalibStridedMinMax": 1}
        if method == "percentile":
            extra["CalibPercentile"] = 99.999
        kwargs = {}
        if for_tensorrt:  # inputs quantized, outputs left to TensorRT's fusions (logits stay float)
            extra.update(QuantizeBias=False, OpTypesToExcludeOutputQuantization=list(TRT_QUANTIZED_OPS))
            kwargs["op_types_to_quantize"] = list(TRT_QUANTIZED_OPS)
        quantize_static(
            os.fspath(pre), os.fspath(out), CalibrationReader(photos, INPUT_NAME, batch or 1, bool(batch)), quant_format=QuantFormat.QDQ,
            per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=keep_float,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method],
            extra_options=extra, **kwargs,
        )
        data = out.read_bytes()
    return qdq_float_parts_to_fp16(data) if for_tensorrt else data


def qdq_float_parts_to_fp16(data: bytes) -> bytes:
    """QDQ model bytes -> the same model with its float parts in fp16 and float32 input/outputs.

    Raises the opset to TRT_INT8_OPSET (fp16 Q/DQ scales) and converts with ONNX Runtime's fp16
    converter, keeping the graph inputs/outputs and Softmax in fp32. DequantizeLinear then yields
    fp16 straight into each Conv/Gemm, which TensorRT fuses into an int8 kernel with fp16 output.
    """
    import onnx
    from onnx import version_converter
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = onnx.load_from_string(data)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < TRT_INT8_OPSET:
        proto = version_converter.convert_version(proto, TRT_INT8_OPSET)
    half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=["Softmax"])
    _drop_cast_round_trips(half.graph)
    model = OnnxModel(half)
    model.topological_sort()  # the converter appends its input Casts after their consumers
    return model.model.SerializeToString()


def _drop_cast_round_trips(graph) -> None:
    """Cast(fp16) -> Cast(fp32) pairs (the converter puts one after the fp32 Softmax, before the fp32
    `probs` output) become one Identity, so probs are not rounded to fp16 on the way out."""
    import onnx

    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}

    def cast_to(node, dtype) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in node.attribute)

    for node in list(graph.node):
        first = producer.get(node.input[0]) if node.input else None
        if (cast_to(node, onnx.TensorProto.FLOAT) and first is not None and cast_to(first, onnx.TensorProto.FLOAT16)
                and consumers.get(first.output[0]) == 1 and first.output[0] not in outputs):
            identity = onnx.helper.make_node("Identity", [first.input[0]], list(node.output), name=node.name)
            graph.node.insert(list(graph.node).index(node), identity)
            graph.node.remove(node)
            graph.node.remove(first)


def float_tail_nodes(proto) -> list[str]:
    """Names of the global pooling nodes and everything after them (fusion, head, softmax, novelty):
    int8 quantizes the backbone only, so logits, probabilities and novelty stay float (a quantized
    softmax would make every probability a multiple of 1/255). One walk, `quantize.graph.tail_nodes`."""
    from mineralnet.quantize.graph import tail_nodes

    return tail_nodes(proto)


def quantized_coverage(proto) -> tuple[int, int]:
    """(quantized, total) Conv/Gemm/MatMul nodes of the backbone (the float tail after the pooling is
    float by design): quantized = both data and weight inputs come from DequantizeLinear, so ONNX
    Runtime / TensorRT run them as int8 kernels."""
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    tail = set(float_tail_nodes(proto))
    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in tail]
    done = sum(all(producer.get(i) == "DequantizeLinear" for i in n.input[:2]) for n in compute)
    return done, len(compute)



# ----------------------------------------------------------------------------- the table row
def check(options, run=None) -> None:
    """Before anything is written: the gate spec, the fallback mode, the photo count, and where the
    quantization photos come from (--calib-data, else the training photos of the run's split.json)."""
    from mineralnet.quantize.stats import parse_gate

    parse_gate(options.int8_gate)
    if options.int8_fallback not in ("off", "auto"):
        raise MineralNetError(f"--int8-fallback {options.int8_fallback!r}: choose auto or off")
    if not 0 <= options.int8_min_share <= 1:
        raise MineralNetError(f"--int8-min-share {options.int8_min_share:g}: give a fraction of the MACs from 0 to 1 "
                              f"(default 0.8)")
    if options.quant_size is not None and options.quant_size < 1:
        raise MineralNetError(f"--calib-size {options.quant_size} must be at least 1")
    if not options.quant_data and run is not None:
        from mineralnet.runs import RunDir, run_folder

        if not RunDir(run_folder(run)).has_split():
            raise MineralNetError(NEEDS_PHOTOS)


def activations_for(ctx) -> tuple[str, bool]:
    """(activation type, for_tensorrt): int8 with the float parts in fp16 when an engine is asked for."""
    acts = ctx.options.int8_activations or ("int8" if "trt" in ctx.formats else "uint8")
    return acts, "trt" in ctx.formats and acts == "int8"


def write(ctx) -> list:
    """model.int8.onnx, gated on held-out photos, with its report model.int8.report.{json,md,png} beside it;
    a failed gate writes the report and no int8 file.

    The CPU flavour is `quantize.exporting.gated_int8`: the recipe chosen by measurement on selection photos,
    --int8-fallback auto, the gate --int8-gate. With --trt and int8 activations: the model a strongly typed
    TensorRT build needs, int8 Q/DQ with the float parts in fp16 (`quantize_int8(for_tensorrt=True)`, its
    own placement, no recipe search or fallback), judged by the same gate (`gates.int8_gate`) in ONNX
    Runtime with its graph optimisations off."""
    import json

    from mineralnet.export import gates, metadata
    from mineralnet.export.onnx import check_proto
    from mineralnet.infer.ort import ort_session, run_session
    from mineralnet.quantize import exporting, recipe as rc
    from mineralnet.quantize.stats import parse_gate

    o = ctx.options
    check(o, ctx.run)
    if "fp32" not in ctx.files:
        raise MineralNetError("int8 quantization starts from model.onnx; export it first (format onnx)")
    activations, for_tensorrt = activations_for(ctx)
    t0 = time.perf_counter()
    if for_tensorrt:
        photos, skipped = ctx.quantization_photos()
        data = quantize_int8(ctx.files["fp32"], photos, activations="int8", method=o.quant_method,
                             batch=8 if o.profile.dynamic else o.profile.max, for_tensorrt=True)
        fp32 = ort_session(ctx.files["fp32"])
        # The TensorRT flavour is checked with ONNX Runtime's graph optimisations off: measured on
        # minet7 (onnxruntime 1.32), its CPU optimiser miscomputes this fp16 Q/DQ graph from level
        # "basic" up (top-1 agreement 18% instead of 98% unoptimised); unoptimised, ORT runs the
        # graph exactly as written, which is what TensorRT builds from.
        int8 = ort_session(data, optimization="disable")
        record = gates.int8_gate(ctx, lambda x: run_session(fp32, x), lambda x: run_session(int8, x),
                                 what="int8 gate")
        label = f"TensorRT placement ({o.quant_method}, int8 symmetric, fp16 float parts)"
        photos_record = {"images": int(len(photos)), "skipped": skipped, "recipe": label,
                         "source": os.fspath(o.quant_data) if o.quant_data else "training photos of the run"}
    else:
        result, record, _ = exporting.gated_int8(
            ctx.files["fp32"], run=ctx.run, meta=ctx.meta, model=ctx.model, preprocess=ctx.preprocess,
            out_dir=ctx.out_dir, spec=parse_gate(o.int8_gate), calib_data=o.quant_data, calib_size=o.quant_size,
            val_data=o.val_data, fallback=o.int8_fallback, search=o.int8_search,
            min_int8_share=o.int8_min_share,
            recipe=exporting.replace_recipe(rc.default_recipe(), activations), log=ctx.log, ranking=o.report)
        data, gate, label = result.model, result.gate, result.recipe.label()
        record = {**record, "agreement": {"top1": gate.agreement.value, "images": gate.agreement.n,
                                          "source": gate.source}}
        if gate.accuracy_fp32 is not None:
            record["accuracy"] = {"fp32": gate.accuracy_fp32.value, "int8": gate.accuracy_int8.value,
                                  "images": gate.agreement.n}
        photos_record = {"images": int(result.report["photos"]["calibration"]), "recipe": label,
                         "source": result.report["photos"].get("calibration_source")}
    seconds = time.perf_counter() - t0
    import onnx

    proto = onnx.load_from_string(data)
    quant = {"weights": "int8 symmetric per-channel",
             "activations": "uint8 asymmetric" if activations == "uint8" else "int8 symmetric",
             "float_parts": "fp16" if for_tensorrt else "fp32", "tensorrt_compatible": for_tensorrt,
             "quantized_ops": list(TRT_QUANTIZED_OPS) if for_tensorrt else "all ONNX Runtime quantizes",
             "format": "QDQ", "recipe": label, "photos": photos_record["images"],
             "onnxruntime_optimization": "disable" if for_tensorrt else "all"}
    props = metadata.onnx_props(ctx.meta, precision="int8", outputs=o.outputs, batch=ctx.batch_info())
    props["quantization"] = json.dumps(quant)
    metadata.set_onnx_metadata(proto, props)
    check_proto(proto)
    data = proto.SerializeToString()
    done, total = quantized_coverage(proto)
    record = {"quantization_photos": photos_record, **record,
              "coverage": {"quantized": done, "conv_gemm_matmul": total}, "seconds": round(seconds, 1)}
    opset = max(o.opset, TRT_INT8_OPSET) if for_tensorrt else o.opset
    art = ctx.save("model.int8.onnx", data, {"format": "onnx", "precision": "int8", "opset": opset,
                                             "input": {"name": INPUT_NAME, "shape": ctx.input_shape()},
                                             "outputs": list(o.outputs), "batch": ctx.batch_info(),
                                             "quantization": quant, "int8": record,
                                             "versions": metadata.versions()})
    ctx.files["int8"] = art.path
    return [art]
