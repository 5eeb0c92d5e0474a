"""Fit a run's calibration (`mineralnet calibrate RUN`, and training at its end) and score it (`eval`).

From the run's own photos (its split.json), through the evaluation preprocessing:
training photos -> class means + shared covariance (Mahalanobis) and the k-NN bank of fused features;
validation photos -> temperature (NLL), each detector's threshold at `acceptance` of them, and the
split-conformal scores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

import torch
from torch.utils.data import DataLoader

from mineralnet.calibration import core
from mineralnet.calibration.store import Calibration
from mineralnet.data import PhotoDataset
from mineralnet.errors import MineralNetError
from mineralnet.artifact import load_model
from mineralnet.runs import SPLIT_FILE, read_split
from mineralnet.infer.predictor import eval_transform
from mineralnet.infer.loop import predict_loader

# Best mean AUROC (0.61, all five within 0.06) on the minet7 leave-classes-out protocol with short
# from-scratch runs (docs/RESULTS.md, "Unknown minerals"); re-measure with better models.
DEFAULT_DETECTOR = "energy"
DEFAULT_ACCEPTANCE = 0.95
# shrinkage of the feature detectors' covariances towards a scaled identity (fit_mahalanobis). 0.5, not 0.1:
# relmaha's AUROC rose with it on the 3 leave-classes-out rotations it was chosen on and again on 2 fresh ones
# (docs/RESULTS.md, "relative Mahalanobis"); plain mahalanobis does not move (0.586 vs 0.584 over 5).
DEFAULT_SHRINKAGE = 0.5


def extract(model, samples, meta: dict, batch_size: int = 64, workers: int = 0, device: str | None = None
            ) -> dict[str, np.ndarray]:
    """Logits (N, C), fused features (N, D) and labels (N,) of [(path, label)] photos through the
    run's evaluation preprocessing and the one prediction loop (mineralnet.infer.loop.predict_loader)."""
    transform = eval_transform(meta)
    loader = DataLoader(PhotoDataset(samples, transform), batch_size=batch_size, shuffle=False, num_workers=workers)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    # no Accelerator: calibration runs in one process, also right after a distributed training has ended
    out = predict_loader(model, loader, None, embeddings=True)
    return {"logits": out["logits"], "embedding": out["embeddings"], "labels": out["labels"]}


def after_training(result: dict) -> None:
    """What every training command does when `train.fit` returns: fit the "unknown mineral" detector,
    temperature and conformal scores on the run's own photos, on the main process, once the training
    processes have finished (one pass over the photos). Nothing for an interrupted or epoch-less run."""
    if not result.get("main_process") or result.get("status") == "interrupted" \
            or result.get("best", {}).get("epoch", -1) <= 0:
        return
    try:
        calibrate_run(Path(result["run_dir"]))
    except MineralNetError as e:  # e.g. too few validation photos: the run stays usable, without `unknown`
        print(f"calibration skipped ({e}); predictions will have unknown: null")


