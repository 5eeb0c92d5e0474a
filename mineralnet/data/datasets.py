"""The photo dataset (with an optional RAM cache) and the epoch sampler that training uses.

    PhotoDataset(samples, transform)  -> (float32 CHW tensor, int label) per (path, label) sample
    EpochShuffleSampler(n, seed)      -> a permutation of range(n) per epoch, the same in every process
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mineralnet.data.decode import load_image


class PhotoDataset(Dataset):
    """(float32 CHW tensor, int label) for each (path, label) sample; optional in-RAM cache of decoded photos.

    Augmentation randomness is a pure function of (seed, epoch, index) via `set_epoch` (for
    transforms with ``set_random_seed``). JPEGs are decoded at reduced scale when the transform's
    ``min_decode_size`` allows it (large photos only). A file that fails to decode raises
    ImageDecodeError naming it (scan_dataset(verify=True) should have excluded it).

    Args:
        transform: a `build_transforms` result (fast or albumentations backend), called as
            ``transform(image=img)["image"]``.
        cache_side: decode every photo once, up front, and keep it in RAM: an evaluation
            transform's resized photo (its ``prepare`` step), otherwise the photo with its shorter
            side shrunk to at most `cache_side` pixels. None: decode the file at every access.
        cache_bytes: RAM the cache may take; the photos after the first that do not fit are decoded
            at every access (``cached`` says how many are in RAM). None: no bound.
        size_at: epoch -> training crop size (progressive resizing), applied by `set_epoch`.
    """

    def __init__(self, samples, transform, seed: int = 0, cache_side: int | None = None, size_at=None,
                 cache_bytes: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.size_at = size_at  # epoch -> training crop (progressive resizing), or None
        self.min_size = getattr(transform, "min_decode_size", None)
        self.cache = None
        self.cached = 0
        prepare = getattr(transform, "prepare", None)
        if cache_side and prepare is not None:
            # evaluation: cache the resized photo the transform would crop from, so that validation during
            # training scores exactly what `mineralnet eval RUN --split val` scores from the files
            self._fill_cache(lambda p: prepare(load_image(p, min_size=self.min_size)), cache_bytes)
        elif cache_side:
            self._fill_cache(lambda p: _downscale(load_image(p, min_size=cache_side), cache_side), cache_bytes)

    def _fill_cache(self, decode, budget: int | None) -> None:
        self.cache, used = [], 0
        paths = [p for p, _ in self.samples]
        if len(paths) >= 2000:
            from tqdm.auto import tqdm

            paths = tqdm(paths, desc="caching photos", unit="photo", leave=False)
        for p in paths:
            img = decode(p)
            used += img.nbytes
            if budget is not None and used > budget:
                break
            self.cache.append(img)
        self.cached = len(self.cache)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.size_at is not None:
            self.transform.image_size = self.size_at(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        cached = self.cache is not None and i < len(self.cache)  # a budget may have cached only the first photos
        img = self.cache[i] if cached else load_image(path, min_size=self.min_size)
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(sample_seed(self.seed, self.epoch, i))
        return self.transform(image=img)["image"], int(label)


ImageDataset = PhotoDataset  # the name evaluation code and tests have used


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch`: the same in every process, worker and pipeline."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % 2**32


def _downscale(img: np.ndarray, side: int) -> np.ndarray:
    """Shrink (INTER_AREA) so the shorter side is `side`; smaller photos are returned as they are."""
    h, w = img.shape[:2]
    s = side / min(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


class EpochShuffleSampler(Sampler):
    """A permutation of range(n) that depends only on (seed, epoch): identical in every process."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
