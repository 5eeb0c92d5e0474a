"""The int8 recipe, chosen by measurement.

What is fixed (the anchors' practice): static QDQ, int8 symmetric per-output-channel weights, uint8
asymmetric activations on x86 (int8 symmetric for TensorRT/ARM), the fusion tail after the pooling in
float, `reduce_range` (7-bit weights) exactly where the CPU lacks VNNI (u8 x s8 products can saturate
there; detected from /proc/cpuinfo: avx512_vnni, avx_vnni or amx_int8).

What is chosen: the calibration method (MinMax / percentile / entropy, when asked: the default tries MinMax
only, see DEFAULT_METHODS) and, when asked, whether the feature
maps the pooling reads (F2/F4, `graph.map_nodes`) stay float. Each candidate is quantized on the calibration
photos (by default every training photo up to 512) and scored on SELECTION photos (training photos not used for
calibration, through the seeded training augmentation), never on the held-out photos the gate and the report
use: fewest top-1 flips against fp32, then the highest logit SQNR; ties go to the simpler recipe (earlier in
`candidates()`).

No bias correction on this path: onnxruntime's quantize_static has none, and NNCF's corrected biases do not
carry over to this placement (studies/int8_nncf.py on three students: -1.6 to +0.4 dB). NNCF's own file gains
3.5-5.5 dB by quantizing only the inputs of the weighted ops, which ONNX Runtime cannot run as int8 kernels
(3-4x slower than fp32); it makes the OpenVINO int8 IR instead (`export.ir.quantize_nncf`).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.quantize import graph as g

METHODS = ("minmax", "percentile", "entropy")
KEEP_FLOAT = ("tail", "maps")  # after the pooling / also the maps the pooling reads
DEFAULT_CALIB_CAP = 512
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (or of the given text); empty where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)


@dataclass(frozen=True)
class Recipe:
    method: str = "minmax"
    keep_float: str = "tail"
    reduce_range: bool = False
    activations: str = "uint8"  # uint8 asymmetric (x86) | int8 symmetric (TensorRT, ARM)
    percentile: float = 99.999

    def label(self) -> str:
        return (f"{self.method}{'' if self.method != 'percentile' else f' {self.percentile:g}'}, "
                f"float {'tail' if self.keep_float == 'tail' else 'tail + pooled maps'}, "
                f"{self.activations} activations{', reduce_range' if self.reduce_range else ''}")

    def to_dict(self) -> dict:
        return asdict(self)


def default_recipe(flags: set[str] | None = None) -> Recipe:
    return Recipe(reduce_range=not has_vnni(flags))


# Measured on the cp7 run (EfficientNet-Lite0 F2+F4, bench/RESULTS.md "int8 gate"): keeping the pooled maps in float
# doubled ONNX Runtime's int8 latency (5.6 ms vs 2.9 ms; the Convs that make them lose their int8 kernels) and did
# not lower the held-out flips, so the default search leaves them out; `candidates(keep=KEEP_FLOAT)` tries them.
DEFAULT_KEEP = ("tail",)
# Measured on the same run (256 augmented selection photos, bench/RESULTS.md "int8 gate"): MinMax, percentile
# 99.999 and entropy came within 0.3 dB of logit SQNR and 1 flip of each other, below what 256 photos can tell
# apart, while percentile and entropy took 3-6x longer to calibrate (45-80 s vs 14 s on 512 photos). The
# float fallback gains more (the first depthwise conv alone +2.6 dB), so the default tries MinMax only;
# `candidates(methods=METHODS)` (bench/int8_gate.py --methods) tries all three.
DEFAULT_METHODS = ("minmax",)


def candidates(base: Recipe, methods: Sequence[str] = DEFAULT_METHODS,
               keep: Sequence[str] = DEFAULT_KEEP) -> list[Recipe]:
    return [replace(base, method=m, keep_float=k) for m in methods for k in keep]


def preprocess(fp32_model) -> bytes:
    """ONNX Runtime's quantization pre-processing (symbolic shape inference + basic optimisation) of the
    fp32 model: the float model the QDQ model is made from, and the one `graph.float_nodes` takes float
    weights from."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="mineralnet-q-") as tmp:
        src, pre = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx"
        if isinstance(fp32_model, (str, os.PathLike)):
            src = Path(fp32_model)
        else:
            src.write_bytes(fp32_model if isinstance(fp32_model, (bytes, bytearray))
                            else fp32_model.SerializeToString())
        quant_pre_process(os.fspath(src), os.fspath(pre))
        return pre.read_bytes()


