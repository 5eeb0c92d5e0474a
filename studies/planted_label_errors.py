"""Study: does `mineralnet data issues` find label errors planted in a real collection?

Makes a copy of a class-folder collection (symbolic links, so no photo is copied) in which a share of the
photos (default 2%) sits in a wrong, randomly chosen class folder, runs `mineralnet cv` on the copy, then
`mineralnet data issues` on the cv folder, and scores the suspects against the planted list: precision,
recall, and precision among the top 1x planted count.

    python studies/planted_label_errors.py --data ../shared/data/minet7 --work planted/ \
        --folds 4 -- --config cpu-pretrained --image-size 128 --epochs 4

Arguments after `--` go to `mineralnet cv`. Writes WORK/planted.json (the planted moves) and
WORK/result.json (the scores), and prints a markdown row.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

MINERALNET = [sys.executable, "-c", "import sys; from mineralnet.cli import main; sys.exit(main(sys.argv[1:]))"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def plant(data: Path, copy: Path, share: float, seed: int) -> list[dict]:
    """Symlink every photo of `data` into `copy`, a `share` of them under a wrong class; return the moves."""
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    photos = [(c, p) for c in classes for p in sorted((data / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    rng = random.Random(seed)
    moved = set(rng.sample(range(len(photos)), round(share * len(photos))))
    moves = []
    for c in classes:
        (copy / c).mkdir(parents=True, exist_ok=True)
    for i, (c, p) in enumerate(photos):
        target = c
        if i in moved:
            target = rng.choice([o for o in classes if o != c])
            moves.append({"photo": f"{target}/{p.name}", "true": c, "given": target})
        link = copy / target / p.name
        if not link.exists():
            os.symlink(p.resolve(), link)
    return moves


def score(suspects: list[dict], moves: list[dict], copy: Path) -> dict:
    planted = {str((copy / m["photo"]).absolute()) for m in moves}
    found = [str(Path(r["path"]).absolute()) for r in suspects]
    hits = [f in planted for f in found]
    top = hits[:len(planted)]
    return {"planted": len(planted), "suspects": len(found), "found_planted": sum(hits),
            "precision": sum(hits) / max(1, len(found)), "recall": sum(hits) / max(1, len(planted)),
            "precision_at_planted": sum(top) / max(1, len(top))}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="class-folder collection (not modified)")
    ap.add_argument("--work", required=True, type=Path, help="folder for the copy, the cv runs and the results")
    ap.add_argument("--share", type=float, default=0.02, help="share of photos moved to a wrong class (0.02)")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    copy, cv = args.work / "photos", args.work / "cv"
    moves = plant(args.data, copy, args.share, args.seed)
    (args.work / "planted.json").write_text(json.dumps(moves, indent=1))
    print(f"planted {len(moves)} wrong labels in {copy}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([*MINERALNET, "cv", "--data", str(copy), "--out", str(cv),
                    "--folds", str(args.folds), *extra], check=True)
    t_cv = time.perf_counter() - t0
    subprocess.run([*MINERALNET, "data", "issues", str(cv)], check=True)
    suspects = list(csv.DictReader(open(cv / "label_issues.csv")))
    result = {**score(suspects, moves, copy), "folds": args.folds, "cv_args": extra, "share": args.share,
              "seed": args.seed, "cv_minutes": round(t_cv / 60, 1)}
    (args.work / "result.json").write_text(json.dumps(result, indent=1))
    print("| planted | suspects | precision | recall | precision@planted | cv time |")
    print(f"| {result['planted']} | {result['suspects']} | {100 * result['precision']:.1f}% | "
          f"{100 * result['recall']:.1f}% | {100 * result['precision_at_planted']:.1f}% | {result['cv_minutes']} min |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
