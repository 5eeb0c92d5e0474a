"""An ensemble of trained runs: ENS/ensemble.json, the averaging maths, and `Ensemble`, what
`Predictor("ENS")` answers with.

The ensemble's probabilities are the weighted mean of its members' calibrated probabilities
(softmax(logits / T) with each member's own temperature when it has a calibration, else the plain
softmax). Every member preprocesses the photo itself (its own resolution and resize), so an
ensemble works on photos, never on one preprocessed tensor.

Novelty scores (higher = less like the training minerals):
    energy               the weighted mean of the members' energies, -logsumexp(logits)
    mutual_information   H(mean p) - mean H(p): the members' disagreement ("BALD", Houlsby et al.
                         2011; deep ensembles, Lakshminarayanan et al. 2017)
`unknown` uses the ensemble's chosen score and its threshold from ensemble.json (set by
`mineralnet ensemble` on the photos every member held out, at the members' usual acceptance).

`mineralnet calibrate ENS` (mineralnet.ensemble.calibrate) adds a "calibration" to ensemble.json: one temperature
T fitted on the log of the averaged member probabilities, so the ensemble answers softmax(log(mean p) / T), the
thresholds and chosen score again, and split-conformal scores (candidate sets with --coverage).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import mineralnet.calibration.core as cal
from mineralnet.errors import MineralNetError

ENSEMBLE_FILE = "ensemble.json"
FORMAT = "mineralnet-ensemble/1"
SCORES = ("energy", "mutual_information")
DEFAULT_SCORE = "energy"


# ----------------------------------------------------------------------------- maths
def normalised_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """(n,) weights summing to 1 (equal when None); each must be > 0."""
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if len(w) != n:
        raise MineralNetError(f"{len(w)} weights for {n} members; give one weight per member")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise MineralNetError(f"weights {list(map(float, w))} must all be positive numbers")
    return w / w.sum()


def average_probs(member_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(M, N, C) member probabilities, (M,) weights summing to 1 -> (N, C) weighted mean."""
    return np.tensordot(np.asarray(weights, np.float64), np.asarray(member_probs, np.float64), axes=1)


