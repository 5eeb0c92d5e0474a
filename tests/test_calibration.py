"""Unknown-mineral detectors, temperature scaling and conformal sets against independent computations
on synthetic features and logits (no photos, no training)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mineralnet.calibration import Calibration, calibrate_arrays, core
from mineralnet.calibration.graph import NoveltyHead
from mineralnet.errors import MineralNetError


def _features(n_per=40, classes=3, dim=6, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    x = np.concatenate([centres[c] + rng.normal(0, 1, (n_per, dim)) + shift for c in range(classes)])
    return x, np.repeat(np.arange(classes), n_per)


def test_logit_detectors_match_their_formulas():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (20, 5))
    for i, row in enumerate(z):
        e = [math.exp(v / 2.0) for v in row]
        assert core.logit_novelty("msp", z, 2.0)[i] == pytest.approx(1 - max(e) / sum(e))
        assert core.logit_novelty("energy", z)[i] == pytest.approx(-math.log(sum(math.exp(v) for v in row)))
        assert core.logit_novelty("maxlogit", z)[i] == pytest.approx(-max(row))


def test_mahalanobis_is_the_min_quadratic_form_with_the_shrunk_shared_covariance():
    x, y = _features()
    fit = core.fit_mahalanobis(x, y, 3, shrinkage=0.2)
    q = np.random.default_rng(2).normal(0, 3, (7, 6))
    # independent: explicit covariance, solve() instead of a whitening matrix, a Python loop
    means = [x[y == c].mean(0) for c in range(3)]
    resid = np.concatenate([x[y == c] - means[c] for c in range(3)])
    cov = np.cov(resid.T, bias=True)
    cov = 0.8 * cov + 0.2 * np.trace(cov) / 6 * np.eye(6)
    want = [min(float((v - m) @ np.linalg.solve(cov, v - m)) for m in means) for v in q]
    np.testing.assert_allclose(core.mahalanobis_novelty(q, fit["means"], fit["whiten"]), want, rtol=1e-8)


def test_relmaha_is_the_class_distance_minus_the_class_blind_distance():
    x, y = _features()
    fit = core.fit_mahalanobis(x, y, 3, shrinkage=0.3)
    bg = core.fit_background(x, shrinkage=0.3)
    q = np.random.default_rng(6).normal(0, 3, (7, 6))

    # independent: explicit covariances and solve(), one Gaussian per class plus one of all photos
    def shrunk(resid):
        cov = np.cov(resid.T, bias=True)
        return 0.7 * cov + 0.3 * np.trace(cov) / 6 * np.eye(6)
    means = [x[y == c].mean(0) for c in range(3)]
    cov = shrunk(np.concatenate([x[y == c] - means[c] for c in range(3)]))
    cov0, mu0 = shrunk(x - x.mean(0)), x.mean(0)
    want = [min(float((v - m) @ np.linalg.solve(cov, v - m)) for m in means)
            - float((v - mu0) @ np.linalg.solve(cov0, v - mu0)) for v in q]
    got = core.relmaha_novelty(q, fit["means"], fit["whiten"], bg["bg_mean"], bg["bg_whiten"])
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


def test_relmaha_discounts_what_is_unusual_for_every_class_alike():
    # three classes along axis 0 (centres 0, 6, 12, sd 1), sd 1 on axis 1 for all. A known photo of the middle class
    # 4 sd out on axis 1 is unusual for every class alike; a photo half-way between two classes is a new kind.
    rng = np.random.default_rng(7)
    x = np.concatenate([np.c_[rng.normal(6.0 * c, 1, 400), rng.normal(0, 1, 400)] for c in range(3)])
    y = np.repeat(np.arange(3), 400)
    fit, bg = core.fit_mahalanobis(x, y, 3, 0.01), core.fit_background(x, 0.01)
    known_far, between = np.array([[6.0, 4.0]]), np.array([[3.0, 0.0]])
    maha = lambda f: core.mahalanobis_novelty(f, fit["means"], fit["whiten"])[0]  # noqa: E731
    rel = lambda f: core.relmaha_novelty(f, fit["means"], fit["whiten"], bg["bg_mean"], bg["bg_whiten"])[0]  # noqa: E731
    assert maha(known_far) > maha(between)  # ~16 vs ~9: plain Mahalanobis calls the known photo more novel
    assert rel(between) > rel(known_far) + 5  # ~8.6 vs ~0


def test_knn_is_one_minus_the_kth_best_cosine():
    x, _ = _features()
    bank = core.fit_knn(x)
    q = np.random.default_rng(3).normal(0, 3, (5, 6))
    for i, v in enumerate(q):
        sims = sorted((float(v @ b / np.linalg.norm(v) / np.linalg.norm(b)) for b in x), reverse=True)
        assert core.knn_novelty(q, bank, 4)[i] == pytest.approx(1 - sims[3])
    assert len(core.fit_knn(x, max_bank=10)) == 10


def test_graph_module_equals_numpy_for_every_detector():
    x, y = _features()
    cal = calibrate_arrays({"embedding": x, "labels": y},
                           {"embedding": x[::3], "labels": y[::3], "logits": x[::3, :3] * 2}, 3)
    q = np.random.default_rng(4).normal(0, 3, (6, 6)).astype(np.float32)
    z = q[:, :3] * 2
    for det in core.DETECTORS:
        params = cal.detector_params(det) if det in core.FEATURE_DETECTORS else None
        head = NoveltyHead(det, cal.temperature, params, cal.knn_k)
        got = head(torch.from_numpy(q), torch.from_numpy(z)).numpy()
        np.testing.assert_allclose(got, cal.novelty(z, q, det), rtol=1e-4, atol=1e-4, err_msg=det)


def test_threshold_accepts_the_stated_fraction_of_known_photos():
    s = np.random.default_rng(5).normal(size=333)
    for acc in (0.5, 0.9, 0.95, 1.0):
        t = core.acceptance_threshold(s, acc)
        k = math.ceil(acc * len(s))
        assert (s <= t).sum() == k  # the smallest count >= acc * n
        assert t > np.sort(s)[k - 1] and (k == len(s) or t < np.sort(s)[k])
    with pytest.raises(MineralNetError):
        core.acceptance_threshold(s, 1.5)


def test_auroc_is_the_pairwise_probability():
    rng = np.random.default_rng(6)
    a, b = rng.integers(0, 5, 30).astype(float), rng.integers(2, 8, 20).astype(float)
    pairs = [(1.0 if u > k else 0.5 if u == k else 0.0) for u in b for k in a]
    assert core.auroc(a, b) == pytest.approx(np.mean(pairs))


def _overconfident(n=3000, classes=4, seed=7, sharp=3.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    z = rng.normal(0, 1, (n, classes))
    z[np.arange(n), y] += 1.5
    return z * sharp, y


def test_temperature_lowers_nll_keeps_argmax_and_fits_the_minimum():
    z, y = _overconfident()
    t = core.fit_temperature(z, y)
    assert t > 1.5  # the logits were made 3x too sharp
    assert core.nll(z, y, t) < core.nll(z, y) - 0.05
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    assert core.nll(z, y, t) <= min(core.nll(z, y, g) for g in grid) + 1e-6
    assert (core.softmax(z, t).argmax(1) == z.argmax(1)).all()
    assert core.ece(core.softmax(z, t), y) < core.ece(core.softmax(z), y)


def test_ece_matches_a_loop():
    z, y = _overconfident(n=500)
    p = core.softmax(z)
    total = 0.0
    for lo in np.linspace(0, 1, 16)[:-1]:
        m = (p.max(1) >= lo) & ((p.max(1) < lo + 1 / 15) | (lo + 1 / 15 >= 1))
        if m.any():
            total += m.sum() / len(y) * abs((p[m].argmax(1) == y[m]).mean() - p[m].max(1).mean())
    assert core.ece(p, y) == pytest.approx(total, abs=1e-9)


@pytest.mark.parametrize("lam,k_reg", [(0.0, 0), (0.05, 1)])
def test_conformal_sets_reach_coverage_on_exchangeable_data(lam, k_reg):
    z, y = _overconfident(n=6000, classes=6, sharp=1.0)
    p = core.softmax(z)
    cal, test = slice(0, 2000), slice(2000, None)
    q = core.conformal_quantile(core.conformal_scores(p[cal], y[cal], lam, k_reg), 0.9)
    sets = core.conformal_sets(p[test], q, lam, k_reg)
    cover = np.mean([t in s for t, s in zip(y[test], sets)])
    sd = math.sqrt(0.9 * 0.1 / 4000)
    assert 0.9 - 3 * sd <= cover <= 0.9 + 1 / 2001 + 3 * sd + 0.01
    # sets are the top classes in order, top-1 first
    assert all(s[0] == r.argmax() for s, r in zip(sets, p[test]))


def test_sets_shrink_as_the_model_improves():
    sizes = []
    for boost in (0.5, 1.5, 3.0):
        rng = np.random.default_rng(8)
        y = rng.integers(0, 6, 4000)
        z = rng.normal(0, 1, (4000, 6))
        z[np.arange(4000), y] += boost
        p = core.softmax(z)
        q = core.conformal_quantile(core.conformal_scores(p[:2000], y[:2000]), 0.9)
        sizes.append(np.mean([len(s) for s in core.conformal_sets(p[2000:], q)]))
    assert sizes[0] > sizes[1] > sizes[2]


def test_calibration_round_trips_through_safetensors_and_json(tmp_path):
    x, y = _features()
    z = np.random.default_rng(9).normal(0, 2, (len(x), 3))
    cal = calibrate_arrays({"embedding": x, "labels": y}, {"embedding": x, "labels": y, "logits": z}, 3,
                           detector="knn")
    cal.save(tmp_path)
    assert not any(p.suffix in (".pt", ".pkl", ".pickle") for p in tmp_path.iterdir())
    back = Calibration.load(tmp_path)
    a, b = cal.answer({"logits": z, "embedding": x}, 0.9), back.answer({"logits": z, "embedding": x}, 0.9)
    np.testing.assert_allclose(a["novelty"], b["novelty"], rtol=1e-5)
    assert a["sets"] == b["sets"] and (a["unknown"] == b["unknown"]).all()
    assert (~a["unknown"]).mean() >= 0.95  # the threshold accepts 95% of the (same) validation photos
    light = Calibration.from_public(cal.public())
    c = light.answer({"logits": z, "novelty": a["novelty"]}, 0.9)
    assert c["sets"] == a["sets"] and (c["unknown"] == a["unknown"]).all()
    assert Calibration.load(tmp_path / "elsewhere") is None


def test_relmaha_on_a_calibration_without_its_arrays_says_to_recalibrate():
    x, y = _features()
    cal = calibrate_arrays({"embedding": x, "labels": y},
                           {"embedding": x[::3], "labels": y[::3], "logits": x[::3, :3] * 2}, 3)
    cal.params = {k: v for k, v in cal.params.items() if not k.startswith("relmaha.")}  # as saved before relmaha
    with pytest.raises(MineralNetError, match="predates.*mineralnet calibrate RUN --detector relmaha"):
        cal.detector_params("relmaha")
    cal.params = {}  # an exported model's metadata: no arrays at all
    with pytest.raises(MineralNetError, match="use the run directory"):
        cal.detector_params("relmaha")
