"""The numbers behind "unknown mineral", calibrated probabilities and candidate sets (numpy only).

Novelty detectors (higher = less like the training minerals):
    msp          1 - max softmax(logits / T)                       (Hendrycks & Gimpel 2017)
    energy       -logsumexp(logits)                                (Liu et al. 2020)
    maxlogit     -max logit                                        (Hendrycks et al. 2022)
    mahalanobis  min_c (f - mu_c)^T S^-1 (f - mu_c), class means and one shared, shrunk covariance
                 of the fused features of the training photos      (Lee et al. 2018)
    relmaha      the Mahalanobis score above minus the same distance to the one Gaussian of all training
                 photos (mean and covariance of the class-blind features): "relative Mahalanobis", which
                 discounts directions every photo varies in and helps with near-novel classes
                 (Ren et al. 2021, "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection")
    knn          1 - cosine similarity to the k-th nearest training photo (Sun et al. 2022)
Temperature scaling (Guo et al. 2017), split-conformal APS/RAPS sets (Romano et al. 2020,
Angelopoulos et al. 2021), expected calibration error and AUROC.
"""
from __future__ import annotations

import math

import numpy as np

from mineralnet.errors import MineralNetError

LOGIT_DETECTORS = ("msp", "energy", "maxlogit")
FEATURE_DETECTORS = ("mahalanobis", "relmaha", "knn")
DETECTORS = LOGIT_DETECTORS + FEATURE_DETECTORS