def entropy(probs: np.ndarray) -> np.ndarray:
    """(..., C) -> (...,) Shannon entropy in nats, with 0 log 0 = 0."""
    p = np.asarray(probs, np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def mutual_information(member_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N,) entropy of the weighted mean minus the weighted mean of the members' entropies (>= 0)."""
    w = np.asarray(weights, np.float64)
    mi = entropy(average_probs(member_probs, w)) - w @ entropy(member_probs)
    return np.maximum(mi, 0.0)  # Jensen: >= 0; clip float noise


# ----------------------------------------------------------------------------- ensemble.json
def is_ensemble(path) -> bool:
    p = Path(os.path.expanduser(os.fspath(path)))
    return p.is_dir() and (p / ENSEMBLE_FILE).is_file()


def read_ensemble(path) -> dict:
    """ENS/ensemble.json with each member's "path" resolved against ENS."""
    ens = Path(os.path.expanduser(os.fspath(path)))
    f = ens / ENSEMBLE_FILE
    try:
        spec = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise MineralNetError(f"{str(f)!r} is unreadable ({type(e).__name__}); make it again with "
                              f"`mineralnet ensemble RUN1 RUN2 ... --out {ens}`") from None
    if spec.get("format") != FORMAT or not spec.get("members"):
        raise MineralNetError(f"{str(f)!r} is not a {FORMAT} file; make it with `mineralnet ensemble RUN1 RUN2 ... "
                              f"--out {ens}`")
    for m in spec["members"]:
        m["resolved"] = str((ens / m["path"]).resolve()) if not os.path.isabs(m["path"]) else m["path"]
        if not Path(m["resolved"]).exists():
            raise MineralNetError(f"member {m['path']!r} of the ensemble {str(ens)!r} does not exist (looked at "
                                  f"{m['resolved']}); move the runs back or make the ensemble again")
    return spec


# ----------------------------------------------------------------------------- the members together
class Ensemble:
    """The members of an ensemble folder, opened with `open_member` (the Predictor class), answering
    together. `Predictor("ENS")` holds one and gives it photos; answers also carry "member_probs"
    (M, N, C) and "scores" {"energy", "mutual_information"} (N,) each."""

    kind = "ensemble"

    def __init__(self, path, open_member: Callable, *, device: str | None = None, threads: int | None = None):
        self.spec = read_ensemble(path)
        self.members = [open_member(m["resolved"], device=device, threads=threads) for m in self.spec["members"]]
        self.weights = normalised_weights([m["weight"] for m in self.spec["members"]], len(self.members))
        self.classes = list(self.spec["classes"])
        for m, p in zip(self.spec["members"], self.members):
            if p.classes != self.classes:
                raise MineralNetError(f"member {m['path']!r} now has classes {p.classes}, the ensemble "
                                      f"{self.classes}; make the ensemble again")
        self.meta = {"classes": self.classes, "ensemble": {k: v for k, v in self.spec.items() if k != "members"},
                     "members": [p.meta for p in self.members]}
        self.novelty = self.spec.get("novelty") or {}
        self.calibration = ensemble_calibration(self.spec)
        self.note = None if self.novelty.get("thresholds") else (
            "the ensemble has no novelty threshold: `unknown` is null; make it again with `mineralnet ensemble`")

    def outputs(self, images: Sequence) -> dict[str, np.ndarray]:
        """{"member_logits", "member_probs"} (M, N, C): each member on the photos through its own preprocessing,
        probabilities calibrated with its own temperature (plain softmax without a calibration)."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            raise MineralNetError("an ensemble takes photos (paths or (H, W, 3) arrays), not a preprocessed "
                                  "(N, 3, S, S) batch: its members may use different resolutions")
        logits, probs = [], []
        for m in self.members:
            out = m.outputs(images)
            if "logits" not in out:
                raise MineralNetError(f"member {m.path!r} gives no logits; members must be run directories")
            z = np.asarray(out["logits"], np.float64)
            logits.append(z)
            probs.append(m.calibration.probs(z) if m.calibration is not None else cal.softmax(z))
        return {"member_logits": np.stack(logits), "member_probs": np.stack(probs)}

    def answers(self, images: Sequence, coverage: float | None = None) -> dict:
        """{"probs" (N, C), "novelty" and "unknown" (N,) of the chosen score, "scores", "member_probs", and
        "sets" with a coverage (calibrated ensembles only)}."""
        if coverage is not None and self.calibration is None:
            raise MineralNetError("--coverage: this ensemble is not calibrated; run `mineralnet calibrate ENS` "
                                  "(or drop --coverage)")
        out = self.outputs(images)
        scores = ensemble_scores(out["member_logits"], out["member_probs"], self.weights)
        mean = average_probs(out["member_probs"], self.weights)
        extra = {"scores": scores, "member_probs": out["member_probs"].astype(np.float32)}
        if self.calibration is not None:
            cal = self.calibration
            ans = cal.answer({"logits": log_probs(mean), "novelty": scores[cal.detector]}, coverage=coverage)
            return {**ans, "probs": ans["probs"].astype(np.float32), **extra}
        detector = self.novelty.get("detector", DEFAULT_SCORE)
        threshold = (self.novelty.get("thresholds") or {}).get(detector)
        return {"probs": mean.astype(np.float32), "novelty": scores[detector],
                "unknown": None if threshold is None else scores[detector] > threshold, **extra}


def ensemble_scores(member_logits: np.ndarray, member_probs: np.ndarray, weights: np.ndarray) -> dict:
    """{"energy", "mutual_information"} (N,) each, from (M, N, C) member logits and calibrated probabilities."""
    energies = np.stack([cal.logit_novelty("energy", z) for z in member_logits])  # (M, N)
    return {"energy": np.asarray(weights, np.float64) @ energies,
            "mutual_information": mutual_information(member_probs, weights)}


def log_probs(probs: np.ndarray) -> np.ndarray:
    """(N, C) log of the ensemble's probabilities: the "logits" its temperature divides (softmax(log p) = p)."""
    return np.log(np.maximum(np.asarray(probs, np.float64), 1e-300))


def ensemble_calibration(spec: dict):
    """The ensemble's Calibration (mineralnet.calibration.store) from ensemble.json's "calibration", or None."""
    from mineralnet.calibration.store import Calibration

    doc = spec.get("calibration")
    if not doc:
        return None
    try:
        out = Calibration.from_public(doc)
        out.thresholds = {k: float(v) for k, v in doc["thresholds"].items()}
        out.info = dict(doc.get("info") or {})
    except (KeyError, TypeError, ValueError) as e:
        raise MineralNetError(f"the calibration in ensemble.json is damaged ({type(e).__name__}: {e}); redo it "
                              f"with `mineralnet calibrate ENS`") from None
    if out.detector not in SCORES or out.detector not in out.thresholds:
        raise MineralNetError(f"the calibration in ensemble.json uses the score {out.detector!r}, not one of "
                              f"{', '.join(SCORES)}; redo it with `mineralnet calibrate ENS`")
    return out


def common_val(runs: Sequence, root=None) -> list[tuple[str, int]]:
    """[(path, label)]: the photos in the validation split of EVERY run (in the first run's order); `root`: the
    collection's folder now (default: where the runs saw it)."""
    from mineralnet.runs import read_split

    splits = [read_split(r, root=root) for r in runs]
    val_sets = [{str(Path(p).resolve()): y for p, y in s["splits"]["val"]} for s in splits]
    out = []
    for p, y in splits[0]["splits"]["val"]:
        key = str(Path(p).resolve())
        if all(key in v for v in val_sets[1:]):
            if any(v[key] != y for v in val_sets[1:]):
                raise MineralNetError(f"photo {p!r} has different labels in the members' splits; the members "
                                      f"were trained on differently labelled collections")
            out.append((p, int(y)))
    if not out:
        sizes = ", ".join(str(len(s["splits"]["val"])) for s in splits)
        raise MineralNetError(f"no photo is held out by every member (their validation sets: {sizes} photos); "
                              f"train the members on the same split (train --split-seed S with different --seed)")
    missing = [p for p, _ in out if not Path(p).is_file()]
    if missing:
        raise MineralNetError(f"{len(missing)} of the {len(out)} common validation photos are missing, e.g. "
                              f"{missing[0]!r}; were the photos moved?")
    return out