def quantize(pre_fp32: bytes, calib_images: np.ndarray, recipe: Recipe, exclude: Sequence[str] = (),
             batch: int = 8) -> bytes:
    """Static QDQ quantization of the pre-processed fp32 model by `recipe`; the tail after the pooling and
    `exclude` stay float (recipe.keep_float == "maps" is applied afterwards by `apply_keep_float`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if recipe.method not in METHODS:
        raise MineralNetError(f"calibration method {recipe.method!r}: choose one of {', '.join(METHODS)}")
    if not len(calib_images):
        raise MineralNetError("int8 calibration needs at least one photo")
    proto = g.load(pre_fp32)
    fixed = next(iter(proto.graph.input)).type.tensor_type.shape.dim[0]
    fixed = fixed.dim_value if fixed.HasField("dim_value") and fixed.dim_value > 0 else None
    extra = {"WeightSymmetric": True, "ActivationSymmetric": recipe.activations == "int8", "CalibStridedMinMax": 1}
    if recipe.method == "percentile":
        extra["CalibPercentile"] = recipe.percentile
    with tempfile.TemporaryDirectory(prefix="mineralnet-q-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        pre.write_bytes(pre_fp32)
        reader = g.CalibrationReader(calib_images, proto.graph.input[0].name, fixed or batch, bool(fixed))
        quantize_static(
            os.fspath(pre), os.fspath(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=recipe.reduce_range, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8 if recipe.activations == "uint8" else QuantType.QInt8,
            nodes_to_exclude=sorted(set(g.tail_nodes(proto)) | set(exclude)),
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[recipe.method],
            extra_options=extra)
        data = out.read_bytes()
    return apply_keep_float(data, pre_fp32, recipe)


def apply_keep_float(qdq: bytes, pre_fp32: bytes, recipe: Recipe) -> bytes:
    """keep_float == "maps": the pooling nodes read their maps in float and the nodes making them compute in
    float (`graph.map_nodes`); "tail": unchanged."""
    if recipe.keep_float == "tail":
        return qdq
    proto = g.load(qdq)
    pools = [n.name for n in proto.graph.node if n.op_type in g.POOL_OPS]
    return g.float_nodes(proto, pre_fp32, [*pools, *g.names_in(proto, g.map_nodes(proto))]).SerializeToString()


@dataclass
class Trial:
    recipe: Recipe
    flips: int
    images: int
    logit_sqnr_db: float
    seconds: float

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.label(), **self.recipe.to_dict(), "flips": self.flips, "images": self.images,
                "agreement": 1 - self.flips / self.images if self.images else None,
                "logit_sqnr_db": round(self.logit_sqnr_db, 2), "seconds": round(self.seconds, 1)}


def logit_sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """20 log10(||reference|| / ||reference - candidate||) over all logits."""
    noise = float(np.linalg.norm(reference - candidate))
    return 20 * np.log10(max(float(np.linalg.norm(reference)), 1e-30) / max(noise, 1e-30))


@dataclass
class Choice:
    recipe: Recipe
    model: bytes  # the QDQ model of the chosen recipe
    trials: list[Trial] = field(default_factory=list)
    calib_images: int = 0
    select_images: int = 0

    def to_dict(self) -> dict:
        return {"chosen": self.recipe.label(), "recipe": self.recipe.to_dict(), "calib_images": self.calib_images,
                "select_images": self.select_images, "trials": [t.to_dict() for t in self.trials],
                "criterion": "fewest top-1 flips vs fp32 on the selection photos (training photos not used for "
                             "calibration), then highest logit SQNR"}


def choose(pre_fp32: bytes, calib_images: np.ndarray, select_images: np.ndarray, trials: Sequence[Recipe],
           log=None) -> Choice:
    """Quantize with every recipe in `trials` and keep the best on `select_images` (see module doc)."""
    import time

    if not trials:
        raise MineralNetError("no int8 recipe to try")
    reference = g.logits(g.session(pre_fp32), select_images)
    best, results = None, []
    for recipe in trials:
        t0 = time.perf_counter()
        data = quantize(pre_fp32, calib_images, recipe)
        got = g.logits(g.session(data), select_images)
        trial = Trial(recipe, int((got.argmax(1) != reference.argmax(1)).sum()), len(select_images),
                      logit_sqnr_db(reference, got), time.perf_counter() - t0)
        results.append(trial)
        if log:
            log(f"  recipe {recipe.label()}: {trial.flips}/{trial.images} flips, logit SQNR "
                f"{trial.logit_sqnr_db:.1f} dB ({trial.seconds:.0f} s)")
        if best is None or (trial.flips, -trial.logit_sqnr_db) < (best[0].flips, -best[0].logit_sqnr_db):
            best = (trial, data)
    return Choice(best[0].recipe, best[1], results, len(calib_images), len(select_images))
