"""ONNX export of a FusionNet: fp32 / fp16 graphs, the parity gate, and int8 QDQ quantization.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), the default and the
maintained path since torch 2.9. Measured against the legacy TorchScript exporter on torch 2.14
(ResNet-50 F2+F4): the same numbers (max |logit diff| vs PyTorch 5.6e-8 for both) and the same
ONNX Runtime latency, but a clean graph (53 Conv + 49 Relu + 16 Add + 2 ReduceMean + Concat +
Gemm, BatchNorm folded) where the legacy one adds 59 Identity nodes and a DeprecationWarning. It
needs opset >= 18 (the down-conversion to 17 fails on ReduceMean), which ONNX Runtime >= 1.14 and
TensorRT 10 read. It is 3-6x slower to export (7-14 s vs 1-5 s), which does not matter.

Everything here works on bytes/ModelProto and temporary files; `mineralnet.export.formats` decides
file names and writes the results only after the checks pass.
"""
# Over 500 lines: the ONNX graph, its metadata, the parity gate and int8 quantization are one format's export;
# the quantization part (~150 lines) is the first to move out if it grows.
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mineralnet import __version__
from mineralnet.errors import MineralNetError

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probs", "embedding", "novelty")  # novelty: runs with a calibration
DEFAULT_OUTPUTS = ("logits", "probs")
MIN_OPSET = 18
DEFAULT_OPSET = 18

# Parity gate (ONNX Runtime vs PyTorch on the same preprocessed images).
FP32_ATOL = 1e-4  # max |logit difference|; top-1 must be identical on every image
FP16_RTOL = 1e-2  # fp16: max |logit difference| <= FP16_RTOL * max(1, max |logit|)

# metadata_props keys; every value is JSON text (the edge runner parses them with json.loads).
METADATA_KEYS = ("classes", "num_classes", "image_size", "resize", "mean", "std", "backbone", "stages",
                 "feature_dim", "precision", "outputs", "input", "batch", "mineralnet_version")


class ExportHead(nn.Module):
    """FusionNet -> the named outputs, in order: logits (B, C), probs (B, C), embedding (B, D),
    novelty (B,) (the run's calibrated detector, `novelty(fused, logits)`, computed in float32).

    With ``half=True`` the network runs in fp16 between a cast of the fp32 input and casts of the
    outputs back to fp32, so callers feed and read float32 whatever the precision; the softmax is
    taken in fp32.
    """

    def __init__(self, model: nn.Module, outputs: Sequence[str] = DEFAULT_OUTPUTS, half: bool = False,
                 novelty: nn.Module | None = None):
        super().__init__()
        self.model = model.half() if half else model
        self.novelty = novelty
        self.outputs = tuple(outputs)
        self.half = half

    def forward(self, images: torch.Tensor):
        x = images.half() if self.half else images
        fused = self.model.embed(x)  # (B, feature_dim)
        logits = self.model.forward_head(fused).float()  # (B, num_classes)
        values = {"logits": logits, "embedding": fused.float()}
        if "probs" in self.outputs:
            values["probs"] = torch.softmax(logits, dim=1)
        if "novelty" in self.outputs:
            values["novelty"] = self.novelty(fused.float(), logits)
        return tuple(values[name] for name in self.outputs)


