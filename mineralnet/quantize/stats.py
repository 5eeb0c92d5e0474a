"""The int8 gate's statistics: a paired accuracy drop with a confidence interval, top-1 agreement with
its interval, agreement on confident photos, and a noise floor (fp16/bf16 agreement).

Methods (all standard, all closed-form, no statsmodels):

- **Wilson score interval** for a proportion k/n (Wilson 1927): used for agreement and for each accuracy.
- **Newcombe's hybrid score interval for a difference of paired proportions** (Newcombe 1998,
  "Improved confidence intervals for the difference between binomial proportions based on paired
  data", Stat Med 17:2635, method 10): the accuracy drop fp32 - int8 on the SAME photos, from the Wilson
  limits of both accuracies and the phi correlation of the paired right/wrong outcomes. It stays inside
  [-1, 1], behaves at 0 flips, and keeps close to nominal coverage at the sizes of held-out sets here
  (a few hundred photos), where the Wald interval for (b - c)/n undercovers.

Counts of the paired 2x2 table (fp32 right/wrong x int8 right/wrong): a both right, b fp32 right and int8
wrong, c fp32 wrong and int8 right, d both wrong; drop = (b - c) / n.

The default gate: the point drop <= 1 point and the upper limit of the two-sided 95% interval of the drop
<= 2 points (`parse_gate("drop=1,bound=2")`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mineralnet.errors import MineralNetError

DEFAULT_GATE = "drop=1,bound=2"
DEFAULT_CONFIDENCE = 0.95
DEFAULT_MARGIN = 0.2  # "confident" photos: fp32 top-1 minus top-2 probability above this


def z_value(confidence: float) -> float:
    """Two-sided normal quantile: 0.95 -> 1.959964..."""
    from statistics import NormalDist

    if not 0.0 < confidence < 1.0:
        raise MineralNetError(f"confidence {confidence} must be in (0, 1), e.g. 0.95")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for the proportion k/n; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise MineralNetError(f"wilson_interval: k={k} must be within 0..n={n}")
    z = z_value(confidence)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class PairedCounts:
    """The paired 2x2 table of two classifiers' right/wrong answers on the same photos."""

    a: int  # both right
    b: int  # reference (fp32) right, candidate (int8) wrong
    c: int  # reference wrong, candidate right
    d: int  # both wrong

    @property
    def n(self) -> int:
        return self.a + self.b + self.c + self.d

    @classmethod
    def from_predictions(cls, labels, reference, candidate) -> "PairedCounts":
        y, r, q = (np.asarray(v).ravel() for v in (labels, reference, candidate))
        if not (len(y) == len(r) == len(q)):
            raise MineralNetError(f"paired comparison needs equal lengths: {len(y)} labels, {len(r)} reference "
                                  f"and {len(q)} candidate predictions")
        ok_r, ok_q = r == y, q == y
        return cls(int((ok_r & ok_q).sum()), int((ok_r & ~ok_q).sum()), int((~ok_r & ok_q).sum()),
                   int((~ok_r & ~ok_q).sum()))


def phi_coefficient(t: PairedCounts) -> float:
    """Pearson correlation of the two right/wrong indicators (0 when a margin is empty)."""
    den = (t.a + t.b) * (t.c + t.d) * (t.a + t.c) * (t.b + t.d)
    return (t.a * t.d - t.b * t.c) / math.sqrt(den) if den > 0 else 0.0


def paired_drop_interval(t: PairedCounts, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float, float]:
    """(drop, lower, upper) of accuracy(reference) - accuracy(candidate): Newcombe's method 10."""
    n = t.n
    if n == 0:
        return 0.0, -1.0, 1.0
    p1, p2 = (t.a + t.b) / n, (t.a + t.c) / n
    l1, u1 = wilson_interval(t.a + t.b, n, confidence)
    l2, u2 = wilson_interval(t.a + t.c, n, confidence)
    phi = phi_coefficient(t)
    theta = p1 - p2
    lower = theta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = theta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return theta, max(-1.0, lower), min(1.0, upper)


