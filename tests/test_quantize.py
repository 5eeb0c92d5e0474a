"""mineralnet.quantize: the int8 gate's statistics against independent computations, the recipe helpers,
the quantization report and the float-fallback loop on a tiny conv net with one known sensitive node."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mineralnet.errors import MineralNetError
from mineralnet.quantize import stats


# ----------------------------------------------------------------------------- statistics
def _wilson_by_bisection(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson limits as the two roots of the score test |p_hat - p| = z sqrt(p (1 - p) / n), found by
    bisection (no closed form)."""
    p_hat = k / n

    def excess(p):  # > 0 where p lies outside the interval
        return (p_hat - p) ** 2 - z * z * p * (1 - p) / n

    def root(lo, hi):  # excess changes sign between lo and hi
        for _ in range(200):
            mid = (lo + hi) / 2
            if (excess(lo) > 0) == (excess(mid) > 0):
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if k == 0 else root(0.0, p_hat)
    high = 1.0 if k == n else root(p_hat, 1.0)
    return low, high


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (313, 332), (332, 332), (40, 1000)])
def test_wilson_matches_the_score_test_roots(k, n):
    z = 1.959963984540054
    assert stats.wilson_interval(k, n) == pytest.approx(_wilson_by_bisection(k, n, z), abs=1e-9)


def test_z_value_is_the_normal_quantile():
    assert stats.z_value(0.95) == pytest.approx(1.959963984540054, abs=1e-12)
    assert stats.z_value(0.90) == pytest.approx(1.6448536269514722, abs=1e-12)
    with pytest.raises(MineralNetError):
        stats.z_value(1.5)


def _table(y, r, q):
    return stats.PairedCounts.from_predictions(y, r, q)


def test_paired_counts_and_phi_match_numpy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    r = np.where(rng.random(400) < 0.7, y, rng.integers(0, 5, 400))
    q = np.where(rng.random(400) < 0.9, r, rng.integers(0, 5, 400))
    t = _table(y, r, q)
    assert t.n == 400
    assert (t.a + t.b) == int((r == y).sum()) and (t.a + t.c) == int((q == y).sum())
    expected_phi = np.corrcoef((r == y).astype(float), (q == y).astype(float))[0, 1]
    assert stats.phi_coefficient(t) == pytest.approx(expected_phi, abs=1e-12)