def parse_outputs(text: str | Sequence[str]) -> tuple[str, ...]:
    """"logits,probs" -> ("logits", "probs"), in the canonical order, validated."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    bad = [n for n in names if n not in OUTPUT_NAMES]
    if bad or not names:
        raise MineralNetError(f"--outputs {','.join(names) or repr(text)}: choose a comma list of "
                              f"{', '.join(OUTPUT_NAMES)} (e.g. --outputs logits,probs)")
    return tuple(n for n in OUTPUT_NAMES if n in names)


def onnx_proto(model: nn.Module, *, image_size: int, outputs: Sequence[str] = DEFAULT_OUTPUTS,
               batch: int = 1, dynamic: bool = False, opset: int = DEFAULT_OPSET, half: bool = False,
               novelty: nn.Module | None = None):
    """Export `model` (a FusionNet) to an in-memory, self-contained onnx.ModelProto.

    The input is ``images`` (B, 3, S, S) float32, normalised RGB; B is the symbol ``batch`` when
    `dynamic`, else the fixed `batch`. Outputs are named as in `outputs`.
    """
    import copy

    if opset < MIN_OPSET:
        raise MineralNetError(f"--opset {opset}: the torch.export-based exporter writes opset {MIN_OPSET} or "
                              f"newer (read by ONNX Runtime >= 1.14 and TensorRT >= 8.6); use --opset {MIN_OPSET}")
    model = copy.deepcopy(model).float().eval().cpu()  # .half() below must not touch the caller's model
    head = ExportHead(model, outputs, half=half, novelty=novelty).eval()
    example = torch.zeros(2 if dynamic else batch, 3, image_size, image_size)
    kwargs = {}
    if dynamic:
        kwargs["dynamic_shapes"] = {"images": {0: torch.export.Dim("batch")}}
    try:
        program = torch.onnx.export(head, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(outputs), opset_version=opset, external_data=False,
                                    verbose=False, **kwargs)
    except Exception as e:
        raise MineralNetError(f"torch.onnx.export failed for {model.config()} at opset {opset} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); try another --opset") from None
    proto = program.model_proto
    if dynamic:  # name the symbolic batch dimension "batch" on the input and every output
        for value in list(proto.graph.input) + list(proto.graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_value")
            dim.dim_param = "batch"
    return proto


def metadata_props(meta: dict, *, precision: str, outputs: Sequence[str], batch: dict) -> dict[str, str]:
    """The metadata stored inside the ONNX file (strings holding JSON), from a run's model.json."""
    values = {
        "classes": list(meta["classes"]), "num_classes": int(meta["num_classes"]),
        "image_size": int(meta["image_size"]), "resize": int(meta["resize"]),
        "mean": [float(m) for m in meta["mean"]], "std": [float(s) for s in meta["std"]],
        "backbone": meta["backbone"], "stages": list(meta["stages"]),
        "feature_dim": int(meta.get("feature_dim", 0)), "precision": precision, "outputs": list(outputs),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "color": "RGB",
                  "preprocess": "decode (EXIF upright) -> resize shorter side to `resize` (area when "
                                "shrinking, bilinear when enlarging) -> centre crop image_size -> "
                                "x / 255 -> (x - mean) / std"},
        "batch": batch, "mineralnet_version": __version__,
    }
    props = {k: json.dumps(values[k]) for k in METADATA_KEYS}
    if meta.get("calibration"):  # temperature, threshold, conformal scores (mineralnet.calibration)
        props["calibration"] = json.dumps(meta["calibration"])
    return props


def set_metadata(proto, props: dict[str, str]) -> None:
    """Replace the model-level metadata_props of `proto` by `props` (keeps nothing else)."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = proto.producer_name or "pytorch"
    proto.doc_string = (f"MineralNet {__version__} FusionNet; input `{INPUT_NAME}` (B,3,S,S) normalised RGB; "
                        f"class names and preprocessing in metadata_props")


def parse_metadata(props: dict[str, str]) -> dict:
    """metadata_props (str -> JSON str) -> the model meta dict (classes, mean, std, ...)."""
    missing = [k for k in ("classes", "image_size", "resize", "mean", "std") if k not in props]
    if missing:
        raise MineralNetError(f"ONNX metadata lacks {', '.join(missing)}: the file was not written by "
                              f"mineralnet-export; re-export it from the run with `mineralnet-export RUN`")
    out = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def check_proto(proto) -> None:
    """onnx.checker full check (graph, types, shape inference) and self-containedness."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise MineralNetError(f"the exported ONNX graph fails onnx.checker ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); report this with the model config") from None
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise MineralNetError(f"ONNX weights {external[:3]} are stored outside the file; the exporter must "
                              f"embed them (model under 2 GB)")


