"""Scanning a photo collection: a class-folder tree or a CSV manifest -> `DatasetIndex`.

    scan_dataset(DIR or CSV) -> DatasetIndex(classes, samples, bad)
    list_images(DIR)         -> every image file under DIR (the one folder walker)
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mineralnet.data.index import PhotoFacts, refresh_index
from mineralnet.data.hints import check_class_root
from mineralnet.errors import MineralNetError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Photo-like names of formats MineralNet does not decode: reported by scans, never silently skipped.
UNSUPPORTED_EXTENSIONS: tuple[str, ...] = (".heic", ".heif", ".avif", ".eps", ".ps", ".jp2", ".j2k", ".jxl",
                                           ".psd", ".svg", ".ico", ".dng", ".cr2", ".cr3", ".nef", ".arw",
                                           ".orf", ".rw2", ".raw", ".pcx", ".tga")

_LAYOUT_HINT = "expected one sub-folder per mineral (DIR/quartz/*.jpg) or a CSV with columns path,label"


@dataclass
class DatasetIndex:
    """The photos of a collection: class names, (path, label) samples and unreadable files."""

    root: str  # folder or CSV it came from
    classes: list[str]  # sorted class names; index = label
    samples: list[tuple[str, int]]  # (absolute path, label), sorted by (class, path)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), not in samples
    empty: list[str] = field(default_factory=list)  # classes without a single readable photo
    facts: PhotoFacts | None = None  # per sample (same order): digest, hash, size... (scans with verify)

    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
            counts[self.classes[label]] += 1
        return counts

    @property
    def base(self) -> Path:
        """Folder that relative sample paths refer to (the CSV's folder for a manifest)."""
        root = Path(self.root)
        return root.parent if root.suffix.lower() == ".csv" and root.is_file() else root


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder) -> list[str]:
    """Image files (by extension) under `folder`, recursively and in any layout, sorted; hidden
    files and folders are skipped. Paths keep the form of `folder` (``~`` expanded, a relative
    folder gives relative paths); an empty list if `folder` is not a folder."""
    root = os.fspath(Path(os.path.expanduser(os.fspath(folder))))
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if _is_image_name(f)]
    return sorted(found)


def list_unsupported(folder) -> list[tuple[str, str]]:
    """(path, reason) for every file under `folder` whose name says photo in a format that is not read."""
    root = os.fspath(Path(os.path.expanduser(os.fspath(folder))))
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            ext = os.path.splitext(f)[1].lower()
            if not f.startswith(".") and ext in UNSUPPORTED_EXTENSIONS:
                found.append((os.path.abspath(os.path.join(dirpath, f)),
                              f"{ext} photos are not read (JPEG, PNG, WEBP, BMP, TIFF, GIF are); convert it to "
                              f"JPEG or PNG"))
    return sorted(found)