def one_photo_bound(n: int, accuracy: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The upper bound of the drop when int8 loses exactly one photo net on `n` held-out photos at fp32
    `accuracy` (b = 1, c = 0): the smallest loss the gate can see at all on this many photos."""
    right = max(1, min(n, round(accuracy * n)))
    return paired_drop_interval(PairedCounts(right - 1, 1, 0, n - right), confidence)[2]


def photos_for_one_loss(spec: "GateSpec", accuracy: float, limit: int = 100_000) -> int | None:
    """The fewest held-out photos on which one photo lost net still passes `spec` (None above `limit`)."""
    lo, hi = 2, 2
    while one_photo_bound(hi, accuracy, spec.confidence) > spec.max_bound or 1 / hi > spec.max_drop:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while lo < hi:  # the bound falls as n grows: bisect the first n that passes
        mid = (lo + hi) // 2
        if one_photo_bound(mid, accuracy, spec.confidence) <= spec.max_bound and 1 / mid <= spec.max_drop:
            hi = mid
        else:
            lo = mid + 1
    return hi


def top2_margin(scores: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability per row of logits (N, C) (1.0 with one class)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape[1] < 2:
        return np.ones(len(s))
    z = s - s.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    top = np.sort(p, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


@dataclass
class GateSpec:
    """Acceptance of an int8 model: point drop <= max_drop and upper bound <= max_bound (fractions)."""

    max_drop: float = 0.01
    max_bound: float = 0.02
    confidence: float = DEFAULT_CONFIDENCE
    margin: float = DEFAULT_MARGIN  # fp32 top-1/top-2 probability margin of a "confident" photo

    def text(self) -> str:
        return (f"drop={100 * self.max_drop:g},bound={100 * self.max_bound:g},confidence={self.confidence:g},"
                f"margin={self.margin:g}")


def parse_gate(text: str | None) -> GateSpec:
    """"drop=1,bound=2[,confidence=0.95][,margin=0.2]" (drop and bound in accuracy points) -> GateSpec."""
    spec = GateSpec()
    if text is None or not text.strip():
        return spec
    names = {"drop": "max_drop", "bound": "max_bound", "confidence": "confidence", "margin": "margin"}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or key not in names or not math.isfinite(number):
            raise MineralNetError(f"--int8-gate {text!r}: write comma-separated KEY=NUMBER with KEY in "
                                  f"{', '.join(names)} (e.g. --int8-gate drop=1,bound=2; points of accuracy)")
        if key in ("drop", "bound"):
            if not 0.0 <= number <= 100.0:
                raise MineralNetError(f"--int8-gate {key}={value.strip()}: give accuracy points in 0..100")
            number /= 100.0
        elif key == "confidence" and not 0.5 <= number < 1.0:
            raise MineralNetError(f"--int8-gate confidence={value.strip()}: choose a level in 0.5..1 (e.g. 0.95)")
        elif key == "margin" and not 0.0 <= number < 1.0:
            raise MineralNetError(f"--int8-gate margin={value.strip()}: a probability margin in 0..1 (e.g. 0.2)")
        setattr(spec, names[key], number)
    if spec.max_bound < spec.max_drop:
        raise MineralNetError(f"--int8-gate {text!r}: bound ({100 * spec.max_bound:g}) must be at least drop "
                              f"({100 * spec.max_drop:g}); the bound is the upper confidence limit of the drop")
    return spec


@dataclass
class Rate:
    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @classmethod
    def of(cls, k: int, n: int, confidence: float) -> "Rate":
        low, high = wilson_interval(k, n, confidence)
        return cls(int(k), int(n), low, high)

    def text(self) -> str:
        if not self.n:
            return "- (0 photos)"
        return f"{self.value:.1%} [{self.low:.1%}, {self.high:.1%}] ({self.k}/{self.n})"


@dataclass
class GateResult:
    """Everything the gate measured on one set of photos."""

    spec: GateSpec
    source: str  # which photos, e.g. "332 validation photos of the run"
    counts: PairedCounts | None  # None without labels
    accuracy_fp32: Rate | None
    accuracy_int8: Rate | None
    drop: float | None
    drop_low: float | None
    drop_high: float | None
    agreement: Rate
    confident_agreement: Rate
    noise_floor: dict  # name (fp16 / bf16) -> Rate
    passed: bool

    def line(self) -> str:
        """One line: the verdict, the drop and its bound, the agreement."""
        parts = []
        if self.drop is not None:
            parts.append(f"accuracy drop {100 * self.drop:+.2f} points (fp32 {self.accuracy_fp32.value:.2%} -> int8 "
                         f"{self.accuracy_int8.value:.2%}), {self.spec.confidence:.0%} upper bound "
                         f"{100 * self.drop_high:.2f} (limits: drop <= {100 * self.spec.max_drop:g}, bound <= "
                         f"{100 * self.spec.max_bound:g})")
        parts.append(f"agreement {self.agreement.text()}")
        parts.append(f"on confident photos {self.confident_agreement.text()}")
        for name, rate in self.noise_floor.items():
            parts.append(f"{name} noise floor {rate.text()}")
        return f"int8 gate {'passed' if self.passed else 'FAILED'} on {self.source}: " + "; ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["line"] = self.line()
        return d


def evaluate_gate(fp32_logits: np.ndarray, int8_logits: np.ndarray, labels=None, *, spec: GateSpec | None = None,
                  source: str = "held-out photos", noise: dict | None = None) -> GateResult:
    """The gate on one set of photos. `labels` (N,) ints or None (then agreement only; the gate cannot
    pass without labels, because it is an accuracy gate). `noise`: {"fp16": logits, ...} of the same
    photos in a float low precision, reported as the agreement floor (not gated)."""
    spec = spec or GateSpec()
    a, b = np.asarray(fp32_logits), np.asarray(int8_logits)
    if a.shape != b.shape or a.ndim != 2:
        raise MineralNetError(f"gate: fp32 logits {a.shape} and int8 logits {b.shape} must both be (N, classes)")
    pa, pb = a.argmax(1), b.argmax(1)
    same = pa == pb
    confident = top2_margin(a) > spec.margin
    agreement = Rate.of(int(same.sum()), len(same), spec.confidence)
    confident_agreement = Rate.of(int((same & confident).sum()), int(confident.sum()), spec.confidence)
    floor = {name: Rate.of(int((np.asarray(v).argmax(1) == pa).sum()), len(pa), spec.confidence)
             for name, v in (noise or {}).items()}
    counts = acc32 = acc8 = drop = low = high = None
    passed = False
    if labels is not None:
        y = np.asarray(labels).ravel()
        if len(y) != len(pa) or (y < 0).any():
            raise MineralNetError(f"gate: {len(y)} labels for {len(pa)} photos (or unknown labels); every held-out "
                                  f"photo needs its class")
        counts = PairedCounts.from_predictions(y, pa, pb)
        acc32 = Rate.of(counts.a + counts.b, counts.n, spec.confidence)
        acc8 = Rate.of(counts.a + counts.c, counts.n, spec.confidence)
        drop, low, high = paired_drop_interval(counts, spec.confidence)
        passed = counts.n > 0 and drop <= spec.max_drop + 1e-12 and high <= spec.max_bound + 1e-12
    return GateResult(spec, source, counts, acc32, acc8, drop, low, high, agreement, confident_agreement, floor,
                      passed)
