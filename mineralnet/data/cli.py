"""`mineralnet data check DIR` (counts, unreadable files, optional mean/std and near-duplicates),
`mineralnet data shard PHOTOS --out SHARDS` (WebDataset shards for streaming training),
`mineralnet data issues CV_OR_RUN` (photos whose label looks wrong) and `mineralnet data demo`."""
from __future__ import annotations


import json
import os
from pathlib import Path

from mineralnet.data.demo import make_demo_dataset
from mineralnet.data.duplicates import (DEFAULT_MAX_DISTANCE, DEFAULT_MAX_GROUP, false_partner_note, group_duplicates,
                                        hash_photos, near_duplicate_pairs)
from mineralnet.errors import MineralNetError
from mineralnet.runs import RunDir
from mineralnet.data.scan import identical_groups, scan_dataset
from mineralnet.data.stats import channel_stats


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="count photos per class and list every unreadable file "
                                         "(exit 1 if any file is unreadable or a class is empty)")
    check.add_argument("path", metavar="DIR", help="class-folder root (DIR/<class>/*.jpg) or CSV manifest (path,label)")
    check.add_argument("--stats", action="store_true", help="also print the RGB mean/std (0..1) used to normalise")
    check.add_argument("--duplicates", action="store_true",
                       help="also list near-duplicate photos (perceptual hash: re-encoded, resized or slightly "
                            "cropped copies) within a class, across classes (probable label errors) and, with "
                            "--split, across a run's or cv folder's train/validation split")
    check.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE, metavar="BITS",
                       help=f"near-duplicate threshold in bits of the 128-bit hash (default {DEFAULT_MAX_DISTANCE}; "
                            f"lower = stricter)")
    check.add_argument("--index", default=None, metavar="FILE",
                       help="the collection index to read and update (default: one per collection under "
                            "$MINERALNET_CACHE/index); a second check re-reads only new or changed photos")
    check.add_argument("--split", default=None, metavar="RUN_OR_CV",
                       help="with --duplicates: a training run (split.json) or cv folder (folds.json) whose "
                            "validation photos are checked against its training photos")
    shard = sub.add_parser("shard", help="write the photos as WebDataset tar shards (re-encoded JPEGs, split fixed "
                                         "now) that `mineralnet train --data SHARDS` streams on every rank")
    shard.add_argument("path", metavar="PHOTOS", help="class-folder root (PHOTOS/<class>/*.jpg) or CSV manifest")
    shard.add_argument("--out", required=True, metavar="SHARDS", help="folder to write (new or empty)")
    shard.add_argument("--size", type=int, default=256,
                       help="shorter side of each stored photo in pixels, never enlarged (default 256: enough for "
                            "--image-size 224, which resizes to 256 before its centre crop)")
    shard.add_argument("--shard-size", default="1000", metavar="N|SIZE",
                       help="photos per shard (default 1000), or a size such as 500MB; use at least as many "
                            "training shards as processes x workers")
    shard.add_argument("--val-split", type=float, default=0.1,
                       help="fraction held out for validation (stratified, near-duplicates kept together; default 0.1)")
    shard.add_argument("--folds", type=int, default=0, metavar="K",
                       help="write K stratified folds (fold0-*.tar ...) instead of train/val: train with "
                            "--folds K --fold i")
    shard.add_argument("--seed", type=int, default=0,
                       help="seed of the split, the shuffle before writing and the mean/std sample (default 0; "
                            "a folder run with the same --seed or --split-seed validates on the same photos)")
    shard.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored photos (default 90)")
    shard.add_argument("--max-duplicate-group", type=int, default=DEFAULT_MAX_GROUP,
                       help=f"as in training: larger near-duplicate groups are not kept on one side (default "
                            f"{DEFAULT_MAX_GROUP})")
    shard.add_argument("--no-group-duplicates", action="store_true",
                       help="split photo by photo, ignoring near-duplicates (as train --no-group-duplicates)")
    shard.add_argument("--index", default=None, metavar="FILE", help="the collection index to read and update")
    issues = sub.add_parser(
        "issues", help="rank photos whose given mineral looks wrong, from held-out predictions (cleanlab)",
        description="Confident learning (cleanlab) on out-of-fold probabilities: every photo of a `mineralnet cv` "
                    "folder is predicted by the fold model that did not train on it (training runs: only their "
                    "validation photos). Writes label_issues.csv (most likely first), label_issues.png (a gallery "
                    "of the top suspects with the suggested mineral) and label_issues.json.")
    issues.add_argument("source", nargs="+", metavar="CV_OR_RUN",
                        help="a `mineralnet cv --out` folder, or one or more training run folders")
    issues.add_argument("--out", default=None, metavar="DIR",
                        help="where the CSV and gallery go (default: the cv folder, or the first run's folder)")
    issues.add_argument("--variant", default=None, metavar="NAME",
                        help="with a cv folder: the variant whose fold runs predict (name or folder; default the "
                             "first, the baseline)")
    issues.add_argument("--top", type=int, default=24, metavar="N", help="photos in the gallery (default 24)")
    issues.add_argument("--batch-size", type=int, default=32)
    issues.add_argument("--device", default=None, help="PyTorch device (default: CUDA when available)")
    demo = sub.add_parser("demo", help="write the synthetic demo set (reused if present) and print its folder")
    demo.add_argument("--out", default=None, help="folder (default: $MINERALNET_CACHE or ~/.cache/mineralnet)")
    demo.add_argument("--classes", type=int, default=6, help="number of minerals (2..8; default 6)")
    demo.add_argument("--per-class", type=int, default=60, help="photos per mineral (default 60)")
    demo.add_argument("--size", type=int, default=96, help="side of each photo in pixels (default 96)")
    demo.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    if args.action == "demo":
        print(make_demo_dataset(args.out, classes=args.classes, per_class=args.per_class, size=args.size,
                                seed=args.seed))
        return 0
    if args.action == "shard":
        return _shard(args)
    if args.action == "issues":
        return _issues(args)
    if args.split and not args.duplicates:
        raise MineralNetError("--split is read with --duplicates; add --duplicates")
    if not 0 <= args.max_distance <= 64:
        raise MineralNetError(f"--max-distance {args.max_distance} must be in 0..64 bits (default "
                              f"{DEFAULT_MAX_DISTANCE})")
    return _check(args.path, stats=args.stats, duplicates=args.max_distance if args.duplicates else None,
                  split=args.split, index_file=args.index)


