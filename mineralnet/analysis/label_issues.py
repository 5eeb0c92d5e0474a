"""`mineralnet data issues CV_OR_RUN`: photos whose given mineral looks wrong.

Confident learning (Northcutt et al. 2021, the `cleanlab` package) compares each photo's given label with
out-of-fold predicted probabilities: a photo is a suspect when the model, which never trained on it, is
confident of another class beyond what that class's own confusion rate explains. Out-of-fold
probabilities come from a `mineralnet cv` folder (every photo is in one fold's validation split, so each
has a prediction from a model that did not see it) or from training runs (only their validation photos).

Writes into --out: label_issues.csv (every suspect, most likely first), label_issues.png (a gallery of
the top suspects with the given and the suggested mineral) and label_issues.json (counts and settings).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.runs import RunDir

CSV_NAME, PNG_NAME, JSON_NAME = "label_issues.csv", "label_issues.png", "label_issues.json"


@dataclass
class OutOfFold:
    """Held-out predictions gathered from fold runs: one row per photo."""
    paths: list[str]
    labels: np.ndarray      # (N,) given class indices
    probs: np.ndarray       # (N, C) probabilities from a model that did not train on the photo
    classes: list[str]
    runs: list[str]
    folds: int              # how many fold runs contributed


def fold_runs(source, variant: str | None = None) -> list[Path]:
    """The run folders whose validation photos give held-out predictions: a cv folder's finished runs of
    one variant (`variant`: its name or folder; default the first, the baseline), or the given run folders."""
    sources = [Path(s) for s in ([source] if isinstance(source, (str, Path)) else source)]
    runs: list[Path] = []
    for src in sources:
        if not src.exists():
            raise MineralNetError(f"{str(src)!r} does not exist; pass a `mineralnet cv --out` folder or training "
                                  f"run folders")
        results = src / "results.json"
        if results.is_file():
            runs += _cv_runs(src, results, variant)
        elif RunDir(src).has_model():
            runs.append(src)
        else:
            raise MineralNetError(f"{str(src)!r} is neither a cv folder (results.json) nor a training run "
                                  f"(model.safetensors); pass what `mineralnet cv --out` or `train --out` wrote")
    return runs


def _cv_runs(cv: Path, results: Path, variant: str | None = None) -> list[Path]:
    try:
        records = json.loads(results.read_text())["variants"]
        names = [(r["name"], r["slug"]) for r in records]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MineralNetError(f"cannot read {results}: {e}; run `mineralnet cv` again to rewrite it") from None
    chosen = [r for r in records if variant in (None, r["name"], r["slug"])]
    if not chosen:
        raise MineralNetError(f"--variant {variant!r} is not in {cv}; its variants: "
                              f"{', '.join(repr(n) for n, _ in names)}")
    rec = chosen[0]
    runs = [cv / rec["slug"] / f"fold{f['fold']}" for f in rec["folds"]]
    if rec.get("part", "ensemble") != "ensemble":  # an ensemble preset's member row: RUN/members/mI of each fold
        runs = [r / RunDir(r).members_dir.name / rec["part"] for r in runs]
    runs = [r for r in runs if RunDir(r).has_model()]
    if not runs:
        raise MineralNetError(f"{cv} has no finished fold run yet; run (or resume) the cv command first")
    return runs


def gather_out_of_fold(runs, *, batch_size: int = 32, device: str | None = None, progress: bool = True
                       ) -> OutOfFold:
    """Each run's model predicts its own validation photos (read from the run's split.json)."""
    from tqdm.auto import tqdm

    from mineralnet.infer import Predictor
    from mineralnet.runs import read_split

    paths, labels, probs, classes = [], [], [], None
    seen: dict[str, str] = {}
    for run in runs:
        split = read_split(run)
        predictor = Predictor(run, device=device)
        if classes is None:
            classes = list(predictor.classes)
        elif list(predictor.classes) != classes:
            raise MineralNetError(f"{run} has classes {predictor.classes}, the first run {classes}; pass runs "
                                  f"trained on the same collection")
        val = [(p, y) for p, y in split["splits"]["val"] if y >= 0]
        for p, _ in val:
            if p in seen:
                raise MineralNetError(f"{p} is a validation photo of both {seen[p]} and {run}: these runs are not "
                                      f"folds of one cross-validation; pass one cv folder or disjoint runs")
            seen[p] = str(run)
        bar = tqdm(range(0, len(val), batch_size), desc=f"predicting {Path(run).name}", unit="batch",
                   disable=not progress, leave=False)
        for i in bar:
            chunk = val[i:i + batch_size]
            probs.append(predictor.probabilities([p for p, _ in chunk]))
            paths += [p for p, _ in chunk]
            labels += [y for _, y in chunk]
    if not paths:
        raise MineralNetError("the runs list no validation photos; train with a validation split (--val-split)")
    return OutOfFold(paths, np.asarray(labels, np.int64), np.concatenate(probs).astype(np.float64), classes,
                     [str(r) for r in runs], len(runs))


def find_issues(labels, probs, *, filter_by: str = "prune_by_noise_rate") -> tuple[np.ndarray, np.ndarray]:
    """(suspect indices ranked most-likely-wrong first, label quality score of every photo in 0..1).

    cleanlab's `find_label_issues` decides which photos are suspects (confident joint, pruned by the
    estimated noise rate per class); the rank and score are its self-confidence: the held-out
    probability of the given label."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise MineralNetError(f"probabilities {probs.shape} do not match {len(labels)} labels")
    probs = probs / probs.sum(1, keepdims=True)
    missing = sorted(set(range(probs.shape[1])) - set(labels.tolist()))
    if missing:  # cleanlab needs every class among the given labels
        raise MineralNetError(f"class index(es) {missing} have no photo with held-out predictions; run every "
                              f"cv fold (no --only-folds) so each class is covered")
    ranked = find_label_issues(labels, probs, filter_by=filter_by, return_indices_ranked_by="self_confidence")
    return np.asarray(ranked, np.int64), get_label_quality_scores(labels, probs, method="self_confidence")


