"""The checks every exported file passes before it gets its name: one implementation for every format.

    parity      a float file (ONNX fp32/fp16, OpenVINO fp32, ...) against PyTorch on the check photos:
                every output within the precision's tolerance, top-1 identical (fp16: except near-ties)
    int8_gate   an int8 file against its fp32 reference on held-out photos: top-1 accuracy drop and its
                upper 95% bound within --int8-gate (the gate of mineralnet/quantize/, which
                model.int8.onnx passes through `quantize.exporting.gated_int8`)

The PyTorch reference (`reference`) is the run's model with its open-set detector when the run is
calibrated (the `novelty` output), so a calibrated run is gated on every output it exports.
A runner here is any callable images (N, 3, S, S) float32 -> {output name: (N, ...) array}.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mineralnet.errors import MineralNetError

FP32_ATOL = 1e-4  # max |logit difference|; top-1 must be identical on every image
FP16_RTOL = 1e-2  # fp16: max |logit difference| <= FP16_RTOL * max(1, max |logit|)
FP16_FLOOR_FACTOR = 3.0  # ... or <= this times the error of PyTorch running the same fp16 graph, when measured

Runner = Callable[[np.ndarray], dict]


def torch_outputs(model: nn.Module, images: np.ndarray, outputs: Sequence[str], batch: int = 16,
                  novelty: nn.Module | None = None) -> dict[str, np.ndarray]:
    """The reference numbers: FusionNet in fp32 eager mode on CPU (`novelty`: the run's detector)."""
    from mineralnet.infer.loop import predict_array

    if "novelty" in outputs and novelty is None:
        raise MineralNetError("the novelty output needs the run's detector: this run has no calibration; run "
                              "`mineralnet calibrate RUN` first")
    values = predict_array(model.float().cpu(), images, batch=batch, device="cpu",
                           novelty=novelty if "novelty" in outputs else None)
    if "probs" in outputs:
        values["probs"] = torch.softmax(torch.from_numpy(values["logits"]), 1).numpy()
    return {n: values[n] for n in outputs}


def reference(ctx, images: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch's outputs for the export `ctx` on `images`: every output asked, novelty included."""
    return torch_outputs(ctx.model, images, ctx.options.outputs, novelty=ctx.novelty)


def _scores(values: dict[str, np.ndarray]) -> np.ndarray | None:
    return values.get("logits", values.get("probs"))


def _top(values: dict[str, np.ndarray]) -> np.ndarray:
    """The scores top-1 is read from: logits, else probs, else the first output."""
    scores = _scores(values)
    return next(iter(values.values())) if scores is None else scores


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose argmax agrees."""
    return float((a.argmax(1) == b.argmax(1)).mean()) if len(a) else float("nan")


@dataclass
class ParityReport:
    """A runtime's outputs vs PyTorch's on the same images."""

    precision: str
    images: int
    source: str  # where the images came from
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # per output
    tolerance: dict[str, float] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)  # fp16: PyTorch's own fp16 error on the same images
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
            source: str, floor: dict[str, float] | None = None) -> ParityReport:
    """Compare `candidate` outputs against `reference` with the tolerance of `precision`.

    fp32: every output within FP32_ATOL (embedding, novelty: relative to their scale) and top-1
    identical on every image. fp16: within FP16_RTOL * max(1, max |reference|) and top-1 identical
    wherever the reference's top-1/top-2 margin exceeds twice that tolerance (closer calls may flip).
    `floor` (fp16): per output, the max |difference| PyTorch itself makes running the same fp16 graph on the
    same images; the tolerance is then at least FP16_FLOOR_FACTOR times it, so a file is held to what fp16
    can do for this model (full-size Lite0 at 224 px: PyTorch's fp16 alone is 0.7% of the logit scale) while
    a broken graph, far above that, still fails.
    """
    n = len(next(iter(reference.values())))
    report = ParityReport(precision=precision, images=n, source=source)
    for name, ref in reference.items():
        got = candidate[name]
        scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
        if precision == "fp16":
            tol = FP16_RTOL * scale
            if floor and name in floor:
                report.floor[name] = floor[name]
                tol = max(tol, FP16_FLOOR_FACTOR * floor[name])
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


def parity(ctx, run: Runner, *, precision: str, what: str, hint: str, floor_run: Runner | None = None) -> dict:
    """Gate a float file: `run` on ctx's check images vs PyTorch. Returns the report as a dict;
    raises naming `what` (e.g. "parity gate", "OpenVINO parity gate") and `hint` when it fails.
    `floor_run` (fp16): PyTorch running the same reduced-precision graph, whose error sets the tolerance's floor."""
    images, source = ctx.check_images()
    ref = reference(ctx, images)
    floor = None
    if floor_run is not None:
        own = floor_run(images)
        floor = {k: float(np.abs(own[k].astype(np.float64) - ref[k]).max()) if ref[k].size else 0.0
                 for k in ref if k in own}
    report = compare(ref, run(images), precision=precision, source=source, floor=floor)
    if not report.passed:
        raise MineralNetError(f"{what} FAILED, nothing written: {report.summary()}; {hint}")
    return report.to_dict()


def int8_gate(ctx, fp32: Runner, int8: Runner, *, what: str, stem: str | None = None) -> dict:
    """Gate an int8 file against its fp32 reference on the held-out photos (--val-data, else the run's
    validation photos): the int8 top-1 accuracy drop and its upper 95% bound within --int8-gate
    (`quantize.stats.evaluate_gate`). Writes the report (gate and flipped photos) to OUT/STEM.{json,md}
    and raises one line naming `what` ("OpenVINO int8 gate"), the drop, the bound and the report when
    it fails. Returns the manifest's int8 record ({"gate", "report", "agreement", "accuracy"})."""
    from mineralnet.quantize.exporting import REPORT_STEM, heldout_gate

    return heldout_gate(ctx, fp32, int8, what=what, stem=stem or REPORT_STEM)