def test_newcombe_interval_recomputed_from_independent_parts():
    """Method 10 of Newcombe (1998) rebuilt from bisection-found Wilson limits and numpy's correlation."""
    rng = np.random.default_rng(1)
    z = 1.959963984540054
    for _ in range(20):
        n = int(rng.integers(30, 500))
        y = np.zeros(n, int)
        r = np.where(rng.random(n) < rng.uniform(0.5, 0.95), 0, 1)
        q = np.where(rng.random(n) < rng.uniform(0.85, 1.0), r, 1 - r)
        t = _table(y, r, q)
        ok_r, ok_q = (r == 0).astype(float), (q == 0).astype(float)
        p1, p2 = ok_r.mean(), ok_q.mean()
        l1, u1 = _wilson_by_bisection(int(ok_r.sum()), n, z)
        l2, u2 = _wilson_by_bisection(int(ok_q.sum()), n, z)
        phi = 0.0 if ok_r.std() == 0 or ok_q.std() == 0 else np.corrcoef(ok_r, ok_q)[0, 1]
        lower = (p1 - p2) - math.sqrt(max(0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
        upper = (p1 - p2) + math.sqrt(max(0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
        drop, lo, hi = stats.paired_drop_interval(t)
        assert drop == pytest.approx(p1 - p2, abs=1e-12)
        assert (lo, hi) == pytest.approx((lower, upper), abs=1e-6)


@pytest.mark.parametrize("n,p_b,p_c", [(332, 0.03, 0.01), (200, 0.01, 0.01), (500, 0.05, 0.02)])
def test_newcombe_interval_covers_the_true_drop_about_95_percent(n, p_b, p_c):
    """Simulation: paired tables drawn from a known multinomial; the interval holds the true drop p_b - p_c in
    at least ~95% of draws. Method 10 is conservative when flips are rare (measured 98.5% at 1% + 1% flips, in line
    with Newcombe's own tables), which errs on the safe side for a gate; undercoverage would fail here."""
    rng = np.random.default_rng(2)
    p_d = 0.2
    draws = rng.multinomial(n, [1 - p_b - p_c - p_d, p_b, p_c, p_d], size=3000)
    truth = p_b - p_c
    hits = 0
    for a, b, c, d in draws:
        _, lo, hi = stats.paired_drop_interval(stats.PairedCounts(int(a), int(b), int(c), int(d)))
        hits += lo <= truth <= hi
    assert 0.935 <= hits / len(draws) <= 0.995


def test_identical_models_have_zero_drop_and_the_wilson_asymmetry_as_bound():
    """With no discordant photos phi = 1 and method 10 reduces to the asymmetry of the accuracy's Wilson
    interval: |(u - p) - (p - l)| (a known property of the method, conservative)."""
    y = np.array([0] * 300 + [1] * 32)
    r = np.array([0] * 280 + [1] * 52)
    drop, lo, hi = stats.paired_drop_interval(_table(y, r, r))
    k = int((r == y).sum())
    low, high = _wilson_by_bisection(k, len(y), 1.959963984540054)
    p = k / len(y)
    assert drop == 0.0 and hi == pytest.approx(abs((high - p) - (p - low)), abs=1e-6) and lo == pytest.approx(-hi)
    assert hi < 0.011  # about one point at 94% accuracy on 332 photos


def test_top2_margin_matches_a_loop():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (50, 6))
    want = []
    for row in logits:
        p = [math.exp(v) for v in row]
        s = sum(p)
        p = sorted((v / s for v in p), reverse=True)
        want.append(p[0] - p[1])
    assert stats.top2_margin(logits) == pytest.approx(np.array(want), abs=1e-12)


def test_parse_gate_default_and_errors():
    spec = stats.parse_gate(stats.DEFAULT_GATE)
    assert (spec.max_drop, spec.max_bound, spec.confidence) == (0.01, 0.02, 0.95)
    spec = stats.parse_gate("drop=0.5,bound=1.5,confidence=0.9,margin=0.3")
    assert (spec.max_drop, spec.max_bound, spec.confidence, spec.margin) == (0.005, 0.015, 0.9, 0.3)
    for bad in ("drop", "drop=x", "speed=2", "drop=3,bound=2", "bound=200", "confidence=1"):
        with pytest.raises(MineralNetError, match="--int8-gate"):
            stats.parse_gate(bad)


def test_gate_verdicts():
    rng = np.random.default_rng(4)
    n, classes = 400, 5
    y = rng.integers(0, classes, n)
    fp32 = rng.normal(0, 1, (n, classes))
    fp32[np.arange(n), y] += 4.0  # a good model
    same = stats.evaluate_gate(fp32, fp32 + rng.normal(0, 1e-4, fp32.shape), y)
    assert same.passed and same.agreement.value > 0.99 and "passed" in same.line()
    broken = fp32.copy()
    flip = rng.random(n) < 0.1  # 10% of the photos answered as class (y + 1)
    broken[flip] = 0.0
    broken[flip, (y[flip] + 1) % classes] = 10.0
    verdict = stats.evaluate_gate(fp32, broken, y, noise={"fp16": fp32})
    assert not verdict.passed and verdict.drop > 0.05 and verdict.drop_high > verdict.drop
    line = verdict.line()
    assert "FAILED" in line and "upper bound" in line and "fp16 noise floor 100.0%" in line
    no_labels = stats.evaluate_gate(fp32, fp32, None)
    assert not no_labels.passed and no_labels.drop is None