def calibrate_arrays(train: dict, val: dict, num_classes: int, *, detector: str = DEFAULT_DETECTOR,
                     acceptance: float = DEFAULT_ACCEPTANCE, lam: float = 0.0, k_reg: int = 0, knn_k: int = 10,
                     shrinkage: float = DEFAULT_SHRINKAGE) -> Calibration:
    """Fit every detector, the temperature and the conformal scores.

    Args:
        train: {"embedding" (N, D), "labels" (N,)} of the training photos.
        val: {"logits" (M, C), "embedding" (M, D), "labels" (M,)} of the validation photos.
    """
    if detector not in core.DETECTORS:
        raise MineralNetError(f"--detector {detector!r}: choose one of {', '.join(core.DETECTORS)}")
    if len(val["labels"]) < 2 or len(train["labels"]) < 2:
        raise MineralNetError(f"calibration needs training and validation photos (got {len(train['labels'])} and "
                              f"{len(val['labels'])}); train with a validation split (--val-split, --folds)")
    maha = core.fit_mahalanobis(train["embedding"], train["labels"], num_classes, shrinkage)
    background = core.fit_background(train["embedding"], shrinkage)
    params = {"mahalanobis.means": maha["means"], "mahalanobis.whiten": maha["whiten"],
              "relmaha.bg_mean": background["bg_mean"], "relmaha.bg_whiten": background["bg_whiten"],
              "knn.bank": core.fit_knn(train["embedding"])}
    # stored (and exported) in float32: thresholds are set with exactly the stored numbers
    params = {k: v.astype(np.float32) for k, v in params.items()}
    temperature = core.fit_temperature(val["logits"], val["labels"])
    cal = Calibration(detector=detector, temperature=temperature, thresholds={}, acceptance=acceptance,
                      conformal_scores=np.zeros(0), lam=lam, k_reg=k_reg, knn_k=knn_k, params=params)
    for name in core.DETECTORS:
        cal.thresholds[name] = core.acceptance_threshold(cal.novelty(val["logits"], val["embedding"], name),
                                                         acceptance)
    probs = cal.probs(val["logits"])
    cal.conformal_scores = np.sort(core.conformal_scores(probs, val["labels"], lam, k_reg))
    raw = core.softmax(val["logits"])
    cal.info = {"train_photos": int(len(train["labels"])), "val_photos": int(len(val["labels"])),
                "shrinkage": shrinkage, "val_top1": float((raw.argmax(1) == val["labels"]).mean()),
                "nll": {"before": core.nll(val["logits"], val["labels"]),
                        "after": core.nll(val["logits"], val["labels"], temperature)},
                "ece": {"before": core.ece(raw, val["labels"]), "after": core.ece(probs, val["labels"])}}
    return cal


def calibrate_run(run_dir, *, detector: str = DEFAULT_DETECTOR, acceptance: float = DEFAULT_ACCEPTANCE,
                  lam: float = 0.0, k_reg: int = 0, knn_k: int = 10, shrinkage: float = DEFAULT_SHRINKAGE,
                  batch_size: int = 64, workers: int = 0, device: str | None = None, log: Callable[[str], None] | None = print) -> Calibration:
    """Calibrate the trained run at `run_dir` on its own split and write calibration.json/.safetensors.

    Training calls this on the main process after the final model.safetensors is written.
    """
    model, meta = load_model(run_dir)
    if not (Path(run_dir) / SPLIT_FILE).is_file():
        raise MineralNetError(f"{str(run_dir)!r} has no {SPLIT_FILE}: calibration fits on the run's own training and "
                              f"validation photos; calibrate a run made by `mineralnet train`")
    split = read_split(run_dir)
    if split["classes"] != list(meta["classes"]):
        raise MineralNetError(f"the split of {str(run_dir)!r} lists classes {split['classes']} but its model has "
                              f"{meta['classes']}; the run is inconsistent")
    parts = {}
    for which in ("train", "val"):
        samples = split["splits"][which]
        missing = [p for p, _ in samples if not Path(p).is_file()]
        if missing:
            raise MineralNetError(f"{len(missing)} {which} photos of {str(run_dir)!r} are missing, e.g. "
                                  f"{missing[0]!r}; calibration needs the run's own photos where training saw them")
        parts[which] = extract(model, samples, meta, batch_size, workers, device)
    cal = calibrate_arrays(parts["train"], parts["val"], int(meta["num_classes"]), detector=detector,
                           acceptance=acceptance, lam=lam, k_reg=k_reg, knn_k=knn_k, shrinkage=shrinkage)
    js, arr = cal.save(run_dir)
    if log:
        i = cal.info
        log(f"calibrated {run_dir} on {i['train_photos']} training / {i['val_photos']} validation photos: "
            f"temperature {cal.temperature:.3f} (NLL {i['nll']['before']:.3f} -> {i['nll']['after']:.3f}, "
            f"ECE {i['ece']['before']:.3f} -> {i['ece']['after']:.3f}); unknown = {cal.detector} novelty > "
            f"{cal.threshold:.4g} (accepts {acceptance:.0%} of known validation photos); wrote {js.name}, {arr.name}")
    return cal


