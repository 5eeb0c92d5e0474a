"""A run's calibration: RUN/calibration.json (small numbers) + RUN/calibration.safetensors (arrays).

`Calibration.answer(outputs)` turns a model's raw outputs (logits, and embedding or a graph-computed
novelty) into calibrated probabilities, novelty, the unknown flag and conformal sets; the Predictor
and `mineralnet eval` both use it. `public()` is the part that travels inside exported models
(model.json, ONNX metadata "calibration"): everything except the feature-space arrays, which the
exported graph applies itself (its `novelty` output).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mineralnet.calibration import core
from mineralnet.calibration.graph import NoveltyHead
from mineralnet.errors import MineralNetError
from mineralnet.files import atomic_write_bytes, atomic_write_json
from mineralnet.runs import RunDir, run_folder

FORMAT = "mineralnet-calibration/1"
NOVELTY_OUTPUT = "novelty"


@dataclass
class Calibration:
    detector: str  # the detector whose novelty decides `unknown`
    temperature: float
    thresholds: dict[str, float]  # detector -> novelty above which a photo is unknown
    acceptance: float  # fraction of known validation photos accepted by each threshold
    conformal_scores: np.ndarray  # (n,) APS/RAPS scores of the validation photos, calibrated probs
    lam: float = 0.0  # RAPS penalty per rank past k_reg (0 = APS)
    k_reg: int = 0
    knn_k: int = 10
    params: dict[str, np.ndarray] = field(default_factory=dict)  # "mahalanobis.means", ".whiten", "knn.bank"
    info: dict = field(default_factory=dict)  # photo counts, NLL/ECE before and after, ...

    @property
    def threshold(self) -> float:
        return float(self.thresholds[self.detector])

    def detector_params(self, detector: str | None = None) -> dict[str, np.ndarray]:
        detector = detector or self.detector
        # relmaha = mahalanobis's class means and whitening + its own class-blind Gaussian
        prefixes = {"knn": ("knn.",), "relmaha": ("mahalanobis.", "relmaha.")}.get(detector, ("mahalanobis.",))
        out = {k[len(p):]: v for p in prefixes for k, v in self.params.items() if k.startswith(p)}
        if detector in core.FEATURE_DETECTORS and not out:
            raise MineralNetError(f"this calibration carries no {detector} arrays (an exported model's metadata "
                                  f"holds only the graph's novelty output); use the run directory")
        if detector == "relmaha" and "bg_whiten" not in out:  # a calibration made before relmaha existed
            raise MineralNetError("this calibration has no relmaha arrays (it predates that detector); redo it with "
                                  "`mineralnet calibrate RUN --detector relmaha`")
        return out

    # ------------------------------------------------------------------ applying it
    def probs(self, logits: np.ndarray) -> np.ndarray:
        return core.softmax(logits, self.temperature)

    def novelty(self, logits: np.ndarray, embedding: np.ndarray | None = None, detector: str | None = None
                ) -> np.ndarray:
        """(N,) novelty of `detector` (default: the chosen one) in float64."""
        detector = detector or self.detector
        if detector in core.LOGIT_DETECTORS:
            return core.logit_novelty(detector, logits, self.temperature)
        if embedding is None:
            raise MineralNetError(f"the {detector} detector needs the fused features (embedding output)")
        p = self.detector_params(detector)
        if detector == "mahalanobis":
            return core.mahalanobis_novelty(embedding, p["means"], p["whiten"])
        if detector == "relmaha":
            return core.relmaha_novelty(embedding, p["means"], p["whiten"], p["bg_mean"], p["bg_whiten"])
        return core.knn_novelty(embedding, p["bank"], self.knn_k)

    def qhat(self, coverage: float) -> float:
        return core.conformal_quantile(self.conformal_scores, coverage)

    def answer(self, outputs: dict[str, np.ndarray], coverage: float | None = None) -> dict:
        """Raw outputs -> {"probs" (N, C), "novelty" (N,) or None, "unknown" (N,) bool or None,
        "sets" (list of class-index lists) when `coverage` is given}."""
        logits = _logits(outputs)
        probs = self.probs(logits)
        if NOVELTY_OUTPUT in outputs:
            novelty = np.asarray(outputs[NOVELTY_OUTPUT], np.float64).reshape(-1)
        elif self.detector in core.LOGIT_DETECTORS or "embedding" in outputs and self.params:
            novelty = self.novelty(logits, outputs.get("embedding"))
        else:
            novelty = None
        out = {"probs": probs, "novelty": novelty,
               "unknown": None if novelty is None else novelty > self.threshold}
        if coverage is not None:
            out["sets"] = core.conformal_sets(probs, self.qhat(coverage), self.lam, self.k_reg)
        return out

    # ------------------------------------------------------------------ storage
    def public(self) -> dict:
        """The JSON that travels with exported models (no feature arrays)."""
        return {"format": FORMAT, "detector": self.detector, "temperature": self.temperature,
                "threshold": self.threshold, "acceptance": self.acceptance, "novelty_output": NOVELTY_OUTPUT,
                "conformal": {"method": "raps" if self.lam else "aps", "lam": self.lam, "k_reg": self.k_reg,
                              "scores": [round(float(s), 7) for s in np.sort(self.conformal_scores)]}}

    @classmethod
    def from_public(cls, d: dict) -> Calibration:
        c = d["conformal"]
        return cls(detector=d["detector"], temperature=float(d["temperature"]),
                   thresholds={d["detector"]: float(d["threshold"])}, acceptance=float(d["acceptance"]),
                   conformal_scores=np.asarray(c["scores"], np.float64), lam=float(c["lam"]),
                   k_reg=int(c["k_reg"]))

    def save(self, run_dir) -> tuple[Path, Path]:
        from safetensors.numpy import save


        js, arr = RunDir(run_dir).calibration_files
        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()}
        arrays["conformal_scores"] = np.ascontiguousarray(self.conformal_scores, np.float64)
        atomic_write_bytes(arr, save(arrays, metadata={"format": FORMAT}))
        atomic_write_json(js, {
            "format": FORMAT, "detector": self.detector, "temperature": self.temperature,
            "thresholds": self.thresholds, "acceptance": self.acceptance, "knn_k": self.knn_k,
            "conformal": {"method": "raps" if self.lam else "aps", "lam": self.lam, "k_reg": self.k_reg},
            "arrays": arr.name, "info": self.info})
        return js, arr

    @classmethod
    def load(cls, run_dir) -> Calibration | None:
        """The calibration of a run directory (or of the run holding a weights file), or None."""
        from safetensors.numpy import load_file

        run_dir = run_folder(run_dir)  # the run of a weights file too
        js, arr = RunDir(run_dir).calibration_files
        if not js.is_file():
            return None
        try:
            d = json.loads(js.read_text())
            arrays = load_file(str(arr))
        except Exception as e:
            raise MineralNetError(f"calibration of {str(run_dir)!r} is unreadable ({type(e).__name__}: "
                                  f"{str(e)[:120]}); redo it with `mineralnet calibrate {run_dir}`") from None
        if d.get("format") != FORMAT or d.get("detector") not in core.DETECTORS:
            raise MineralNetError(f"{str(js)!r} is not a {FORMAT} file; redo it with `mineralnet calibrate {run_dir}`")
        scores = arrays.pop("conformal_scores")
        return cls(detector=d["detector"], temperature=float(d["temperature"]),
                   thresholds={k: float(v) for k, v in d["thresholds"].items()}, acceptance=float(d["acceptance"]),
                   conformal_scores=scores.astype(np.float64), lam=float(d["conformal"]["lam"]),
                   k_reg=int(d["conformal"]["k_reg"]), knn_k=int(d["knn_k"]), params=arrays, info=d.get("info", {}))

    def graph_module(self):
        """The chosen detector as a torch module for export (`NoveltyHead(fused, logits)`)."""

        params = self.detector_params() if self.detector in core.FEATURE_DETECTORS else None
        return NoveltyHead(self.detector, self.temperature, params, self.knn_k).eval()


def _logits(outputs: dict[str, np.ndarray]) -> np.ndarray:
    if "logits" in outputs:
        return np.asarray(outputs["logits"], np.float64)
    if "probs" in outputs:  # log-probabilities are logits up to a per-row constant
        return np.log(np.maximum(np.asarray(outputs["probs"], np.float64), 1e-30))
    raise MineralNetError(f"the model has only the outputs {', '.join(outputs)}; class probabilities need logits "
                          f"or probs: re-export with --outputs logits,probs")
