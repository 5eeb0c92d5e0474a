"""Class-balance options on a long-tailed version of a collection, over several folds with paired tests.

    python studies/longtail.py --data ../shared/data/minet7 --out LT --folds 5 --only-folds 0,1,2 --ratio 10 \
        --variant "sampling=uniform" --variant "sampling=sqrt" --variant "logit_adjust=1.0" \
        --config cpu-pretrained --epochs 6

For each fold k of the collection's stratified K-fold split (`mineralnet.data.stratified_kfold`, the split
`mineralnet cv` uses), the validation photos are fold k cut down to the same number per class (balanced:
Top1 then weighs every mineral alike), and the training photos are the other folds subsampled to a long
tail: the classes, in one seeded order shared by all folds, keep n_max * ratio^(-i/(C-1)) photos
(i = 0..C-1), n_max = the smallest class's training pool, so the largest class has `ratio` times the
photos of the smallest. Both sides are folders of symbolic links under LT/data/fold<k>/. Every variant
(the first is the baseline) is trained on every fold with `mineralnet.train.fit`; LT/results.md holds the
cv command's table (mean ± std over folds, paired t-test against the baseline) and the mean accuracy of
the rarest classes. Finished runs are not re-run: run the command again, fold by fold, to fill the table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np

from mineralnet import data as mdata, train
from mineralnet.analysis import crossval, cvreport
from mineralnet.config import FIELD_NAMES, add_config_arguments, load_config
from mineralnet.errors import MineralNetError
from mineralnet.files import atomic_write_text

TAIL = 3  # the rarest classes whose mean accuracy gets its own column


def long_tail_counts(pool: int, classes: int, ratio: float) -> list[int]:
    """Photos kept per class rank: pool * ratio^(-i/(classes-1)), rounded, i = 0..classes-1."""
    return [max(1, round(pool * ratio ** (-i / (classes - 1)))) for i in range(classes)]


def build_fold(index, val_idx: list[int], out: Path, ratio: float, seed: int) -> dict:
    """Write out/train and out/val (symlinks); return {class: training photos kept}."""
    rng = random.Random(seed)
    val_set = set(val_idx)
    by_class = {c: ([], []) for c in range(len(index.classes))}
    for i, (path, label) in enumerate(index.samples):
        by_class[label][1 if i in val_set else 0].append(path)
    order = list(range(len(index.classes)))
    random.Random(seed).shuffle(order)  # which mineral is the head, the same in every fold
    keep = long_tail_counts(min(len(t) for t, _ in by_class.values()), len(order), ratio)
    n_val = min(len(v) for _, v in by_class.values())
    kept = {}
    for rank, c in enumerate(order):
        tr, va = by_class[c]
        name = index.classes[c]
        for side, paths in (("train", rng.sample(sorted(tr), keep[rank])), ("val", rng.sample(sorted(va), n_val))):
            folder = out / side / name
            folder.mkdir(parents=True, exist_ok=True)
            for p in paths:
                link = folder / os.path.basename(p)
                if not link.is_symlink():
                    link.symlink_to(os.path.abspath(p))
        kept[name] = keep[rank]
    return kept


def tail_accuracy(run_dir: Path, kept: dict) -> float | None:
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    acc = dict(zip(m["classes"], m["per_class_acc"]))
    rare = sorted(kept, key=kept.get)[:TAIL]
    return float(np.mean([acc[c] for c in rare]))


def run(args, base: dict) -> dict:
    out = Path(args.out)
    cells = crossval.parse_variants(args.variant) or [{}]
    index = mdata.scan_dataset(args.data, verify=True)
    cfg0 = load_config(args.config, **base)
    folds = mdata.stratified_kfold(index.labels(), args.folds, cfg0.data_seed)
    only = [int(f) for f in args.only_folds.split(",")] if args.only_folds else list(range(args.folds))
    records = [{"name": crossval.variant_name(c), "slug": crossval.variant_slug(c), "overrides": c, "folds": []}
               for c in cells]
    kept_by_fold = {}
    for k in only:
        fold_dir = out / "data" / f"fold{k}"
        kept = build_fold(index, folds[k], fold_dir, args.ratio, cfg0.data_seed)
        kept_by_fold[k] = kept
        for cell, rec in zip(cells, records):
            run_dir = out / rec["slug"] / f"fold{k}"
            cfg = load_config(args.config, **{**base, **cell, "data": str(fold_dir / "train"),
                                              "val_data": str(fold_dir / "val"), "out": str(run_dir)})
            result = crossval.fold_result(run_dir)
            if result is None:
                print(f"fold {k} {rec['name']}: training -> {run_dir}", flush=True)
                crossval.run_fold(cfg, run_dir, None, run_dir.with_suffix(".yaml"))
                result = crossval.fold_result(run_dir)
            if result is None:
                raise MineralNetError(f"{run_dir} did not finish; run the same command again")
            rec["folds"].append({"fold": k, **result, "tail_acc": tail_accuracy(run_dir, kept)})
    cvreport.summarize_variants(records, only)
    summary = {"data": str(index.root), "n": len(index.samples), "classes": index.classes, "folds": args.folds,
               "seed": cfg0.data_seed, "folds_run": only, "out": str(out), "variants": records,
               "command": "python studies/longtail.py " + " ".join(sys.argv[1:]), "kept": kept_by_fold}
    text = cvreport.results_markdown(summary) + tail_table(records, kept_by_fold, args.ratio)
    atomic_write_text(out / "results.md", text)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(text)
    return summary


def tail_table(records, kept_by_fold, ratio) -> str:
    first = next(iter(kept_by_fold.values()))
    lines = ["", f"Long tail (imbalance ratio {ratio:g}), training photos per class in fold "
                 f"{next(iter(kept_by_fold))}: " + ", ".join(f"{c} {n}" for c, n in
                                                              sorted(first.items(), key=lambda t: -t[1])),
             "", f"| Variant | mean acc of the {TAIL} rarest classes (%) | Δ vs baseline | per fold |",
             "|---|---|---|---|"]
    base = [f["tail_acc"] for f in sorted(records[0]["folds"], key=lambda f: f["fold"])]
    for i, v in enumerate(records):
        vals = [f["tail_acc"] for f in sorted(v["folds"], key=lambda f: f["fold"])]
        m, s = cvreport._mean_std(vals)
        delta = "-" if i == 0 else cvreport._delta(cvreport.paired_test(base, vals))
        lines.append(f"| {v['name']} | {cvreport._pct(m, s)} | {delta} | {' / '.join(f'{100 * x:.1f}' for x in vals)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=10.0, help="largest : smallest class in training (default 10)")
    p.add_argument("--variant", action="append", help="FIELD=V FIELD=V, repeatable; the first is the baseline")
    p.add_argument("--only-folds", default=None, metavar="I,J")
    add_config_arguments(p)
    args = p.parse_args(argv)
    base = {k: v for k, v in vars(args).items() if k in FIELD_NAMES and k not in ("data", "out", "folds")}
    args.folds = int(getattr(args, "folds", 5))
    if not getattr(args, "data", None) or not getattr(args, "out", None):
        p.error("--data and --out are required")
    try:
        run(args, base)
    except MineralNetError as e:
        print(f"longtail.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