def _shard(args) -> int:
    from mineralnet.data.shards import write_shards

    if not 0.0 < args.val_split < 1.0:
        raise MineralNetError(f"--val-split {args.val_split} must be in (0, 1)")
    if args.folds and args.folds < 2:
        raise MineralNetError(f"--folds {args.folds} must be 0 (a train/val split) or at least 2")
    if args.max_duplicate_group < 2:
        raise MineralNetError(f"--max-duplicate-group {args.max_duplicate_group} must be at least 2")
    index = scan_dataset(args.path, verify=True, index_file=args.index)
    write_shards(index, args.out, size=args.size, shard_size=args.shard_size, val_split=args.val_split,
                 folds=args.folds, seed=args.seed, quality=args.quality,
                 group_duplicates=not args.no_group_duplicates, max_group=args.max_duplicate_group)
def _issues(args) -> int:
    from mineralnet.analysis.label_issues import CSV_NAME, PNG_NAME, label_issues

    if args.top < 0:
        raise MineralNetError(f"--top {args.top} must be 0 or more (photos in the gallery)")
    out = Path(args.out or args.source[0])
    summary = label_issues(args.source if len(args.source) > 1 else args.source[0], out, variant=args.variant,
                           top=args.top, batch_size=args.batch_size, device=args.device)
    n, k = summary["photos"], summary["suspects"]
    print(f"{k} of {n} photos ({100 * k / n:.1f}%) look mislabelled, from {len(summary['fold_runs'])} fold run(s)'s "
          f"held-out predictions; per given class: "
          + ", ".join(f"{c} {v}" for c, v in summary["suspects_per_given_class"].items() if v))
    print(f"wrote {out / CSV_NAME}" + (f" and {out / PNG_NAME}" if summary["gallery"] else ""))
    if k:
        print("look at each suspect: move a misfiled photo to its mineral's folder, delete one that shows no "
              "mineral, keep one the model gets wrong; then `mineralnet data check` and train again")
    return 0


def _report_identical(index) -> None:
    """Print byte-identical copies: across classes they are label errors, within a class they count twice
    (and can sit on both sides of a split)."""
    groups = identical_groups(index.samples, index.facts.digest_keys() if index.facts is not None else None)
    across = [g for g in groups if len({label for _, label in g}) > 1]
    if not groups:
        return
    print(f"byte-identical photos: {len(groups)} group(s), {len(across)} of them filed under more than one class "
          f"(probable label errors; keep one copy under the right class)")
    for g in sorted(groups, key=lambda g: -len({label for _, label in g}))[:20]:
        print("  " + "  =  ".join(f"{p} [{index.classes[label]}]" for p, label in g))
    if len(groups) > 20:
        print(f"  ... and {len(groups) - 20} more group(s)")