def scan_dataset(path, *, verify: bool = True, classes: list[str] | None = None,
                 allow_empty: bool = False, index_file=None, exchange=None) -> DatasetIndex:
    """Index a class-folder tree or a CSV manifest (header ``path,label``, label = class name).

    Args:
        verify: decode-check every file (in threads); failures go to ``.bad``, not ``.samples``.
        classes: map class names onto this list (evaluating a trained model on other photos);
            a class that is not in it is an error.
        allow_empty: report classes without readable photos in ``.empty`` instead of raising
            (used by ``mineralnet data check``).
        index_file: the collection index to read and update (default: one per collection under
            $MINERALNET_CACHE/index, see `data.index`); only with verify.
        exchange: under DDP, how ranks share the reading (`train.inputs.RankExchange`).
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise MineralNetError(f"data path {p} does not exist; {_LAYOUT_HINT}")
    if p.is_dir():
        from mineralnet.data.shards import shard_source_note

        note = shard_source_note(p)
        if note:
            raise MineralNetError(note)
        names, files, seen = _scan_folder(p, classes)
    elif p.suffix.lower() == ".csv":
        names, files, seen = _scan_csv(p, classes)
    else:
        raise MineralNetError(f"data path {p} is neither a folder nor a .csv manifest; {_LAYOUT_HINT}")
    bad: list[tuple[str, str]] = []
    facts = None
    if verify and files:  # read through the collection index: only new or changed files are decoded
        facts = refresh_index(p, [(f, names[label]) for f, label in files], index_file=index_file,
                              exchange=exchange)
        bad = [(f, r) for (f, _), r in zip(files, facts.reason) if r]
        keep = [i for i, r in enumerate(facts.reason) if not r]
        files, facts = [files[i] for i in keep], facts.take(keep)
    if p.is_dir():
        bad += list_unsupported(p)
    order = sorted(range(len(files)), key=lambda i: (files[i][1], files[i][0]))
    samples = [files[i] for i in order]
    facts = facts.take(order) if facts is not None else None
    present = {names[label] for _, label in samples}
    empty = [c for c in names if c in seen and c not in present]
    if empty and not allow_empty:
        raise MineralNetError(
            f"class(es) without readable photos in {p}: {', '.join(empty)}; add photos or remove the "
            f"class (`mineralnet data check {p}` shows the details)")
    # not resolve(): keep symlinked roots
    return DatasetIndex(os.path.abspath(p), names, samples, bad, empty, facts)


def _class_list(found: Sequence[str], classes: list[str] | None, where: Path) -> list[str]:
    if classes is None:
        return sorted(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        check_class_root(where, classes)  # one level above the class folders: name the right folder
        raise MineralNetError(
            f"{where} has class(es) {', '.join(unknown)} that the model does not know (it knows "
            f"{', '.join(classes)}); remove or rename them")
    return list(classes)


def _scan_folder(root: Path, classes: list[str] | None):
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise MineralNetError(f"no class folders in {root}; {_LAYOUT_HINT}")
    names = _class_list(dirs, classes, root)
    files = [(os.path.abspath(f), names.index(d)) for d in dirs for f in list_images(root / d)]
    return names, files, set(dirs)


def _scan_csv(csv_path: Path, classes: list[str] | None):
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"path", "label"} - set(reader.fieldnames or [])
            if missing:
                raise MineralNetError(
                    f"{csv_path} lacks the column(s) {', '.join(sorted(missing))}; the first line must be "
                    f"a header with at least: path,label")
            rows = [(n, (r["path"] or "").strip(), (r["label"] or "").strip()) for n, r in enumerate(reader, 2)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MineralNetError(f"cannot read the CSV manifest {csv_path}: {e}; save it as UTF-8 text") from None
    if not rows:
        raise MineralNetError(f"{csv_path} lists no photos; add one line per photo: path,label")
    for line, rel, label in rows:
        if not rel or not label:
            raise MineralNetError(f"{csv_path} line {line}: empty path or label; fill in both columns")
        full = base / os.path.expanduser(rel)
        if not full.is_file():
            raise MineralNetError(f"{csv_path} line {line}: file {full} does not exist; fix the path "
                                  f"(relative paths are read from {base})")
    rows = _dedupe_rows(csv_path, rows)
    seen = {label for _, _, label in rows}
    names = _class_list(seen, classes, csv_path)
    files = [(os.path.abspath(base / os.path.expanduser(rel)), names.index(label)) for _, rel, label in rows]
    return names, files, seen


def _dedupe_rows(csv_path: Path, rows):
    """A photo listed twice would land in training and validation at once: keep its first row (reported in
    one line); the same photo under two labels is refused."""
    import warnings

    first: dict[str, tuple[int, str]] = {}
    kept, dropped = [], 0
    for line, rel, label in rows:
        key = os.path.abspath(csv_path.parent / os.path.expanduser(rel))
        if key in first:
            if first[key][1] != label:
                raise MineralNetError(f"{csv_path} line {line}: {rel} is labelled {label!r} but line {first[key][0]} "
                                      f"labels it {first[key][1]!r}; keep one row per photo")
            dropped += 1
            continue
        first[key] = (line, label)
        kept.append((line, rel, label))
    if dropped:
        warnings.warn(f"{csv_path}: {dropped} duplicate row(s) ignored (each photo is used once)", stacklevel=3)
    return kept


def identical_groups(samples, digests=None) -> list[list[tuple[str, int]]]:
    """Groups (2 or more) of byte-identical photos among [(path, label)], by SHA-256 of the file contents
    (`digests`, one key per sample from the collection index, saves reading the files)."""
    by_hash: dict = {}
    for n, (path, label) in enumerate(samples):
        if digests is not None:
            key = digests[n]
        else:
            with open(path, "rb") as f:
                key = hashlib.file_digest(f, "sha256").digest()[:16]
        by_hash.setdefault(key, []).append((path, label))
    return [g for g in by_hash.values() if len(g) > 1]
