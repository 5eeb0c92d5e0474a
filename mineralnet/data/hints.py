"""Advice for a --data folder that is not what the model expects (kept apart from scanning)."""
from __future__ import annotations

from pathlib import Path

from mineralnet.errors import MineralNetError


def _subdirs(p: Path) -> list[str]:
    return sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_class_root(data, classes: list[str]) -> None:
    """Raise a MineralNetError naming the right folder when `data` sits one level above a folder whose
    sub-folders are the model's classes (e.g. the demo's cache folder instead of its demo-v1-... folder).
    Does nothing in every other case (a CSV, a missing path, a folder of the right shape)."""
    root = Path(data)
    if not root.is_dir():
        return
    top = _subdirs(root)
    if not top or set(top) <= set(classes):
        return
    known = set(classes)
    nested = [d for d in top if (inner := _subdirs(root / d)) and set(inner) <= known]
    if nested:
        raise MineralNetError(
            f"{str(root)!r} holds the class folders one level down, in {str(root / nested[0])!r} (its sub-folders "
            f"are the model's classes); pass --data {root / nested[0]}")
