"""Study: does the ensemble tell never-seen minerals apart better than one model (leave-classes-out)?

For each rotation (2 of the collection's minerals left out of training, as in issue 16's table), trains an
ensemble preset on the other minerals (default studies/configs/cpu-ensemble-short.yaml, `--val-split 0.25`):
members m0..m2, their calibrated ensemble, the distilled student. m0 is the single-model recipe (cpu-pretrained at
the same size and epochs). Then scores every validation photo (known) and every photo of the left-out minerals
(unknown) with each model's novelty scores, higher = less known:

    msp      1 - the largest calibrated probability
    energy   -logsumexp(logits) (the ensemble: the members' mean energy)
    mi       the ensemble only: mutual information, H(mean p) - mean H(p), the members' disagreement

and reports AUROC (known vs unknown) and the share of unknown photos accepted as known at the threshold that
keeps 95% of known photos (fitted on alternate half A of the validation photos, measured on half B).

    python studies/openset_ensemble.py --data ../shared/data/minet7 --work ens-open \
        --rotation biotite,chrysocolla --rotation muscovite,quartz

Writes WORK/result.json and prints a Markdown table; finished rotations are not trained again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).resolve().parent / "configs" / "cpu-ensemble-short.yaml"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
ACCEPT = 0.95


def subset(data: Path, held: list[str], out: Path) -> list[Path]:
    """out/<class>/ symlinks of every photo of the classes not held out; returns the held-out photos."""
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    missing = [c for c in held if c not in classes]
    if missing:
        raise SystemExit(f"--rotation names {', '.join(missing)}, not classes of {data} ({', '.join(classes)})")
    unknown = []
    for c in classes:
        photos = sorted(p for p in (data / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if c in held:
            unknown += photos
            continue
        (out / c).mkdir(parents=True, exist_ok=True)
        for p in photos:
            link = out / c / p.name
            if not link.is_symlink():
                link.symlink_to(os.path.abspath(p))
    return unknown


def single_scores(run: Path, paths: list[str]) -> dict:
    from scipy.special import logsumexp

    from mineralnet.infer import Predictor

    pred = Predictor(run)
    probs, logits = [], []
    for i in range(0, len(paths), 32):
        chunk = paths[i:i + 32]
        probs.append(pred.probabilities(chunk))
        logits.append(np.asarray(pred.outputs(chunk)["logits"], np.float64))
    probs, logits = np.concatenate(probs), np.concatenate(logits)
    return {"probs": probs, "msp": 1.0 - probs.max(1), "energy": -logsumexp(logits, axis=1)}


def ensemble_scores(ens: Path, paths: list[str]) -> dict:
    from mineralnet.infer import Predictor

    pred = Predictor(ens)
    probs, scores = [], {}
    for i in range(0, len(paths), 32):
        ans = pred.answers(paths[i:i + 32])
        probs.append(np.asarray(ans["probs"], np.float64))
        for k, v in ans["scores"].items():
            scores.setdefault(k, []).append(np.asarray(v, np.float64))
    probs = np.concatenate(probs)
    scores = {k: np.concatenate(v) for k, v in scores.items()}
    return {"probs": probs, "msp": 1.0 - probs.max(1), "energy": scores["energy"],
            "mi": scores["mutual_information"]}


def report(known: dict, unknown: dict, labels: np.ndarray, names: list[str]) -> dict:
    from mineralnet.calibration import core
    from openset import halves  # issue 16's halves (studies/ is on sys.path when this script runs)

    ia, ib = halves(labels)
    out = {"known_top1": float((known["probs"][ib].argmax(1) == labels[ib]).mean())}
    for n in names:
        thr = core.acceptance_threshold(known[n][ia], ACCEPT)
        out[n] = {"auroc": core.auroc(known[n][ib], unknown[n]),
                  "unknown_accepted": float((unknown[n] <= thr).mean()),
                  "known_accepted": float((known[n][ib] <= thr).mean())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="class-folder photos (e.g. ../shared/data/minet7)")
    ap.add_argument("--work", required=True, help="folder for the class subsets, the runs and result.json")
    ap.add_argument("--rotation", action="append", required=True, metavar="A,B",
                    help="minerals left out of training (repeatable: one rotation each)")
    ap.add_argument("--config", default=os.path.relpath(CONFIG), help="ensemble preset (default: %(default)s)")
    ap.add_argument("--val-split", default="0.25")
    args = ap.parse_args(argv)
    from mineralnet.runs import RunDir, read_split

    data, work = Path(args.data), Path(args.work)
    results = []
    for rot in args.rotation:
        held = sorted(c.strip() for c in rot.split(",") if c.strip())
        tag = "-".join(held)
        unknown_paths = [str(p) for p in subset(data, held, work / "data" / tag)]
        run = work / "runs" / tag
        result = RunDir(run).result()
        if not (result and result.get("status") in ("finished", "time_budget")):
            cmd = [sys.executable, "launch/train.py", "--config", args.config, "--data", str(work / "data" / tag),
                   "--val-split", args.val_split, "--out", str(run)]
            if RunDir(run).has_state():
                cmd = [sys.executable, "launch/train.py", "--resume", str(run)]
            print("$ " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        val = [(p, y) for p, y in read_split(run)["splits"]["val"] if y >= 0]
        paths, labels = [p for p, _ in val], np.array([y for _, y in val])
        rows = {}
        for name, path in (("m0 (single model)", run / "members" / "m0"), ("student", run)):
            k, u = single_scores(path, paths), single_scores(path, unknown_paths)
            rows[name] = report(k, u, labels, ["msp", "energy"])
        k, u = ensemble_scores(run / "ensemble", paths), ensemble_scores(run / "ensemble", unknown_paths)
        rows["ensemble"] = report(k, u, labels, ["msp", "energy", "mi"])
        results.append({"held_out": held, "unknown_photos": len(unknown_paths), "known_photos": len(paths),
                        "run": str(run), "models": rows})
        print(f"{tag}: " + json.dumps({n: {s: round(v['auroc'], 3) for s, v in r.items() if isinstance(v, dict)}
                                       for n, r in rows.items()}), flush=True)
    (work / "result.json").write_text(json.dumps({"config": args.config, "rotations": results}, indent=2))

    cols = [("m0 (single model)", "msp"), ("m0 (single model)", "energy"), ("student", "msp"),
            ("student", "energy"), ("ensemble", "msp"), ("ensemble", "energy"), ("ensemble", "mi")]
    print("\n| held out (unknown) | known Top1 m0 / ens | " + " | ".join(f"{m.split(' ')[0]} {s}" for m, s in cols)
          + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in results + [None]:
        rs = results if r is None else [r]
        mean = lambda f: float(np.mean([f(x) for x in rs]))  # noqa: E731
        head = f"**mean of {len(rs)}**" if r is None else f"{', '.join(r['held_out'])} ({r['unknown_photos']} photos)"
        top = (f"{100 * mean(lambda x: x['models']['m0 (single model)']['known_top1']):.1f}% / "
               f"{100 * mean(lambda x: x['models']['ensemble']['known_top1']):.1f}%")
        cells = [f"{mean(lambda x: x['models'][m][s]['auroc']):.3f} / "
                 f"{100 * mean(lambda x: x['models'][m][s]['unknown_accepted']):.0f}%" for m, s in cols]
        print(f"| {head} | {top} | " + " | ".join(cells) + " |")
    print(f"\nAUROC / unknown photos accepted at 95% of known (half A sets the threshold); wrote {work / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
