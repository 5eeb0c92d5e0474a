"""Image-size rules shared by the configuration and the transforms (a leaf: imports nothing of MineralNet).

config.py needs the default evaluation resize without importing the data pipeline; data/transforms.py
applies it.
"""
from __future__ import annotations

CENTRE_CROP_FRACTION = 0.875  # the evaluation centre crop keeps this fraction of the resized shorter side


def eval_resize(image_size: int) -> int:
    """Default shorter-side resize before the evaluation centre crop: round(image_size / 0.875)."""
    return round(image_size / CENTRE_CROP_FRACTION)
