"""Splitting a collection: stratified K folds or a hold-out fraction, and a versioned split file.

    stratified_kfold(labels, folds) / stratified_split(labels, val_fraction) -> indices
    save_splits(path, index, splits) / load_splits(path)  ("mineralnet-splits/1")
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np

from mineralnet.data.scan import DatasetIndex
from mineralnet.errors import MineralNetError


def _groups(labels) -> dict:
    groups: dict = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return dict(sorted(groups.items(), key=lambda kv: str(kv[0]) if not isinstance(kv[0], int) else kv[0]))


def _class_name(label, classes) -> str:
    return str(classes[label]) if classes is not None and isinstance(label, int) else str(label)


def _class_units(labels, groups) -> dict:
    """label -> the units a split moves as a whole, in index order: single photos, or with `groups`
    (one group id per sample) the groups, each filed under the class of its first photo."""
    if groups is None:
        return {lab: [[i] for i in ix] for lab, ix in _groups(labels).items()}
    if len(groups) != len(labels):
        raise MineralNetError(f"{len(groups)} group ids for {len(labels)} photos; give one group id per photo")
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    units = {lab: [] for lab in _groups(labels)}
    for ix in sorted(members.values()):
        units[labels[ix[0]]].append(ix)
    return {lab: u for lab, u in units.items() if u}


def small_classes(labels, folds: int) -> dict:
    """{label: photos} of the classes with fewer photos than `folds` (validated in only that many folds)."""
    return {lab: len(ix) for lab, ix in _groups(labels).items() if len(ix) < folds}


def stratified_kfold(labels, folds: int, seed: int = 0, *, classes: list[str] | None = None,
                     groups=None) -> list[list[int]]:
    """`folds` lists of validation indices: disjoint, covering every index, each class spread
    so that its per-fold counts differ by at most 1 (fold sizes too). Deterministic for a seed.
    A class with fewer photos than folds (at least 2) is validated in only as many folds as it has
    photos; a class with one photo is refused (it could never be both trained and validated).

    Args:
        labels: one label per sample (ints or names).
        classes: class names for integer labels, used in error messages.
        groups: one group id per sample (e.g. near-duplicates, `duplicate_groups`): a group's photos
            always share a fold. Without groups (or all groups single) the folds are the same.
    """
    if int(folds) < 2:
        raise MineralNetError(f"folds={folds}: cross-validation needs at least 2 folds")
    if int(folds) > len(labels):
        raise MineralNetError(f"{folds} folds are more than the {len(labels)} photos (a fold would validate on none); "
                              f"use at most {len(labels)} folds")
    single = [lab for lab, ix in _groups(labels).items() if len(ix) < 2]
    if single:
        raise MineralNetError(
            f"class {_class_name(single[0], classes)!r} has only 1 photo: it can never be both trained and "
            f"validated; add photos of it, or leave such classes out (`mineralnet cv --drop-rare 2`)")
    rng = random.Random(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    start = 0  # continue the round-robin across classes so fold sizes stay within 1 as well
    for units in _class_units(labels, groups).values():
        units = list(units)
        rng.shuffle(units)
        pos = start
        for unit in units:
            out[pos % folds] += unit
            pos += len(unit)
        start = pos % folds
    return [sorted(f) for f in out]


def stratified_split(labels, val_fraction: float, seed: int = 0, *, groups=None) -> tuple[list[int], list[int]]:
    """(train indices, val indices): round(n * val_fraction) of each class to val, but at least
    one (and at most n - 1) for a class with >= 2 photos. Deterministic for a seed. With `groups`
    (one id per sample) a group's photos go to the same side (a class may then get more)."""
    if not 0 < val_fraction < 1:
        raise MineralNetError(f"validation fraction {val_fraction} must be between 0 and 1 (e.g. 0.2)")
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    for units in _class_units(labels, groups).values():
        units = list(units)
        rng.shuffle(units)
        n = sum(len(u) for u in units)
        k = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
        taken = 0
        for unit in units:
            if taken < k:
                val += unit
                taken += len(unit)
            else:
                train += unit
    return sorted(train), sorted(val)


# Version 2 adds "info" (how the split was made). Version 1 files (no "info") and the unversioned
# split.json of training runs before it are still read; any other version is refused with one line.
SPLITS_FORMAT = "mineralnet-splits/2"
_READABLE = ("mineralnet-splits/1", SPLITS_FORMAT)


def save_splits(path, index: DatasetIndex, splits: dict, info: dict | None = None) -> None:
    """Write splits as JSON: class names and, per split, [path relative to the collection, class name]
    pairs (absolute for photos outside it, e.g. a separate --val-data folder). Atomic.

    Args:
        splits: name -> indices into ``index.samples`` or (path, label) samples.
        info: how the split was made (kind, folds, fold, seed, ...), kept as is.
    """
    base = os.path.abspath(index.base)
    out = {}
    for name, items in splits.items():
        rows = []
        for item in items:
            p, label = index.samples[item] if isinstance(item, (int, np.integer)) else item
            rel = os.path.relpath(os.path.abspath(p), base)
            rows.append([Path(p if rel.startswith("..") else rel).as_posix(), index.classes[int(label)]])
        out[str(name)] = rows
    doc = {"format": SPLITS_FORMAT, "root": str(Path(index.root).resolve()), "classes": list(index.classes),
           "info": dict(info or {}), "splits": out}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def _legacy_doc(doc: dict) -> dict:
    """The unversioned split.json of older training runs -> the current layout. Its paths are relative
    to the collection (or absolute); labels come from the class folder a photo sits in."""
    classes = list(doc.get("classes", []))
    rows = {name: [[p, Path(p).parent.name] for p in doc.get(name, [])] for name in ("train", "val")}
    info = {k: v for k, v in doc.items() if k not in ("root", "classes", "train", "val")}
    return {"format": SPLITS_FORMAT, "root": doc.get("root", "."), "classes": classes, "info": info, "splits": rows}


def load_splits(path, root=None, *, check_files: bool = True) -> dict:
    """Read a `save_splits` file. Returns {"root", "classes", "info", "splits": name -> [(absolute path,
    label)]} with paths resolved against `root` (default: the root saved in the file; pass the
    new location of a moved collection). With `check_files`, a listed photo that is missing is an error.
    A label the file's classes do not know (old files) is -1."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MineralNetError(f"cannot read splits file {path}: {e}; pass a file written by save_splits") from None
    if isinstance(doc, dict) and "format" not in doc and "val" in doc:
        doc = _legacy_doc(doc)
    if not isinstance(doc, dict) or doc.get("format") not in _READABLE:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise MineralNetError(f"{path} is not a MineralNet splits file this version reads (format {found!r}, "
                              f"expected {SPLITS_FORMAT}); it was written by another version: start a new run")
    saved = Path(doc["root"])
    base = Path(root) if root is not None else (saved.parent if saved.suffix.lower() == ".csv" else saved)
    if base.suffix.lower() == ".csv":
        base = base.parent
    classes = list(doc["classes"])
    lookup = {c: i for i, c in enumerate(classes)}
    splits = {}
    for name, rows in doc["splits"].items():
        items = []
        for rel, cls in rows:
            full = base / rel
            if check_files and not full.is_file():
                raise MineralNetError(f"{path}: split {name!r} lists {full}, which does not exist; pass root= "
                                      f"the collection's current folder")
            items.append((os.path.abspath(full), lookup.get(cls, -1)))
        splits[name] = items
    return {"root": str(base), "classes": classes, "info": dict(doc.get("info", {})), "splits": splits}