def logsumexp(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- detectors
def logit_novelty(detector: str, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N,) novelty of a logit-based detector."""
    logits = np.asarray(logits, np.float64)
    if detector == "msp":
        return 1.0 - softmax(logits, temperature).max(axis=1)
    if detector == "energy":
        return -logsumexp(logits)
    if detector == "maxlogit":
        return -logits.max(axis=1)
    raise MineralNetError(f"detector {detector!r} is not logit-based; choose one of {', '.join(LOGIT_DETECTORS)}")


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, num_classes: int, shrinkage: float = 0.1
                    ) -> dict[str, np.ndarray]:
    """Class means (C, D) and a whitening matrix W (D, D) with W W^T = S^-1, where S is the shared
    within-class covariance shrunk towards a scaled identity: (1 - s) S + s * tr(S)/D * I."""
    f = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise MineralNetError(f"no training photos of class(es) {missing}: the Mahalanobis detector needs every "
                              f"class; check the run's split")
    means = np.stack([f[labels == c].mean(axis=0) for c in range(num_classes)])
    centred = f - means[labels]
    cov = centred.T @ centred / len(f)
    d = cov.shape[0]
    cov = (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d + 1e-12) * np.eye(d)
    eigval, eigvec = np.linalg.eigh(cov)
    whiten = eigvec / np.sqrt(np.maximum(eigval, 1e-12))[None, :]
    return {"means": means, "whiten": whiten}


def mahalanobis_novelty(features: np.ndarray, means: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    z = np.asarray(features, np.float64) @ whiten  # (N, D)
    mz = np.asarray(means, np.float64) @ whiten  # (C, D)
    d2 = (z * z).sum(1)[:, None] - 2 * z @ mz.T + (mz * mz).sum(1)[None, :]
    return np.maximum(d2, 0.0).min(axis=1)


def fit_background(features: np.ndarray, shrinkage: float = 0.1) -> dict[str, np.ndarray]:
    """The class-blind Gaussian of relative Mahalanobis: mean (1, D) and whitening matrix of the
    covariance of all training features, shrunk as in `fit_mahalanobis`."""
    f = np.asarray(features, np.float64)
    fit = fit_mahalanobis(f, np.zeros(len(f), dtype=int), 1, shrinkage)
    return {"bg_mean": fit["means"], "bg_whiten": fit["whiten"]}


def relmaha_novelty(features: np.ndarray, means: np.ndarray, whiten: np.ndarray, bg_mean: np.ndarray,
                    bg_whiten: np.ndarray) -> np.ndarray:
    """min_c (f - mu_c)^T S^-1 (f - mu_c) - (f - mu_0)^T S_0^-1 (f - mu_0); may be negative."""
    return mahalanobis_novelty(features, means, whiten) - mahalanobis_novelty(features, bg_mean, bg_whiten)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_knn(features: np.ndarray, max_bank: int = 4096) -> np.ndarray:
    """The bank: L2-normalised training features, at most `max_bank` evenly spaced rows."""
    f = np.asarray(features)
    if len(f) > max_bank:
        f = f[np.linspace(0, len(f) - 1, max_bank).round().astype(int)]
    return l2_normalize(f)


def knn_novelty(features: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    sims = l2_normalize(features) @ np.asarray(bank, np.float64).T  # (N, M)
    k = max(1, min(int(k), sims.shape[1]))
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return 1.0 - kth


# ----------------------------------------------------------------------------- threshold, AUROC
def _between(sorted_values: np.ndarray, k: int) -> float:
    """A cut just above the k-th smallest value (1-based): half-way to the next distinct one, so that
    float32-vs-float64 noise of a runtime cannot move a calibration photo across it."""
    v = float(sorted_values[k - 1])
    above = sorted_values[k:][sorted_values[k:] > v]
    return (v + float(above[0])) / 2 if len(above) else v + 1e-6 * max(1.0, abs(v))


def acceptance_threshold(known_novelty: np.ndarray, acceptance: float = 0.95) -> float:
    """A novelty t with the smallest fraction >= `acceptance` of the known photos at novelty <= t
    (half-way between the last accepted photo and the next)."""
    if not 0.0 < acceptance <= 1.0:
        raise MineralNetError(f"acceptance {acceptance} must be in (0, 1], e.g. 0.95")
    s = np.sort(np.asarray(known_novelty, np.float64))
    if not len(s):
        raise MineralNetError("no known photos to set the novelty threshold on")
    return _between(s, max(1, math.ceil(acceptance * len(s) - 1e-9)))


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(novelty of an unknown photo > that of a known one), ties counting half (Mann-Whitney U)."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    allv = np.concatenate([known, unknown])
    order = allv.argsort(kind="stable")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2
    return float(u / (len(known) * len(unknown)))


# ----------------------------------------------------------------------------- temperature, ECE
def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, np.float64) / float(temperature)
    labels = np.asarray(labels)
    return float((logsumexp(z) - z[np.arange(len(z)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The T in [lo, hi] minimising the NLL of softmax(logits / T): golden-section search on log T
    (the NLL is convex in 1/T, so unimodal in log T)."""
    if not len(logits):
        raise MineralNetError("no validation photos to fit the temperature on")
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return float(math.exp((a + b) / 2))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width confidence bins: count, mean confidence and accuracy of the top-1 answers."""
    probs = np.asarray(probs, np.float64)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    right = (pred == np.asarray(labels)).astype(np.float64)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count, "confidence": np.bincount(idx, conf, bins) / count,
                "accuracy": np.bincount(idx, right, bins) / count, "edges": np.linspace(0, 1, bins + 1)}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: sum over bins of |bin| / N * |accuracy - confidence|."""
    r = reliability_bins(probs, labels, bins)
    used = r["count"] > 0
    return float((r["count"][used] * np.abs(r["accuracy"][used] - r["confidence"][used])).sum() / r["count"].sum())


# ----------------------------------------------------------------------------- conformal sets
def _ranked(probs: np.ndarray, lam: float, k_reg: int):
    """Classes in descending probability, and the APS/RAPS score of each rank: the probability
    mass up to and including it, plus lam for every rank past k_reg."""
    probs = np.asarray(probs, np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    rank = np.arange(1, probs.shape[1] + 1)
    return order, cum + lam * np.maximum(0, rank - k_reg)[None, :]


def conformal_scores(probs: np.ndarray, labels: np.ndarray, lam: float = 0.0, k_reg: int = 0) -> np.ndarray:
    """(N,) non-randomised APS (lam = 0) or RAPS score of the true class of each calibration photo."""
    order, score = _ranked(probs, lam, k_reg)
    where = np.argmax(order == np.asarray(labels)[:, None], axis=1)
    return score[np.arange(len(order)), where]


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n + 1) * coverage)-th smallest calibration score (inf when n is too small), moved
    half-way to the next score (the same sets on the calibration photos; robust to float noise)."""
    if not 0.0 < coverage < 1.0:
        raise MineralNetError(f"--coverage {coverage} must be between 0 and 1, e.g. 0.9")
    s = np.sort(np.asarray(scores, np.float64))
    k = math.ceil((len(s) + 1) * coverage - 1e-9)
    return float("inf") if k > len(s) else _between(s, k)


def conformal_sets(probs: np.ndarray, qhat: float, lam: float = 0.0, k_reg: int = 0) -> list[list[int]]:
    """Per photo, the classes whose score is at most qhat (best first); the top-1 class is always in."""
    order, score = _ranked(probs, lam, k_reg)
    keep = score <= qhat
    keep[:, 0] = True
    return [[int(c) for c, k in zip(o, m) if k] for o, m in zip(order, keep)]
