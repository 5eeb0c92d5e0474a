"""Test-time augmentation: average a model's class probabilities over a few views of each photo.

    --tta flip          the photo and its mirror image (2 views)
    --tta flip,scales   also the photo zoomed out to 0.875x and in to 1.125x (4 views)
    --tta scales        the photo at 1x, 0.875x and 1.125x (3 views)

The views are made on the photo itself (an (H, W, 3) array), before any model's preprocessing, so
one implementation serves every model form and an ensemble whose members use different
resolutions: each view then goes through the model's own resize + centre crop. Zooming in crops
the centre 1/1.125 of the photo; zooming out pads it by reflection to 1/0.875 of its size, which a
model with the usual resize/crop ratio (256/224 = 1/0.875) then sees whole. Only the probabilities
are averaged: novelty, `unknown` and the other scores stay those of the original view, the one
their thresholds were set on; conformal sets (`--coverage`) are calibrated on single views, so they
are refused with TTA.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from mineralnet.errors import MineralNetError

ZOOMS = (0.875, 1.125)
CHOICES = ("flip", "scales")
HELP = ("test-time augmentation: average the probabilities over views of each photo: 'flip' (the photo and its "
        "mirror image), 'scales' (also zoomed to 0.875x and 1.125x) or 'flip,scales' (4 views); 'none' (default) "
        "is one view")


def parse_tta(spec) -> tuple[str, ...] | None:
    """'flip' / 'scales' / 'flip,scales' -> the view names, the original first; None for no TTA."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    if isinstance(spec, (tuple, list)):
        return tuple(spec)
    parts = [p.strip().lower() for p in str(spec).split(",") if p.strip()]
    bad = [p for p in parts if p not in CHOICES]
    if bad or len(set(parts)) != len(parts):
        raise MineralNetError(f"--tta {spec!r}: give 'flip', 'scales', 'flip,scales' or 'none'")
    views = ["original"]
    if "flip" in parts:
        views.append("flip")
    if "scales" in parts:
        views += [f"zoom{z}" for z in ZOOMS]
    return tuple(views)


def as_array(image) -> np.ndarray:
    """A photo (path, (H, W, 3) uint8 array or PIL image) as an (H, W, 3) uint8 RGB array."""
    if isinstance(image, (str, os.PathLike)):
        from mineralnet.data import load_image

        return load_image(image)
    if isinstance(image, np.ndarray):
        return image
    return np.asarray(image.convert("RGB"))


def view(image: np.ndarray, name: str) -> np.ndarray:
    """One view of an (H, W, 3) photo: 'original', 'flip' (left-right) or 'zoom<s>' (s > 1 zooms in)."""
    if name == "original":
        return image
    if name == "flip":
        return np.ascontiguousarray(image[:, ::-1])
    if not name.startswith("zoom"):
        raise MineralNetError(f"unknown test-time view {name!r}; use parse_tta")
    s = float(name[4:])
    h, w = image.shape[:2]
    if s >= 1.0:  # centre crop of 1/s of each side: the content appears s times larger
        ch, cw = max(1, round(h / s)), max(1, round(w / s))
        top, left = (h - ch) // 2, (w - cw) // 2
        return np.ascontiguousarray(image[top:top + ch, left:left + cw])
    ph, pw = round(h / s) - h, round(w / s) - w  # pad to 1/s of each side: the content appears s times smaller
    pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
    return np.pad(image, pad, mode="reflect" if min(h, w) > max(ph, pw) else "edge")


def tta_answers(answer: Callable[[Sequence], dict], images: Sequence, views: Sequence[str]) -> dict:
    """Average `answer`'s probabilities over `views` of each photo.

    Args:
        answer: photos (paths or (H, W, 3) arrays) -> {"probs" (N, C), ...}, e.g. a Predictor's
            single-view answers.
        images: photos (paths, arrays or PIL images).
        views: from `parse_tta`, "original" first.
    Returns:
        the original view's answer with "probs" (and "member_probs" when present) replaced by the
        mean over the views, and "views" (the view names).
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        raise MineralNetError("test-time augmentation works on photos (paths or arrays), not on a preprocessed "
                              "(N, 3, S, S) batch; pass the photos")
    images = list(images)
    first = answer(images)
    if len(views) == 1 or not images:
        return {**first, "views": list(views)}
    arrays = [as_array(im) for im in images]  # decoded once for all the other views
    sums = {k: np.asarray(first[k], np.float64) for k in ("probs", "member_probs") if k in first}
    for name in views[1:]:
        other = answer([view(a, name) for a in arrays])
        for k in sums:
            sums[k] += np.asarray(other[k], np.float64)
    out = dict(first)
    for k, v in sums.items():
        out[k] = (v / len(views)).astype(np.float32)
    out["views"] = list(views)
    return out
