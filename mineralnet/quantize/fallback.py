"""Automatic mixed precision: return the most sensitive nodes to float, chosen on the ranking photos alone.

`auto_fallback` walks the sensitivity ranking (made on the RANKING photos: the logit SQNR each node adds when
it alone is left in float, `report.sensitivity`) and floats its first k nodes: every node whose own gain is
at least `min_gain_db` (MIN_GAIN_DB), then more in the ranking's order while each next node raises the logit SQNR
measured on the ranking photos by at least `min_step_db` (MIN_STEP_DB): the walk stops at the knee, where one more
node buys little. The held-out photos take no part in the choice; the result is judged on them once
(`pipeline.make_int8`). It reports the share of MACs still computed in int8 and the latency against fp32 and
full int8 (ONNX Runtime, this CPU). The result is an ordinary QDQ model, so a strongly typed TensorRT build
consumes it as it is.

Why a gain threshold and not "until the ranking gate holds" alone: training photos, even through the training
augmentation, are answered with larger margins than unseen photos, so int8 flips almost none of them
(measured on the cp7 run: 2 of 979 augmented training photos vs 7 of its 165 validation photos) and the
ranking gate holds with nothing floated. The logit error is what every photo carries; a node whose float
copy removes a large share of it is worth its MACs (cp7: the first depthwise conv, blocks.0.0.conv_dw, adds
2.6 dB of logit SQNR alone, for 1% of the MACs).

Why a floor on the int8 share of MACs (`min_int8_share`, MIN_INT8_SHARE): on a model that answers its ranking
photos almost perfectly, the ranking gate is decided by one or two flips of 256, and chasing them floated 47 nodes
of a full-size Lite0 student (1.8% of MACs left in int8, a 12 MB "int8" file as large and slow as fp32; minet7
cv fold 2, 2026-12-07). A file that keeps most of its compute in float is not what `--int8` asks for, so the
walk stops before the share falls below the floor and the held-out gate judges what it has: it passes, or the
export refuses int8 with the reason.

Why the knee of the measured SQNR and not "until the gate holds on the ranking photos" (the rule before
2026-12-07, still `min_step_db=None`): 256 ranking photos measure the logit error precisely (256 x classes logits)
but accuracy only through a handful of flips, and those flips do not follow the error. Replaying the walk of
three distilled students (studies/int8_walk.py, docs/RESULTS.md "Which stopping rule for the int8 fallback?"):
on fold 2 the ranking photos flipped 1-4 photos at every step from 0 to 16 nodes while the SQNR rose from 16.5 to
22.7 dB, so the gate rule floated to the floor (10 nodes, 80.7% of MACs int8); the knee stopped at 3 nodes (95.3%)
and the held-out gate passed there as well (drop 0.48, bound 1.71). On fold 0 the ranking gate held at 3 nodes,
where the knee also stops, and the held-out gate failed (bound 2.26): the gate on 256 photos errs both ways.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mineralnet.quantize import graph as g
from mineralnet.quantize.stats import GateResult, GateSpec, evaluate_gate

FALLBACK_MODES = ("off", "auto")
MIN_GAIN_DB = 0.5  # float every node that alone adds at least this much logit SQNR on the ranking photos
MIN_INT8_SHARE = 0.8  # never float so much that under this share of the MACs is computed in int8
MIN_STEP_DB = 0.5  # past those, float the next node only while it adds at least this much measured logit SQNR


@dataclass
class Fallback:
    model: bytes
    floated: list[str]
    ranking_gate: GateResult
    steps: list[dict] = field(default_factory=list)
    int8_mac_share: float = 0.0
    full_int8_mac_share: float = 0.0
    latency_ms: dict = field(default_factory=dict)
    min_gain_db: float = MIN_GAIN_DB
    min_step_db: float | None = MIN_STEP_DB
    min_int8_share: float = MIN_INT8_SHARE
    stopped_by_floor: bool = False  # the next node would have left under min_int8_share of the MACs in int8

    def to_dict(self) -> dict:
        return {"floated": self.floated, "ranking_gate": self.ranking_gate.line(), "steps": self.steps,
                "rule": f"every node whose own logit SQNR gain on the ranking photos is >= {self.min_gain_db:g} dB, "
                        + (f"then more in the ranking's order while each adds >= {self.min_step_db:g} dB of logit "
                           f"SQNR on the ranking photos, " if self.min_step_db is not None else
                           "then more in the ranking's order until the gate holds on the ranking photos, ")
                        + f"never below {self.min_int8_share:.0%} of the MACs in int8",
                "stopped_by_floor": self.stopped_by_floor,
                "int8_mac_share": self.int8_mac_share, "full_int8_mac_share": self.full_int8_mac_share,
                "latency_ms": self.latency_ms}


def leading_above(gains: Sequence[float], min_gain_db: float = MIN_GAIN_DB) -> int:
    """How many leading entries of `gains` (the sensitivity ranking's own gains, best first) reach
    `min_gain_db`: the nodes the fallback floats whatever else its rule says."""
    n = 0
    while n < len(gains) and gains[n] >= min_gain_db:
        n += 1
    return n


def auto_fallback(pre_fp32: bytes, qdq: bytes, order: Sequence[str], images: np.ndarray, labels,
                  spec: GateSpec, *, gains: Sequence[float] | None = None, min_gain_db: float = MIN_GAIN_DB,
                  min_step_db: float | None = MIN_STEP_DB, max_nodes: int | None = None,
                  min_int8_share: float = MIN_INT8_SHARE, log=None) -> Fallback:
    """Float order[:k], `order` being the sensitivity ranking made on `images` (the ranking photos). Every
    leading node whose own gain (`gains`, dB of logit SQNR, aligned with `order`) is at least `min_gain_db` is
    floated; past them, with `min_step_db` each further node is floated only while floating it raises the
    measured logit SQNR on `images` by at least `min_step_db` (the walk stops at the first that adds less, the
    knee), and with `min_step_db=None` nodes are floated until the gate (`spec`) holds on `images`. k never goes
    so far that under `min_int8_share` of the MACs stay int8 (`stopped_by_floor` then says so), nor past
    `max_nodes`."""
    from mineralnet.quantize.recipe import logit_sqnr_db

    proto = g.load(qdq)
    reference = g.logits(g.session(pre_fp32), images)
    limit = len(order) if max_nodes is None else min(len(order), max_nodes)
    if gains is not None and len(gains) != len(order):
        raise ValueError(f"auto_fallback: {len(gains)} gains for {len(order)} nodes")
    wanted = min(leading_above(gains if gains is not None else [], min_gain_db), limit)
    macs = g.macs(g.load(pre_fp32))
    steps, model, gate, floored, k = [], proto, None, False, 0
    for k in range(limit + 1):
        candidate = g.float_nodes(proto, pre_fp32, order[:k]) if k else proto
        share = g.int8_mac_share(candidate, macs)
        if k and share < min_int8_share:
            floored, k = True, k - 1
            if log:
                log(f"  fallback: stops at {k} node(s) in float: floating {order[k]} too would leave "
                    f"{share:.1%} of MACs in int8, under the {min_int8_share:.0%} floor")
            break
        got = g.logits(g.session(candidate), images)
        sqnr = logit_sqnr_db(reference, got)
        cand_gate = evaluate_gate(reference, got, labels, spec=spec, source=f"{len(images)} ranking photos")
        step = {"floated": k, "node": order[k - 1] if k else None, "flips": int(len(images) - cand_gate.agreement.k),
                "logit_sqnr_db": round(sqnr, 2), "drop": cand_gate.drop, "drop_high": cand_gate.drop_high,
                "passed": cand_gate.passed, "int8_mac_share": share}
        gain = sqnr - steps[-1]["logit_sqnr_db"] if steps else 0.0
        if min_step_db is not None and k > wanted and gain < min_step_db:
            steps.append({**step, "kept": False})
            k -= 1
            if log:
                log(f"  fallback: stops at {k} node(s) in float: floating {order[k]} too adds {gain:+.2f} dB of "
                    f"logit SQNR, under {min_step_db:g} dB")
            break
        model, gate = candidate, cand_gate
        steps.append({**step, "kept": True})
        if log:
            log(f"  fallback: {k} node(s) in float -> logit SQNR {sqnr:.1f} dB; {gate.line()}")
        if min_step_db is None and k >= wanted and gate.passed:
            break
    return Fallback(model.SerializeToString(), list(order[:k]), gate, steps, g.int8_mac_share(model, macs),
                    g.int8_mac_share(proto, macs), min_gain_db=min_gain_db, min_step_db=min_step_db,
                    min_int8_share=min_int8_share, stopped_by_floor=floored)


def latencies(models: dict[str, bytes], image: np.ndarray, seconds: float = 2.0) -> dict[str, float]:
    """Median ms per batch of each model in ONNX Runtime on this CPU (interleaved twice, best of the two)."""
    sessions = {k: g.session(v) for k, v in models.items()}
    best = {k: float("inf") for k in models}
    for _ in range(2):
        for k, s in sessions.items():
            best[k] = min(best[k], g.latency_ms(s, image, seconds=seconds / 2))
    return {k: round(v, 3) for k, v in best.items()}
