"""Leave-classes-out test of the unknown-mineral detectors, temperature scaling and conformal sets.

    python studies/openset.py RUN [RUN ...] --data ../shared/data/minet7 [--shrinkage 0.1 0.5] [--out studies/results/openset.json]

Each RUN was trained on a subset of the minerals in --data (a folder of class-folder symlinks); the
other minerals' photos are its "unknown" photos. The run's validation photos are split in two halves
(alternate photos per class): half A fits the temperature, the detector thresholds (95% of known
accepted) and the conformal scores, half B is the known test set. Training photos give the class
means, covariance and k-NN bank. Prints a Markdown table per run and the mean over runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mineralnet.calibration import calibrate_arrays, core
from mineralnet.calibration.fit import DEFAULT_SHRINKAGE, calibration_report, extract, openset_report
from mineralnet.data import scan_dataset
from mineralnet.analysis.evaluate import split_samples
from mineralnet.artifact import load_model


def halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Alternate photos of each class into half A and half B (index arrays)."""
    a, b = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        a += list(idx[0::2])
        b += list(idx[1::2])
    return np.array(sorted(a)), np.array(sorted(b))


def features(run: Path, data: Path) -> dict:
    """The run's outputs on its training and validation photos and on the photos of the minerals it never saw."""
    model, meta = load_model(run)
    everything = scan_dataset(data, verify=False)
    held = [c for c in everything.classes if c not in meta["classes"]]
    return {"run": run, "meta": meta, "held": held,
            "train": extract(model, split_samples(run, "train").samples, meta),
            "val": extract(model, split_samples(run, "val").samples, meta),
            "unknown": extract(model, [(p, 0) for p, y in everything.samples if everything.classes[y] in held], meta)}


def one_run(f: dict, coverage: float, acceptance: float, shrinkage: float) -> dict:
    meta, val = f["meta"], f["val"]
    ia, ib = halves(val["labels"])
    part = lambda d, i: {k: v[i] for k, v in d.items()}  # noqa: E731
    cal = calibrate_arrays(f["train"], part(val, ia), int(meta["num_classes"]), acceptance=acceptance,
                           shrinkage=shrinkage)
    known = part(val, ib)
    rep = openset_report(cal, known, f["unknown"])
    rep.update({"run": f["run"].name, "held_out": f["held"], "classes": meta["classes"], "temperature": cal.temperature,
                "calibration_photos": int(len(ia)), "shrinkage": shrinkage,
                "conformal": calibration_report(known["logits"], known["labels"], meta["classes"], cal,
                                                coverage=coverage, outputs={"embedding": known["embedding"]})})
    return rep


def markdown(reports: list[dict], coverage: float) -> str:
    dets = list(core.DETECTORS)
    lines = ["| held out (unknown) | known Top1 | " + " | ".join(f"{d} AUROC / unk. acc." for d in dets)
             + f" | ECE before -> after | coverage @{coverage:.0%} | mean set size |",
             "|---|---|" + "---|" * (len(dets) + 3)]
    for r in reports:
        c = r["conformal"]
        cells = [f"{r['detectors'][d]['auroc']:.3f} / {r['detectors'][d]['unknown_accepted']:.0%}" for d in dets]
        lines.append(f"| {', '.join(r['held_out'])} ({r['unknown_photos']} photos) | {r['known_top1']:.1%} | "
                     + " | ".join(cells) + f" | {c['ece_before']:.3f} -> {c['ece_after']:.3f} | "
                     f"{c['coverage']:.1%} | {c['mean_set_size']:.2f} |")
    mean = lambda f: float(np.mean([f(r) for r in reports]))  # noqa: E731
    cells = [f"{mean(lambda r: r['detectors'][d]['auroc']):.3f} / "
             f"{mean(lambda r: r['detectors'][d]['unknown_accepted']):.0%}" for d in dets]
    lines.append(f"| **mean of {len(reports)}** | {mean(lambda r: r['known_top1']):.1%} | " + " | ".join(cells)
                 + f" | {mean(lambda r: r['conformal']['ece_before']):.3f} -> "
                 f"{mean(lambda r: r['conformal']['ece_after']):.3f} | "
                 f"{mean(lambda r: r['conformal']['coverage']):.1%} | "
                 f"{mean(lambda r: r['conformal']['mean_set_size']):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="the full photo set (all minerals)")
    ap.add_argument("--coverage", type=float, default=0.9)
    ap.add_argument("--acceptance", type=float, default=0.95)
    ap.add_argument("--shrinkage", type=float, nargs="+", default=[DEFAULT_SHRINKAGE],
                    help="covariance shrinkage of the feature detectors; several values give one table each, "
                         f"from one pass over the photos (default {DEFAULT_SHRINKAGE})")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the raw numbers")
    args = ap.parse_args(argv)
    feats = [features(r, args.data) for r in args.runs]
    reports = []
    for shrinkage in args.shrinkage:
        table = [one_run(f, args.coverage, args.acceptance, shrinkage) for f in feats]
        reports += table
        print(f"shrinkage {shrinkage}\n" + markdown(table, args.coverage) + "\n", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
