"""Automatic mixed precision: return the most sensitive nodes to float until the gate holds.

`auto_fallback` walks the sensitivity ranking (made on the RANKING photos) and floats its first k nodes,
k = 0, 1, 2, ..., until the gate holds on the ranking photos; the result is then confirmed on the held-out
photos (which took no part in the choice). It reports the share of MACs still computed in int8 and the
latency against fp32 and full int8 (ONNX Runtime, this CPU). The result is an ordinary QDQ model, so a
strongly typed TensorRT build consumes it as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mineralnet.quantize import graph as g
from mineralnet.quantize.stats import GateResult, GateSpec, evaluate_gate

FALLBACK_MODES = ("off", "auto")


@dataclass
class Fallback:
    model: bytes
    floated: list[str]
    ranking_gate: GateResult
    steps: list[dict] = field(default_factory=list)
    int8_mac_share: float = 0.0
    full_int8_mac_share: float = 0.0
    latency_ms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"floated": self.floated, "ranking_gate": self.ranking_gate.line(), "steps": self.steps,
                "int8_mac_share": self.int8_mac_share, "full_int8_mac_share": self.full_int8_mac_share,
                "latency_ms": self.latency_ms}


def auto_fallback(pre_fp32: bytes, qdq: bytes, order: Sequence[str], images: np.ndarray, labels,
                  spec: GateSpec, *, max_nodes: int | None = None, log=None) -> Fallback:
    """Float order[:k] for the smallest k whose model passes `spec` on `images` (the ranking photos).
    When no k up to `max_nodes` passes, returns the last one tried (its gate says FAILED)."""
    proto = g.load(qdq)
    reference = g.logits(g.session(pre_fp32), images)
    limit = len(order) if max_nodes is None else min(len(order), max_nodes)
    macs = g.macs(g.load(pre_fp32))
    steps, model, gate = [], proto, None
    for k in range(limit + 1):
        model = g.float_nodes(proto, pre_fp32, order[:k]) if k else proto
        got = g.logits(g.session(model), images)
        gate = evaluate_gate(reference, got, labels, spec=spec, source=f"{len(images)} ranking photos")
        steps.append({"floated": k, "node": order[k - 1] if k else None, "flips": int(len(images) - gate.agreement.k),
                      "drop": gate.drop, "drop_high": gate.drop_high, "passed": gate.passed,
                      "int8_mac_share": g.int8_mac_share(model, macs)})
        if log:
            log(f"  fallback: {k} node(s) in float -> {gate.line()}")
        if gate.passed:
            break
    return Fallback(model.SerializeToString(), list(order[:k]), gate, steps, g.int8_mac_share(model, macs),
                    g.int8_mac_share(proto, macs))


def latencies(models: dict[str, bytes], image: np.ndarray, seconds: float = 2.0) -> dict[str, float]:
    """Median ms per batch of each model in ONNX Runtime on this CPU (interleaved twice, best of the two)."""
    sessions = {k: g.session(v) for k, v in models.items()}
    best = {k: float("inf") for k in models}
    for _ in range(2):
        for k, s in sessions.items():
            best[k] = min(best[k], g.latency_ms(s, image, seconds=seconds / 2))
    return {k: round(v, 3) for k, v in best.items()}