def ort_session(path_or_bytes, *, providers: Sequence[str] | None = None, threads: int | None = None,
                optimization: str = "auto", spinning: bool = True):
    """An onnxruntime.InferenceSession on CPU (or the given providers), with a clear error.

    optimization "auto" follows the file's own metadata: the int8 model exported for TensorRT says
    `"onnxruntime_optimization": "disable"` (ONNX Runtime's optimiser miscomputes its fp16 Q/DQ graph),
    everything else runs fully optimised. `spinning=False` stops idle pool threads from spinning on the
    cores (benchmarks that interleave runtimes need that).
    """
    first = "all" if optimization == "auto" else optimization
    session = _ort_session(path_or_bytes, providers, threads, first, spinning)
    if optimization == "auto":
        quant = json.loads(session.get_modelmeta().custom_metadata_map.get("quantization", "{}") or "{}")
        wanted = quant.get("onnxruntime_optimization", "all")
        if wanted != "all":
            session = _ort_session(path_or_bytes, providers, threads, wanted, spinning)
    return session


def _ort_session(path_or_bytes, providers, threads, optimization: str, spinning: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: no optimizer chatter on stderr
    data = os.fspath(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) else path_or_bytes
    try:
        return ort.InferenceSession(data, opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:
        where = repr(data) if isinstance(data, str) else "the exported model"
        raise MineralNetError(f"ONNX Runtime cannot load {where} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); the file is damaged or not an ONNX model: "
                              f"re-export it with `mineralnet-export RUN`") from None


def session_batch(session) -> int | None:
    """The fixed batch size of the session's input, or None when it is dynamic."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def run_session(session, images: np.ndarray, batch: int | None = None) -> dict[str, np.ndarray]:
    """Run all of `images` (N, 3, S, S) through `session` in chunks of its batch size.

    A fixed-batch model gets the last chunk padded by repeating its last image (the padding rows
    are dropped from the result). Returns {output name: (N, ...) array}.
    """
    fixed = session_batch(session)
    step = fixed or batch or 16
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(images), step):
        x = np.ascontiguousarray(images[start:start + step], dtype=np.float32)
        n = len(x)
        if fixed and n < fixed:
            x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
        for key, value in zip(names, session.run(names, {name: x})):
            chunks[key].append(value[:n])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in chunks.items()}


@torch.inference_mode()
def torch_outputs(model: nn.Module, images: np.ndarray, outputs: Sequence[str], batch: int = 16,
                  novelty: nn.Module | None = None) -> dict[str, np.ndarray]:
    """The reference numbers: FusionNet in fp32 eager mode on CPU."""
    model = model.float().eval().cpu()
    parts: dict[str, list] = {n: [] for n in outputs}
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch], dtype=np.float32))
        fused = model.embed(x)
        logits = model.forward_head(fused)
        values = {"logits": logits, "probs": torch.softmax(logits, 1), "embedding": fused}
        if "novelty" in outputs:
            values["novelty"] = novelty(fused, logits)
        for n in outputs:
            parts[n].append(values[n].numpy())
    return {n: np.concatenate(v) for n, v in parts.items()}


def _scores(values: dict[str, np.ndarray]) -> np.ndarray | None:
    return values.get("logits", values.get("probs"))


@dataclass
class ParityReport:
    """ONNX Runtime vs PyTorch on the same images."""

    precision: str
    images: int
    source: str  # where the images came from
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # per output
    tolerance: dict[str, float] = field(default_factory=dict)
    top1_equal: int = 0
    top1_required: int = 0  # images whose top-1 must agree (fp16 exempts near-ties)
    passed: bool = False

    def summary(self) -> str:
        diffs = ", ".join(f"max|d {k}| {v:.2e} (tol {self.tolerance[k]:.0e})" for k, v in self.max_abs_diff.items())
        return (f"{self.precision} parity on {self.images} {self.source}: {diffs}; "
                f"top-1 {self.top1_equal}/{self.top1_required} identical")

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *, precision: str,
            source: str) -> ParityReport:
    """Compare `candidate` outputs against `reference` with the tolerance of `precision`.

    fp32: every output within FP32_ATOL (embedding: relative to its scale) and top-1 identical on
    every image. fp16: within FP16_RTOL * max(1, max |reference|) and top-1 identical wherever the
    reference's top-1/top-2 margin exceeds twice that tolerance (closer calls may flip in fp16).
    """
    n = len(next(iter(reference.values())))
    report = ParityReport(precision=precision, images=n, source=source)
    for name, ref in reference.items():
        got = candidate[name]
        scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
        if precision == "fp16":
            tol = FP16_RTOL * scale
        else:
            tol = FP32_ATOL * (scale if name in ("embedding", "novelty") else 1.0)
        diff = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
        if not math.isfinite(diff):
            diff = float("inf")
        report.max_abs_diff[name], report.tolerance[name] = diff, tol
    ref_scores, got_scores = _scores(reference), _scores(candidate)
    if ref_scores is not None:
        same = ref_scores.argmax(1) == got_scores.argmax(1)
        required = np.ones(n, bool)
        if precision == "fp16" and ref_scores.shape[1] > 1:
            top2 = np.sort(ref_scores, axis=1)[:, -2:]
            key = "logits" if "logits" in reference else "probs"
            required = (top2[:, 1] - top2[:, 0]) > 2 * report.tolerance[key]
        report.top1_required = int(required.sum())
        report.top1_equal = int((same & required).sum())
    report.passed = (all(report.max_abs_diff[k] <= report.tolerance[k] for k in report.max_abs_diff)
                     and report.top1_equal == report.top1_required)
    return report


def parity_gate(model: nn.Module, onnx_bytes: bytes, images: np.ndarray, outputs: Sequence[str], *,
                precision: str, source: str, novelty: nn.Module | None = None) -> ParityReport:
    """Run the ONNX bytes in ONNX Runtime (CPU) and PyTorch on `images`; raise if they disagree."""
    session = ort_session(onnx_bytes)
    candidate = run_session(session, images)
    reference = torch_outputs(model, images, outputs, novelty=novelty)
    report = compare(reference, candidate, precision=precision, source=source)
    if not report.passed:
        raise MineralNetError(f"parity gate FAILED, nothing written: {report.summary()}; the ONNX graph does "
                              f"not reproduce the PyTorch model (try another --opset, or report it)")
    return report


# ----------------------------------------------------------------------------- int8
class _Batches:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed images (N, 3, S, S)."""

    def __init__(self, images: np.ndarray, batch: int | None):
        self.images, self.step, self.pos = images, batch or 1, 0
        self.fixed = batch
        self.end = len(images)

    def __len__(self) -> int:  # in batches
        return -(-len(self.images) // self.step)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve batches [start_index, end_index) next (ORT's strided calibration calls this)."""
        self.pos = start_index * self.step
        self.end = min(len(self.images), end_index * self.step)

    def get_next(self):
        if self.pos >= self.end:
            return None
        x = self.images[self.pos:min(self.pos + self.step, self.end)]
        self.pos += self.step
        if self.fixed and len(x) < self.fixed:
            x = np.concatenate([x, np.repeat(x[-1:], self.fixed - len(x), axis=0)])
        return {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}

    def rewind(self):
        self.pos = 0


INT8_ACTIVATIONS = ("uint8", "int8")
CALIB_METHODS = ("minmax", "percentile", "entropy")
# The int8 model for TensorRT (strongly typed: the graph is the precision). Q/DQ only on the inputs
# of the ops TensorRT runs as int8 kernels (weighted ops, and Add so the residual add fuses into the
# int8 Conv), not on their outputs, as TensorRT's Q/DQ placement guide recommends (so the logits
# are not rounded to int8); everything else stays float and is converted to fp16, so layers
# between Q/DQ pairs do not run in fp32. Softmax (probs) stays fp32.
TRT_QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add")
# fp16 Q/DQ scales need QuantizeLinear/DequantizeLinear-19; TensorRT 10.0 parses opsets up to 20.
TRT_INT8_OPSET = 19


def quantize_int8(fp32_path, calib_images: np.ndarray, *, activations: str = "uint8",
                  method: str = "minmax", batch: int | None = None, reduce_range: bool = False,
                  for_tensorrt: bool = False) -> bytes:
    """Static QDQ int8 quantization of the fp32 ONNX at `fp32_path`; returns the model bytes.

    Weights: int8, symmetric, per output channel. Activations: `activations` = "uint8"
    (asymmetric; fastest in ONNX Runtime on x86 CPUs with VNNI, where Relu folds into the zero
    point) or "int8" (symmetric, zero point 0: what TensorRT's explicit quantization accepts and
    ARM CPUs prefer). Ranges come from running `calib_images` (already through the eval
    preprocessing) with `method`. ONNX Runtime's pre-processing (symbolic shape inference and
    basic graph optimisation) runs first, as its quantization guide asks. `reduce_range` (7-bit
    weights) only helps x86 CPUs without VNNI, where u8 x s8 products can saturate.

    `for_tensorrt`: the model a strongly typed TensorRT build needs (int8 activations required):
    Q/DQ on TRT_QUANTIZED_OPS only, float biases (TensorRT quantizes them itself), and the float
    parts in fp16 (`qdq_float_parts_to_fp16`).

    Why ONNX Runtime's calibrator and not NVIDIA ModelOpt (`modelopt.onnx.quantization`, whose
    default high-precision dtype is fp16): ModelOpt's int8 mode runs a patched copy of this same
    ORT `quantize_static` underneath, then applies TensorRT placement rules and an fp16 conversion,
    which is what the two steps here do. Measured on minet7 (resnet10t run, 128 calibration and
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
    if method not in CALIB_METHODS:
        raise MineralNetError(f"--calib-method {method!r}: choose one of {', '.join(CALIB_METHODS)}")
    with tempfile.TemporaryDirectory(prefix="mineralnet-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(os.fspath(fp32_path), os.fspath(pre))
        import onnx

        keep_float = float_tail_nodes(onnx.load(os.fspath(pre)))
        extra = {"WeightSymmetric": True, "ActivationSymmetric": activations == "int8",
                 # Feed the calibrator one batch per collect_data call: ranges (MinMax) and
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
            os.fspath(pre), os.fspath(out), _Batches(calib_images, batch), quant_format=QuantFormat.QDQ,
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
    softmax would make every probability a multiple of 1/255)."""
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    todo = [n for n in proto.graph.node if n.op_type in ("ReduceMean", "GlobalAveragePool")]
    seen: dict[str, object] = {}
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen[node.name] = node
        for out in node.output:
            todo += consumers.get(out, [])
    if "" in seen:
        raise MineralNetError("the ONNX graph has unnamed nodes after the pooling; int8 cannot keep them float")
    return sorted(seen)


def quantized_coverage(proto) -> tuple[int, int]:
    """(quantized, total) Conv/Gemm/MatMul nodes of the backbone (the float tail after the pooling is
    float by design): quantized = both data and weight inputs come from DequantizeLinear, so ONNX
    Runtime / TensorRT run them as int8 kernels."""
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    tail = set(float_tail_nodes(proto))
    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in tail]
    done = sum(all(producer.get(i) == "DequantizeLinear" for i in n.input[:2]) for n in compute)
    return done, len(compute)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose argmax agrees."""
    return float((a.argmax(1) == b.argmax(1)).mean()) if len(a) else float("nan")