def write_csv(path, oof: OutOfFold, ranked, quality) -> Path:
    path = Path(path)
    with open(path.with_suffix(".tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "path", "given", "suggested", "p_given", "p_suggested", "label_quality"])
        for r, i in enumerate(ranked, start=1):
            s = int(np.argmax(oof.probs[i]))
            w.writerow([r, oof.paths[i], oof.classes[oof.labels[i]], oof.classes[s],
                        f"{oof.probs[i, oof.labels[i]]:.4f}", f"{oof.probs[i, s]:.4f}", f"{quality[i]:.4f}"])
    path.with_suffix(".tmp").replace(path)
    return path


def plot_gallery(path, oof: OutOfFold, ranked, top: int) -> Path | None:
    """Grid of the `top` suspects: the photo, its given mineral and the suggested one with probabilities."""
    if not len(ranked) or top <= 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image, ImageOps

    shown = list(ranked[:top])
    cols = min(6, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.9 * rows + 0.6), dpi=110, squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(shown):
        ax = axes.flat[k]
        try:
            with Image.open(oof.paths[i]) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((256, 256))
                ax.imshow(np.asarray(im))
        except OSError:
            ax.text(0.5, 0.5, "cannot read", ha="center", va="center", transform=ax.transAxes)
        given, s = int(oof.labels[i]), int(np.argmax(oof.probs[i]))
        ax.set_title(f"#{k + 1} {Path(oof.paths[i]).name[:22]}\ngiven: {oof.classes[given][:18]} "
                     f"{100 * oof.probs[i, given]:.0f}%\nlooks like: {oof.classes[s][:18]} {100 * oof.probs[i, s]:.0f}%",
                     fontsize=7.5, loc="left")
    fig.suptitle("Photos whose given mineral looks wrong (held-out predictions; most likely first)", fontsize=10)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def label_issues(source, out, *, variant: str | None = None, top: int = 24, batch_size: int = 32,
                 device: str | None = None) -> dict:
    """Gather held-out predictions, find the suspects, write CSV, gallery and summary; returns the summary."""
    from mineralnet.files import atomic_write_json

    oof = gather_out_of_fold(fold_runs(source, variant), batch_size=batch_size, device=device)
    ranked, quality = find_issues(oof.labels, oof.probs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_class = {c: int((oof.labels[ranked] == k).sum()) for k, c in enumerate(oof.classes)}
    summary = {"photos": len(oof.paths), "suspects": int(len(ranked)), "fold_runs": oof.runs,
               "suspects_per_given_class": per_class, "method": "cleanlab find_label_issues "
               "(prune_by_noise_rate), ranked by self-confidence"}
    write_csv(out / CSV_NAME, oof, ranked, quality)
    gallery = plot_gallery(out / PNG_NAME, oof, ranked, top)
    summary["gallery"] = gallery.name if gallery else None
    atomic_write_json(out / JSON_NAME, summary)
    return summary
