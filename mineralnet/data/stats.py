"""Per-channel RGB statistics of a photo collection (the dataset mean/std used to normalise)."""
from __future__ import annotations

import math
import os
import random
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from mineralnet.data.decode import load_image
from mineralnet.errors import MineralNetError


def channel_stats(paths, *, size: int = 64, max_images: int | None = None,
                  seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel RGB mean and std (0..1 scale) over all pixels of the given photos.

    Each photo is decoded with ``load_image(p, min_size=size)`` and resized to size x size
    (INTER_AREA), so every photo weighs the same whatever its resolution. The sums are exact
    integers, so the result equals numpy's mean/std (population) over the stacked pixels.

    Args:
        max_images: use a deterministic random subset (by `seed`) of at most this many photos.

    Returns:
        (mean, std), each [R, G, B].
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise MineralNetError("no photos to compute the channel mean/std from; check the data folder")
    if max_images is not None and len(paths) > max_images:
        keep = sorted(random.Random(seed).sample(range(len(paths)), max_images))
        paths = [paths[i] for i in keep]

    def sums(p):
        small = cv2.resize(load_image(p, min_size=size), (size, size), interpolation=cv2.INTER_AREA)
        v = small.reshape(-1, 3).astype(np.int64)
        return v.sum(0), (v * v).sum(0)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(sums, paths))
    n = len(paths) * size * size
    s = [int(sum(p[0][c] for p in parts)) for c in range(3)]
    ss = [int(sum(p[1][c] for p in parts)) for c in range(3)]
    mean = [s[c] / (n * 255) for c in range(3)]
    std = [math.sqrt(n * ss[c] - s[c] * s[c]) / (n * 255) for c in range(3)]  # exact variance numerator
    return mean, std