# ----------------------------------------------------------------------------- eval
def calibration_report(logits: np.ndarray, labels: np.ndarray, classes: list[str], cal: Calibration | None,
                       out_dir=None, coverage: float = 0.9, outputs: dict | None = None) -> dict:
    """ECE before/after temperature, conformal coverage and mean set size (overall and per class),
    and reliability.png in `out_dir`. `outputs` (with embedding) lets feature detectors score too."""
    labels = np.asarray(labels)
    raw = core.softmax(logits)
    rep = {"ece_before": core.ece(raw, labels), "nll_before": core.nll(logits, labels)}
    if cal is None:
        rep["note"] = "no calibration in the run: run `mineralnet calibrate RUN` for temperature, unknown and sets"
    else:
        ans = cal.answer({"logits": logits, **(outputs or {})}, coverage=coverage)
        rep.update({"temperature": cal.temperature, "ece_after": core.ece(ans["probs"], labels),
                    "nll_after": core.nll(logits, labels, cal.temperature), "coverage_target": coverage})
        hit = np.array([y in s for y, s in zip(labels, ans["sets"])])
        size = np.array([len(s) for s in ans["sets"]])
        rep["coverage"], rep["mean_set_size"] = float(hit.mean()), float(size.mean())
        rep["per_class"] = [{"class": c, "photos": int((labels == i).sum()),
                             "coverage": float(hit[labels == i].mean()) if (labels == i).any() else None,
                             "mean_set_size": float(size[labels == i].mean()) if (labels == i).any() else None}
                            for i, c in enumerate(classes)]
        if ans["unknown"] is not None:
            rep["known_flagged_unknown"] = float(np.mean(ans["unknown"]))
    if out_dir is not None:
        plot_reliability(raw, None if cal is None else cal.probs(logits), labels, Path(out_dir) / "reliability.png")
    return rep


def eval_calibration(run, targets: np.ndarray, logits: np.ndarray, classes: list[str], out_dir,
                     coverage: float = 0.9) -> dict:
    """`mineralnet eval`: calibration_report from the logits of a run's evaluation. The logits themselves,
    not log-probabilities: softmax and temperature ignore a per-photo constant, but the energy novelty
    (-T logsumexp(logits / T)) does not (log-probabilities gave every photo energy 0, all "unknown")."""
    return calibration_report(np.asarray(logits, np.float64), targets, classes, Calibration.load(run), out_dir,
                              coverage)


def format_calibration(rep: dict) -> str:
    """One or two lines for the eval printout."""
    if "ece_after" not in rep:
        return f"ECE {rep['ece_before']:.3f} ({rep['note']})"
    line = (f"ECE {rep['ece_before']:.3f} -> {rep['ece_after']:.3f} after temperature {rep['temperature']:.3f}; "
            f"candidate sets at {rep['coverage_target']:.0%}: coverage {rep['coverage']:.1%}, "
            f"mean size {rep['mean_set_size']:.2f}")
    if "known_flagged_unknown" in rep:
        line += f"; flagged unknown {rep['known_flagged_unknown']:.1%}"
    return line


def openset_report(cal: Calibration, known: dict, unknown: dict) -> dict:
    """Every detector on known photos (of the trained minerals) against photos of other minerals:
    AUROC, and the fractions of each accepted as known at the calibration's thresholds.

    Args:
        known, unknown: {"logits", "embedding"} of the photos (known also "labels" for its Top1).
    """
    out = {"known_photos": int(len(known["logits"])), "unknown_photos": int(len(unknown["logits"])),
           "acceptance_target": cal.acceptance, "detectors": {}}
    if "labels" in known:
        out["known_top1"] = float((np.argmax(known["logits"], 1) == known["labels"]).mean())
    for name in core.DETECTORS:
        k = cal.novelty(known["logits"], known["embedding"], name)
        u = cal.novelty(unknown["logits"], unknown["embedding"], name)
        thr = cal.thresholds[name]
        out["detectors"][name] = {"auroc": core.auroc(k, u), "known_accepted": float((k <= thr).mean()),
                                  "unknown_accepted": float((u <= thr).mean())}
    return out


def plot_reliability(before: np.ndarray, after: np.ndarray | None, labels: np.ndarray, path, bins: int = 15) -> None:
    """Reliability diagram: accuracy against confidence per bin, before (and after) temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for probs, name, colour in ((before, "softmax", "tab:red"), (after, "temperature-scaled", "tab:blue")):
        if probs is None:
            continue
        r = core.reliability_bins(probs, labels, bins)
        used = r["count"] > 0
        ax.plot(r["confidence"][used], r["accuracy"][used], marker="o", color=colour,
                label=f"{name} (ECE {core.ece(probs, labels, bins):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
           title=f"Reliability on {len(labels)} photos")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
