"""Tabulate training runs of one recipe search: what each run changed and what it reached.

    python studies/recipe_table.py RUN [RUN ...] [--base RUN] [--out studies/results/recipe.md] [--note TEXT]
    python studies/recipe_table.py --by-fold RUN [RUN ...]   # one row per recipe, one column per fold

Every row is one run directory made by `mineralnet train` (or launch/train.py): the config fields that
differ from the base run (default: the first run), its training minutes (training steps only, not
validation or checkpoints), the best validation Top1 / mean class accuracy with their epoch, the last
epoch's Top1, and, for runs with --ema-decay, the live weights' Top1 at the best epoch. All runs should
share one validation split (same --data, --folds, --fold, --seed); the table says when they do not.

With --by-fold the runs are grouped into recipes (every config field but the fold and the output folder)
and each recipe gets one row: best Top1 / mean class accuracy on every fold it was run on, then the means
over its folds of the best and of the last-epoch Top1 (the last epoch is not chosen on the validation
photos, so its mean is the unbiased one) and the training minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from mineralnet.errors import MineralNetError
from mineralnet.runs import read_metrics, read_split

IGNORED = {"out", "resume", "log_every", "workers", "data"}


def load_run(path: Path) -> dict:
    path = Path(path)
    if not (path / "config.yaml").is_file() or not (path / "metrics.jsonl").is_file():
        raise SystemExit(f"recipe_table.py: error: {str(path)!r} is not a training run (needs config.yaml and "
                         f"metrics.jsonl); pass run directories made by `mineralnet train`")
    # fields added to TrainConfig after a run was made take their defaults (what that run trained with)
    cfg = {**_defaults(), **yaml.safe_load((path / "config.yaml").read_text())}
    try:
        val = tuple(sorted(p for p, _ in read_split(path)["splits"]["val"]))
    except MineralNetError:  # no split file: the run cannot be compared on its photos
        val = ()
    return {"name": path.name, "cfg": cfg, "lines": read_metrics(path), "val": val}


def _fmt(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def _defaults() -> dict:
    try:
        from mineralnet.config import TrainConfig

        return TrainConfig().to_dict()
    except ImportError:  # the table also works without the package installed
        return {}


def table(runs: list[dict], base: dict) -> str:
    defaults = _defaults()
    rows = ["| run | changes from the base run | epochs | train min | best Top1 | mean class acc | best epoch "
            "| last-epoch Top1 | live weights at best |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        diff = [f"{k}={_fmt(v)}" for k, v in r["cfg"].items()
                if k not in IGNORED and base["cfg"].get(k, defaults.get(k)) != v]
        lines = r["lines"]
        if not lines:
            continue
        best = max(lines, key=lambda l: l["val_top1"])  # the first epoch reaching the maximum, as training keeps
        minutes = sum(l["seconds"] for l in lines) / 60
        planned = r["cfg"].get("epochs", len(lines))
        epochs = str(len(lines)) if len(lines) == planned else f"{len(lines)} of {planned} (stopped)"
        live = f"{100 * best['val_top1_live']:.1f}" if "val_top1_live" in best else "-"
        rows.append(f"| {r['name']} | {' '.join(diff) or '(base)'} | {epochs} | {minutes:.1f} | "
                    f"{100 * best['val_top1']:.1f} | {100 * best['val_mean_class_acc']:.1f} | {best['epoch']} | "
                    f"{100 * lines[-1]['val_top1']:.1f} | {live} |")
    return "\n".join(rows)


def _recipe_key(cfg: dict) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k not in IGNORED | {"fold", "val_split"}}, sort_keys=True)


def fold_table(runs: list[dict], base: dict) -> str:
    """One row per recipe (runs whose configs differ only in the fold), one column per fold."""
    defaults = _defaults()
    recipes: dict[str, list[dict]] = {}
    for r in runs:
        if r["lines"]:
            recipes.setdefault(_recipe_key(r["cfg"]), []).append(r)
    folds = sorted({r["cfg"].get("fold") for group in recipes.values() for r in group}, key=lambda f: (f is None, f))
    fold_sets = [{r["cfg"].get("fold") for r in group} for group in recipes.values()]
    common = sorted(set.intersection(*fold_sets), key=lambda f: (f is None, f)) if fold_sets else []
    uneven = len({frozenset(f) for f in fold_sets}) > 1 and common  # recipes run on different folds
    rows = ["| recipe | " + " | ".join(f"fold {f} Top1 / mean class acc" for f in folds)
            + " | mean best Top1 | mean best mean class acc | mean last-epoch Top1 | mean train min |"
            + (f" best Top1 on the common folds ({', '.join(map(str, common))}) |" if uneven else ""),
            "|---|" + "---|" * (len(folds) + 4 + bool(uneven))]
    for group in recipes.values():
        by_fold = {}
        for r in group:
            f = r["cfg"].get("fold")
            if f in by_fold:
                raise SystemExit(f"recipe_table.py: error: runs {by_fold[f]['name']!r} and {r['name']!r} are the same "
                                 f"recipe on the same fold {f}; pass one of them")
            by_fold[f] = r
        cfg = group[0]["cfg"]
        diff = [f"{k}={_fmt(v)}" for k, v in cfg.items()
                if k not in IGNORED | {"fold"} and base["cfg"].get(k, defaults.get(k)) != v]
        name = " ".join(diff) or "(base)"
        names = ", ".join(r["name"] for r in group)
        cells, tops, mcas, lasts, mins = [], [], [], [], []
        for f in folds:
            r = by_fold.get(f)
            if r is None:
                cells.append("-")
                continue
            best = max(r["lines"], key=lambda l: l["val_top1"])
            tops.append(100 * best["val_top1"])
            mcas.append(100 * best["val_mean_class_acc"])
            lasts.append(100 * r["lines"][-1]["val_top1"])
            mins.append(sum(l["seconds"] for l in r["lines"]) / 60)
            cells.append(f"{tops[-1]:.1f} / {mcas[-1]:.1f}")
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        row = (f"| {name} ({names}) | " + " | ".join(cells)
               + f" | **{mean(tops):.1f}** | {mean(mcas):.1f} | {mean(lasts):.1f} | {mean(mins):.1f} |")
        if uneven:
            shared = [100 * max(l["val_top1"] for l in by_fold[f]["lines"]) for f in common]
            row += f" {mean(shared):.1f} |"
        rows.append(row)
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--base", default=None, help="run whose config the others are compared with (default: first)")
    ap.add_argument("--out", default=None, help="write the markdown here too (e.g. studies/results/recipe.md)")
    ap.add_argument("--title", default="Training recipe search", help="section title")
    ap.add_argument("--note", default="", help="text placed under the title (machine, commands, conclusions)")
    ap.add_argument("--by-fold", action="store_true",
                    help="one row per recipe (runs differing only in --fold), one column per fold, and means")
    args = ap.parse_args(argv)
    runs = [load_run(Path(p)) for p in args.runs]
    base = load_run(Path(args.base)) if args.base else runs[0]
    same_split = len({r["val"] for r in runs}) == 1
    text = f"## {args.title}\n\n{args.note.strip()}\n\n" if args.note.strip() else f"## {args.title}\n\n"
    if args.by_fold:
        text += fold_table(runs, base) + "\n"
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    text += table(runs, base) + "\n"
    text += ("\nAll runs validate on the same photos.\n" if same_split else
             "\n**The runs do not share one validation split**: compare them with care.\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
