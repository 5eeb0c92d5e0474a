"""`mineralnet data check DIR` (counts, unreadable files, optional mean/std) and `mineralnet data demo`."""
from __future__ import annotations


from mineralnet.data.demo import make_demo_dataset
from mineralnet.data.scan import identical_groups, scan_dataset
from mineralnet.data.stats import channel_stats


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="count photos per class and list every unreadable file "
                                         "(exit 1 if any file is unreadable or a class is empty)")
    check.add_argument("path", metavar="DIR", help="class-folder root (DIR/<class>/*.jpg) or CSV manifest (path,label)")
    check.add_argument("--stats", action="store_true", help="also print the RGB mean/std (0..1) used to normalise")
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
    return _check(args.path, stats=args.stats)


def _report_identical(index) -> None:
    """Print byte-identical copies: across classes they are label errors, within a class they count twice
    (and can sit on both sides of a split)."""
    groups = identical_groups(index.samples)
    across = [g for g in groups if len({label for _, label in g}) > 1]
    if not groups:
        return
    print(f"byte-identical photos: {len(groups)} group(s), {len(across)} of them filed under more than one class "
          f"(probable label errors; keep one copy under the right class)")
    for g in sorted(groups, key=lambda g: -len({label for _, label in g}))[:20]:
        print("  " + "  =  ".join(f"{p} [{index.classes[label]}]" for p, label in g))
    if len(groups) > 20:
        print(f"  ... and {len(groups) - 20} more group(s)")


def _check(path, *, stats: bool) -> int:
    index = scan_dataset(path, verify=True, allow_empty=True)
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
    if stats and index.samples:
        mean, std = channel_stats([p for p, _ in index.samples])
        print(f"RGB mean {[round(m, 4) for m in mean]}  std {[round(s, 4) for s in std]}  (0..1 scale, 64x64 per photo)")
    return 1 if index.bad or index.empty else 0
