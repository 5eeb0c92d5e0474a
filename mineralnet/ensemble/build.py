"""`mineralnet ensemble RUN1 RUN2 ... --out ENS`: check the members, write ENS/ensemble.json and
evaluate the ensemble (and each member) on the photos that every member held out."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence


import mineralnet.calibration.core as cal
from mineralnet.errors import MineralNetError
from mineralnet.infer.ensemble import DEFAULT_SCORE, ENSEMBLE_FILE, FORMAT, SCORES, common_val, normalised_weights
from mineralnet.files import atomic_write_json

# the members' own default (mineralnet.calibration.fit.DEFAULT_ACCEPTANCE): 95% of known photos accepted
ACCEPTANCE = 0.95


def check_members(runs: Sequence) -> list[str]:
    """The members' class names (the first member's), after checking every member has the same
    classes in the same order; a mismatch is one line naming the odd member."""
    from mineralnet.artifact import read_meta

    if len(runs) < 2:
        raise MineralNetError(f"an ensemble needs at least 2 runs (got {len(runs)}): mineralnet ensemble RUN1 RUN2 "
                              f"... --out ENS")
    if len({str(Path(r).resolve()) for r in runs}) < len(runs):
        raise MineralNetError("the same run is listed twice; list each member once (use --weights to weigh one more)")
    metas = []
    for r in runs:
        if not Path(r).is_dir():
            raise MineralNetError(f"member {str(r)!r} is not a run directory; pass folders made by training")
        metas.append(read_meta(r))
    classes = list(metas[0]["classes"])
    for r, m in zip(runs[1:], metas[1:]):
        if list(m["classes"]) != classes:
            same = sorted(m["classes"]) == sorted(classes)
            raise MineralNetError(f"member {str(r)!r} has classes {list(m['classes'])}, {str(runs[0])!r} has "
                                  f"{classes}" + ("; the same names in another order: retrain it with the same "
                                                  "class order" if same else "; members must know the same minerals"))
    return classes


def _member_path(run, out: Path) -> str:
    """The member's path relative to the ensemble folder when possible (so both can move together)."""
    try:
        return os.path.relpath(Path(run).resolve(), out.resolve())
    except ValueError:  # another drive on Windows
        return str(Path(run).resolve())


def build_ensemble(runs: Sequence, out, weights: Sequence[float] | None = None, *, batch_size: int = 32,
                   detector: str = DEFAULT_SCORE, device: str | None = None) -> dict:
    """Write OUT/ensemble.json and OUT/eval/ (ensemble and members on the common held-out photos).

    Returns:
        {"photos": the number of common held-out photos, "table": the markdown summary, "metrics"}.
    """
    from mineralnet.ensemble.evaluate import score, write_report
    from mineralnet.infer import Predictor
    from mineralnet.artifact import META_FILE, read_meta, versions
    from mineralnet.runs import RunDir

    if detector not in SCORES:
        raise MineralNetError(f"--detector {detector!r}: choose one of {', '.join(SCORES)}")
    classes = check_members(runs)
    w = normalised_weights(weights, len(runs))
    samples = common_val(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MineralNetError(f"--out {str(out)!r} is a file; give a folder for the ensemble")
    if out.is_dir() and (out / META_FILE).is_file():
        raise MineralNetError(f"--out {str(out)!r} is a run directory; give a new folder for the ensemble")
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for r, wi in zip(runs, w):
        meta = read_meta(r)
        members.append({"path": _member_path(r, out), "weight": round(float(wi), 6), "backbone": meta["backbone"],
                        "image_size": meta["image_size"], "calibrated": RunDir(r).calibration_files[0].is_file()})
    spec = {"format": FORMAT, "classes": classes, "members": members,
            "combine": "weighted mean of the members' calibrated probabilities",
            "novelty": {"detector": detector, "acceptance": ACCEPTANCE, "thresholds": {}},
            "common_val_photos": len(samples),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "created_by": versions()}
    atomic_write_json(out / ENSEMBLE_FILE, spec)

    predictor = Predictor(out, device=device)
    result = score(predictor, samples, batch_size)
    # the novelty thresholds: ACCEPTANCE of these known photos below each score, as a member's calibration does
    spec["novelty"]["thresholds"] = {k: cal.acceptance_threshold(v, ACCEPTANCE) for k, v in result["scores"].items()}
    atomic_write_json(out / ENSEMBLE_FILE, spec)
    report = write_report(RunDir(out).eval_dir, predictor, samples, result,
                          {"run": str(out), "split": "val (held out by every member)"})
    return {"photos": len(samples), "table": report["table"], "metrics": report["metrics"],
            "scores": result["scores"]}
