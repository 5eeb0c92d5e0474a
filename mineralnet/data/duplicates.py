"""Near-duplicate photos: a perceptual hash per photo, pairs within a distance, groups for splitting.

    photo_hash(img)                         -> (128,) bool: dHash (64 bits) + pHash (64 bits) of the grey photo
    hash_photos(paths)                      -> (N, 128) bool, decoded in threads
    near_duplicate_pairs(hashes, max_dist)  -> [(i, j, distance)] with i < j
    duplicate_groups(samples, max_dist)     -> one group id per sample (union-find over the pairs)

dHash (difference hash): the grey photo shrunk to 9x8 (area averaging), one bit per horizontal neighbour
pair (left < right). pHash: the grey photo shrunk to 32x32, its 2-D DCT, one bit per coefficient of the
8x8 lowest frequencies (above the median of those but the DC term). Both ignore colour, size and JPEG
detail; a re-encoded (quality 60), 70%-resized and 5%-cropped copy stays within about 18 of the 128 bits,
while different minet7 photos are 33 or more bits apart in 99.9% of pairs (docs/RESULTS.md). The distance
is the Hamming distance over the 128 bits; `DEFAULT_MAX_DISTANCE` is the threshold of `data check
--duplicates` and of the grouping before splits.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mineralnet.data.decode import load_image

HASH_BITS = 128
DEFAULT_MAX_DISTANCE = 20


def photo_hash(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB (or (H, W) grey) -> (128,) bool perceptual hash."""
    import cv2

    grey = img if img.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    grey = grey.astype(np.float32)
    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA)  # (8, 9)
    dhash = (small[:, 1:] > small[:, :-1]).ravel()
    low = cv2.dct(cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA))[:8, :8].ravel()
    phash = low > np.median(low[1:])
    return np.concatenate([dhash, phash])


def _hash_file(path: str) -> np.ndarray:
    return photo_hash(load_image(path))


def hash_photos(paths) -> np.ndarray:
    """(N, 128) bool hashes of the photos at `paths` (decoded in threads)."""
    paths = list(paths)
    if not paths:
        return np.zeros((0, HASH_BITS), dtype=bool)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(_hash_file, paths, chunksize=16)))


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE,
                         block: int = 512) -> list[tuple[int, int, int]]:
    """[(i, j, Hamming distance)] for every i < j whose hashes differ in at most `max_distance` bits."""
    packed = np.packbits(np.asarray(hashes, dtype=bool), axis=1)  # (N, 16) uint8
    words = np.ascontiguousarray(packed).view(np.uint64)  # (N, 2)
    out = []
    for start in range(0, len(words), block):
        rows = words[start:start + block]
        dist = np.bitwise_count(rows[:, None, :] ^ words[None, :, :]).sum(axis=2)  # (b, N)
        ii, jj = np.nonzero(dist <= max_distance)
        keep = jj > ii + start
        out += [(int(i) + start, int(j), int(dist[i, j])) for i, j in zip(ii[keep], jj[keep])]
    return sorted(out)


def union_find_groups(n: int, pairs) -> list[int]:
    """Group id per item (the smallest index of its connected component) from (i, j, ...) pairs."""
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j, *_ in pairs:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return [root(i) for i in range(n)]


def duplicate_groups(samples, max_distance: int = DEFAULT_MAX_DISTANCE) -> tuple[list[int], int]:
    """(group id per sample, number of groups with 2 or more photos) for [(path, label)] samples:
    near-duplicates (and byte-identical copies) share a group, so a split can keep them together."""
    paths = [p for p, _ in samples]
    groups = union_find_groups(len(paths), near_duplicate_pairs(hash_photos(paths), max_distance))
    sizes = np.bincount(groups, minlength=len(groups)) if groups else np.zeros(0, int)
    return groups, int((sizes > 1).sum())
