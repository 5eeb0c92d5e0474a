"""`mineralnet calibrate ENS`: the calibration of an ensemble folder, written into its ensemble.json.

What calibrating an ensemble means here, on the photos that EVERY member held out (`common_val`, the photos
`mineralnet ensemble` evaluates on; no member trained on them):
- one temperature T fitted by NLL on log(mean of the members' calibrated probabilities), so the ensemble
  answers softmax(log(mean p) / T) (each member keeps its own temperature inside the mean);
- the novelty threshold of each ensemble score (mean energy, mutual information) at `acceptance` of those
  photos, and the chosen score that decides `unknown`;
- split-conformal APS/RAPS scores of the calibrated probabilities, so `predict ENS --coverage` gives sets.
The numbers are mineralnet.calibration's (core: fit_temperature, acceptance_threshold, conformal_scores;
store: Calibration, whose public part is what ensemble.json keeps). No feature-space detector: the members'
features differ in size and meaning.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

import mineralnet.calibration.core as core
from mineralnet.calibration.store import Calibration
from mineralnet.errors import MineralNetError
from mineralnet.files import atomic_write_json
from mineralnet.infer.ensemble import (DEFAULT_SCORE, ENSEMBLE_FILE, SCORES, average_probs, common_val, log_probs,
                                       read_ensemble)

DEFAULT_ACCEPTANCE = 0.95  # as a run's calibration (mineralnet.calibration.fit.DEFAULT_ACCEPTANCE)


def calibrate_arrays(log_p: np.ndarray, scores: dict, labels: np.ndarray, *, detector: str = DEFAULT_SCORE,
                     acceptance: float = DEFAULT_ACCEPTANCE, lam: float = 0.0, k_reg: int = 0) -> Calibration:
    """The ensemble's Calibration from its held-out photos.

    Args:
        log_p: (N, C) log of the ensemble's averaged probabilities.
        scores: {score name: (N,) novelty} of the same photos (mineralnet.infer.ensemble.ensemble_scores).
        labels: (N,) true classes.
    """
    if detector not in SCORES:
        raise MineralNetError(f"--detector {detector!r}: an ensemble decides `unknown` with {' or '.join(SCORES)}")
    labels = np.asarray(labels)
    if len(labels) < 2:
        raise MineralNetError(f"calibrating an ensemble needs at least 2 photos held out by every member (got "
                              f"{len(labels)}); train the members on one split with more validation photos")
    temperature = core.fit_temperature(log_p, labels)
    thresholds = {k: core.acceptance_threshold(v, acceptance) for k, v in scores.items()}
    cal = Calibration(detector=detector, temperature=temperature, thresholds=thresholds, acceptance=acceptance,
                      conformal_scores=np.zeros(0), lam=lam, k_reg=k_reg)
    probs = cal.probs(log_p)
    cal.conformal_scores = np.sort(core.conformal_scores(probs, labels, lam, k_reg))
    raw = np.exp(log_p)
    cal.info = {"val_photos": int(len(labels)), "val_top1": float((raw.argmax(1) == labels).mean()),
                "nll": {"before": core.nll(log_p, labels), "after": core.nll(log_p, labels, temperature)},
                "ece": {"before": core.ece(raw, labels), "after": core.ece(probs, labels)}}
    return cal


def calibration_doc(cal: Calibration) -> dict:
    """What ensemble.json keeps ("calibration"): the public part of a run's calibration, every score's
    threshold and the fit's numbers; read back by mineralnet.infer.ensemble.ensemble_calibration."""
    return {**cal.public(), "thresholds": {k: float(v) for k, v in cal.thresholds.items()}, "info": cal.info}


def calibrate_ensemble(path, *, detector: str = DEFAULT_SCORE, acceptance: float = DEFAULT_ACCEPTANCE,
                       lam: float = 0.0, k_reg: int = 0, batch_size: int = 32, device: str | None = None,
                       log: Callable[[str], None] | None = print) -> Calibration:
    """Calibrate the ensemble folder `path` on its members' common held-out photos; rewrite its ensemble.json."""
    from mineralnet.ensemble.evaluate import score
    from mineralnet.infer import Predictor

    if detector not in SCORES:
        raise MineralNetError(f"--detector {detector!r}: an ensemble decides `unknown` with {' or '.join(SCORES)} "
                              f"(the feature detectors need one model's features)")
    spec = read_ensemble(path)
    samples = common_val([m["resolved"] for m in spec["members"]])
    predictor = Predictor(path, device=device)
    result = score(predictor, samples, batch_size)  # raw member probabilities and scores: T does not enter them
    mean = average_probs(result["member_probs"], predictor.ensemble.weights)
    cal = calibrate_arrays(log_probs(mean), result["scores"], result["targets"], detector=detector,
                           acceptance=acceptance, lam=lam, k_reg=k_reg)
    f = Path(path) / ENSEMBLE_FILE
    doc = json.loads(f.read_text())  # as written (members' relative paths), not read_ensemble's resolved copy
    doc["calibration"] = calibration_doc(cal)
    doc["novelty"] = {"detector": detector, "acceptance": acceptance, "thresholds": dict(doc["calibration"]
                                                                                         ["thresholds"])}
    atomic_write_json(f, doc)
    if log:
        i = cal.info
        log(f"calibrated the ensemble {path} on the {i['val_photos']} photos every member held out: temperature "
            f"{cal.temperature:.3f} (NLL {i['nll']['before']:.3f} -> {i['nll']['after']:.3f}, ECE "
            f"{i['ece']['before']:.3f} -> {i['ece']['after']:.3f}); unknown = {detector} > {cal.threshold:.4g} "
            f"(accepts {acceptance:.0%} of them); wrote {f.name}")
    return cal
