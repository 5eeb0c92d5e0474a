"""One call that makes a gated int8 model: recipe (chosen or given) -> full int8 -> gate on held-out photos
-> automatic fallback (chosen on the ranking photos) -> gate on held-out photos -> report.

Three disjoint photo sets, so no choice is judged on the photos that made it:
- calibration: the photos the ranges come from (default: the run's training photos, up to 512);
- selection/ranking: other training photos; the recipe search and the sensitivity ranking (and the
  fallback's own gate) use them;
- held-out: the photos the gate and the report judge (default: the run's validation photos).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mineralnet.quantize import graph as g
from mineralnet.quantize import recipe as rc
from mineralnet.quantize import report as rp
from mineralnet.quantize.fallback import MIN_INT8_SHARE, auto_fallback, latencies
from mineralnet.quantize.stats import GateResult, GateSpec, evaluate_gate


@dataclass
class Photos:
    images: np.ndarray
    labels: np.ndarray | None = None
    files: list | None = None
    source: str = "photos"

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Int8Result:
    model: bytes
    gate: GateResult
    recipe: rc.Recipe
    report: dict = field(default_factory=dict)
    full_int8: bytes | None = None  # before the fallback, when one ran


def make_int8(fp32_model, calib: Photos, select: Photos, heldout: Photos, *, spec: GateSpec | None = None,
              recipe: rc.Recipe | None = None, search: bool = True, fallback: str = "off",
              want_report: bool = True, ranking: bool | None = None, report_images: int = 32, noise: dict | None = None,
              classes=None, max_fallback_nodes: int | None = None, trials=None,
              min_int8_share: float = MIN_INT8_SHARE, log=None) -> Int8Result:
    """See the module doc. `recipe`: the base recipe (default: `recipe.default_recipe()` for this CPU); with
    `search` the method and the float maps are chosen on `select`. `want_report`: per-tensor and per-weight
    statistics; `ranking` (default: want_report): the sensitivity ranking on `select`.
    `noise`: {"fp16"/"bf16": held-out logits}."""
    log = log or (lambda line: None)
    spec = spec or GateSpec()
    base = recipe or rc.default_recipe()
    t0 = time.perf_counter()
    pre = rc.preprocess(fp32_model)
    report: dict = {"photos": {"calibration": len(calib), "selection": len(select), "held_out": len(heldout),
                               "held_out_source": heldout.source},
                    "cpu_vnni": rc.has_vnni(), "spec": spec.text()}
    if search and len(select):
        choice = rc.choose(pre, calib.images, select.images, trials or rc.candidates(base), log=log)
        recipe, model = choice.recipe, choice.model
        report["recipe"] = choice.to_dict()
    else:
        recipe, model = base, rc.quantize(pre, calib.images, base)
        report["recipe"] = {"chosen": recipe.label(), "recipe": recipe.to_dict(), "calib_images": len(calib)}
    fp32_sess = g.session(pre)
    ref = g.logits(fp32_sess, heldout.images)
    full = model
    gate = evaluate_gate(ref, g.logits(g.session(model), heldout.images), heldout.labels, spec=spec,
                         source=f"{len(heldout)} {heldout.source}", noise=noise)
    report["full_int8_gate"] = gate.to_dict()
    log(f"  full int8 ({recipe.label()}): {gate.line()}")
    sens = None
    ranking = want_report if ranking is None else ranking
    if (ranking or fallback == "auto") and len(select):
        sens = rp.sensitivity(pre, model, select.images, select.labels, log=log)
        report["sensitivity"] = sens
    # The fallback is chosen on the ranking photos alone, whatever the held-out gate of full int8 said: the
    # held-out photos judge the final model once and never steer the choice.
    if fallback == "auto" and sens:
        # every node in the ranking's order: not filtered by its own flips, which on ranking photos are one or
        # two photos of noise (cp7: the node with the largest gain, +2.2 dB, flipped 2 where full int8 flipped 1)
        rows = sens["ranking"]
        fb = auto_fallback(pre, model, [r["node"] for r in rows], select.images, select.labels, spec,
                           gains=[r["sqnr_gain_db"] for r in rows], max_nodes=max_fallback_nodes,
                           min_int8_share=min_int8_share, log=log)
        model = fb.model
        fb.latency_ms = latencies({"fp32": pre, "full_int8": full, "fallback_int8": model}, heldout.images[0])
        gate = evaluate_gate(ref, g.logits(g.session(model), heldout.images), heldout.labels, spec=spec,
                             source=f"{len(heldout)} {heldout.source}", noise=noise)
        report["fallback"] = {**fb.to_dict(), "held_out_gate": gate.line()}
        floor = f", stopped at the {min_int8_share:.0%} floor" if fb.stopped_by_floor else ""
        log(f"  fallback ({len(fb.floated)} node(s) in float, {fb.int8_mac_share:.1%} of MACs int8{floor}): "
            f"{gate.line()}")
    report["gate"] = gate.to_dict()
    got = g.logits(g.session(model), heldout.images)
    report["flipped"] = rp.flipped_photos(ref, got, heldout.files, heldout.labels, classes)
    if want_report:
        sub = heldout.images[:report_images]
        report["tensors"] = rp.tensor_stats(pre, model, sub)
        report["tensors_images"] = int(len(sub))
        report["weights"] = rp.weight_stats(pre, model)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return Int8Result(model, gate, recipe, report, full if model is not full else None)