def validation_sets(split) -> list[tuple[str, set]]:
    """[(name, validation paths)] of a run (its split.json) or a cv folder (one per fold of folds.json)."""
    folder = Path(split)
    if (folder / "folds.json").is_file():
        doc = json.loads((folder / "folds.json").read_text())
        base = doc.get("base") or doc["data"]
        return [(f"fold {i}", {os.path.abspath(os.path.join(base, rel)) for rel in val})
                for i, val in enumerate(doc["val"])]
    run = RunDir(folder)
    if run.has_split():
        return [("the run's split", {p for p, _ in run.split()["splits"].get("val", [])})]
    raise MineralNetError(f"--split {str(split)!r} holds neither split.json (a training run) nor folds.json (a cv "
                          f"folder); pass one of those folders")


def _report_near_duplicates(index, max_distance: int, split=None) -> int:
    """Print near-duplicate pairs within a class, across classes, and across a split's two sides; return
    the number of pairs that sit across a split."""
    samples = index.samples
    hashes = index.facts.phash if index.facts is not None else hash_photos([p for p, _ in samples])
    pairs = near_duplicate_pairs(hashes, max_distance)
    across = [t for t in pairs if samples[t[0]][1] != samples[t[1]][1]]
    print(f"near-duplicate photos (perceptual hash within {max_distance} of 128 bits): {len(pairs)} pair(s), "
          f"{len(pairs) - len(across)} within a class, {len(across)} across classes (probable label errors); "
          f"{false_partner_note(len(samples), max_distance)}")
    groups = group_duplicates(hashes, index.facts.digest_keys() if index.facts is not None else None, max_distance)
    if groups.oversized:
        print(groups.oversized_note([p for p, _ in samples], DEFAULT_MAX_GROUP))
    show = lambda t: (f"  {t[2]:>2} bits  {samples[t[0]][0]} [{index.classes[samples[t[0]][1]]}]  ~  "
                      f"{samples[t[1]][0]} [{index.classes[samples[t[1]][1]]}]")
    for t in (across + [t for t in pairs if t not in across])[:30]:
        print(show(t))
    if len(pairs) > 30:
        print(f"  ... and {len(pairs) - 30} more pair(s)")
    leaks = 0
    for name, val in validation_sets(split) if split else []:
        split_pairs = [t for t in pairs if (samples[t[0]][0] in val) != (samples[t[1]][0] in val)]
        leaks += len(split_pairs)
        print(f"{name}: {len(split_pairs)} near-duplicate pair(s) with one photo in validation and one in training"
              + (" (they inflate its validation numbers)" if split_pairs else ""))
        for t in split_pairs[:10]:
            print(show(t))
    return leaks


def _check(path, *, stats: bool, duplicates: int | None = None, split=None, index_file=None) -> int:
    index = scan_dataset(path, verify=True, allow_empty=True, index_file=index_file)
    counts = index.counts()
    total = sum(counts.values())
    width = max(len("class"), *(len(c) for c in counts))
    print(f"{index.root}: {len(index.classes)} classes, {total} readable photos, {len(index.bad)} unreadable")
    print(f"  {'class':<{width}}  {'photos':>7}  {'share':>6}")
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>7}  {100 * n / max(total, 1):>5.1f}%")
    print(f"  {'total':<{width}}  {total:>7}")
    nonzero = [n for n in counts.values() if n]
    if nonzero:
        print(f"smallest/largest class: {min(nonzero)}/{max(nonzero)} photos")
    if index.bad:
        print(f"unreadable files ({len(index.bad)}), excluded from training:")
        for p, reason in index.bad:
            print(f"  {p}: {reason}")
    if index.empty:
        print(f"classes without readable photos: {', '.join(index.empty)}")
    _report_identical(index)
    leaks = _report_near_duplicates(index, duplicates, split) if duplicates is not None else 0
    if stats and index.samples:
        mean, std = channel_stats([p for p, _ in index.samples])
        print(f"RGB mean {[round(m, 4) for m in mean]}  std {[round(s, 4) for s in std]}  (0..1 scale, 64x64 per photo)")
    return 1 if index.bad or index.empty or leaks else 0
