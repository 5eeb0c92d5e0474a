"""Near-duplicate photos: a perceptual hash per photo, pairs within a distance, groups for splitting.

    photo_hash(img)                         -> (128,) bool: dHash (64 bits) + pHash (64 bits) of the grey photo
    hash_photos(paths)                      -> (N, 128) bool, decoded in threads
    near_duplicate_pairs(hashes, max_dist)  -> [(i, j, distance)] with i < j (exact, or banded above 8,000)
    group_duplicates(hashes, digests)       -> DuplicateGroups: id per photo, giant groups dissolved
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

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mineralnet.data.decode import load_image

HASH_BITS = 128
# JPEGs are decoded at reduced scale for the hash (libjpeg DCT scaling), shorter side at least this
HASH_DECODE_SIDE = 64
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
    return photo_hash(load_image(path, min_size=HASH_DECODE_SIDE))


def hash_photos(paths) -> np.ndarray:
    """(N, 128) bool hashes of the photos at `paths` (decoded in threads)."""
    paths = list(paths)
    if not paths:
        return np.zeros((0, HASH_BITS), dtype=bool)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(_hash_file, paths, chunksize=16)))


# Below this many photos every pair is compared (exact); above it, candidate pairs come from banding.
EXACT_MAX_PHOTOS = 8000
# Banding (bit-sampling LSH): TABLES keys of BAND_BITS randomly chosen hash bits; photos whose key agrees in
# at least one table, and that sit within WINDOW places of each other in that table's sorted order, are
# compared exactly. A pair at d bits shares a table's key with probability ~(1 - d/128)^16: 0.07 at d = 20,
# 0.12 at 16, 0.29 at 10, so 48 tables find ~96% of the pairs at 20 bits, 99.8% at 16 and all closer ones
# (bench/data_scale.py measures it). Cost: 48 sorts and at most 48 * WINDOW comparisons per photo.
BAND_BITS, TABLES, WINDOW = 16, 48, 24


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE, *,
                         exact: bool | None = None, seed: int = 0) -> list[tuple[int, int, int]]:
    """[(i, j, Hamming distance)] with i < j for the pairs whose hashes differ in at most `max_distance` bits.

    Exact (every pair) for up to EXACT_MAX_PHOTOS photos or with exact=True; beyond that the candidate
    pairs come from banding (see TABLES), which costs O(N log N) and finds nearly all pairs. The list can be
    long for look-alike photos; `group_duplicates` needs only the groups and never holds it."""
    rows = [np.stack(e, axis=1) for e in edge_blocks(hashes, max_distance, exact=exact, seed=seed)]
    rows = [r for r in rows if len(r)]
    if not rows:
        return []
    return [(int(i), int(j), int(d)) for i, j, d in np.unique(np.concatenate(rows), axis=0)]


def edge_blocks(hashes, max_distance: int = DEFAULT_MAX_DISTANCE, *, exact: bool | None = None, seed: int = 0):
    """Yield (i, j, distance) int64 arrays with i < j of near-duplicate pairs, a block at a time (banding may
    yield a pair more than once)."""
    words = _words(hashes)
    if exact if exact is not None else len(words) <= EXACT_MAX_PHOTOS:
        yield from _all_pairs(words, max_distance)
    else:
        yield from _banded_pairs(words, max_distance, seed)


def _words(hashes) -> np.ndarray:
    h = np.asarray(hashes)
    if h.ndim != 2 or not len(h):
        return np.zeros((0, 2), np.uint64)
    packed = h if h.dtype == np.uint8 and h.shape[1:] == (16,) else np.packbits(h.astype(bool), axis=1)
    return np.ascontiguousarray(packed).view(np.uint64).reshape(len(packed), 2)  # (N, 2)


def _all_pairs(words: np.ndarray, max_distance: int, block: int = 512):
    for start in range(0, len(words), block):
        rows = words[start:start + block]
        dist = np.bitwise_count(rows[:, None, :] ^ words[None, :, :]).sum(axis=2)  # (b, N)
        ii, jj = np.nonzero(dist <= max_distance)
        keep = jj > ii + start
        ii, jj = ii[keep], jj[keep]
        yield ii.astype(np.int64) + start, jj.astype(np.int64), dist[ii, jj].astype(np.int64)


def _banded_pairs(words: np.ndarray, max_distance: int, seed: int):
    n = len(words)
    bits = np.unpackbits(words.view(np.uint8).reshape(n, 16), axis=1)  # (N, 128) uint8
    rng = np.random.default_rng(seed)
    weights = (1 << np.arange(BAND_BITS, dtype=np.uint64))
    for _ in range(TABLES):
        pick = rng.choice(128, BAND_BITS, replace=False)
        key = (bits[:, pick].astype(np.uint64) * weights).sum(axis=1)  # (N,)
        order = np.lexsort((words[:, 1], words[:, 0], key))  # by key, then by the whole hash
        k = key[order]
        for off in range(1, min(WINDOW, n - 1) + 1):
            same = np.nonzero(k[:-off] == k[off:])[0]
            if not len(same):
                break  # no bucket is larger than `off`
            a, b = order[same], order[same + off]
            d = np.bitwise_count(words[a] ^ words[b]).sum(axis=1)
            near = d <= max_distance
            a, b = a[near], b[near]
            yield np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64), d[near].astype(np.int64)


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


# A near-duplicate group larger than this is look-alike photos chained by false matches, not copies of one
# photo: it is not kept on one side of a split (its byte-identical copies still are). --max-duplicate-group.
DEFAULT_MAX_GROUP = 50
# False matches per pair of different minet7 photos (all 1.37 M pairs, by eye; docs/RESULTS.md), by threshold.
FALSE_MATCH_RATE = {10: 0.0, 16: 2.2e-6, 20: 5.1e-6}


@dataclass
class DuplicateGroups:
    ids: list            # group id per photo (the smallest index of its group)
    merged: int          # groups of 2 or more photos that a split keeps together
    pairs: int           # near-duplicate pairs found
    oversized: list      # [[indices]] of the groups above the bound, not kept together

    def oversized_note(self, paths, max_group: int) -> str:
        """One line on the dissolved groups, naming their size and a few members."""
        if not self.oversized:
            return ""
        big = max(self.oversized, key=len)
        sample = ", ".join(str(paths[i]) for i in big[:3])
        return (f"{len(self.oversized)} near-duplicate group(s) larger than {max_group} photos were not kept on one "
                f"side of the split (largest: {len(big)} photos, e.g. {sample}): look-alike photos chained by "
                f"hash matches rather than copies; --max-duplicate-group {len(big)} keeps such groups together")


def false_partner_note(n: int, max_distance: int) -> str:
    """The expected number of false near-duplicate partners per photo in a collection of n photos."""
    measured = [d for d in sorted(FALSE_MATCH_RATE) if d >= max_distance]
    if not measured:
        return f"the false-match rate at {max_distance} bits was not measured (docs/RESULTS.md has <= 20)"
    rate = FALSE_MATCH_RATE[measured[0]]
    return (f"false-match rate {rate:.1e} per pair (measured on minet7 at <= {measured[0]} bits): about "
            f"{rate * max(n - 1, 0):.2g} false partner(s) per photo among {n}")


def _components(n: int, blocks) -> tuple[np.ndarray, int]:
    """(group id per item: the smallest index of its connected component, distinct pairs seen) from blocks
    of (i, j, ...) edge arrays, merged a block at a time so memory stays O(N + block)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    comp = np.arange(n, dtype=np.int64)
    pairs, pending, size = 0, [], 0

    def merge(edges):
        nonlocal comp
        a, b = np.concatenate([e[0] for e in edges]), np.concatenate([e[1] for e in edges])
        ca, cb = comp[a], comp[b]
        keep = ca != cb
        graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (ca[keep], cb[keep])), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        first = np.full(labels.max() + 1, n, np.int64)
        np.minimum.at(first, labels, np.arange(n))
        comp = first[labels][comp]

    for block in blocks:
        i, j = block[0], block[1]
        pairs += len(i)
        pending.append((i, j))
        size += len(i)
        if size > 2_000_000:
            merge(pending)
            pending, size = [], 0
    if pending and size:
        merge(pending)
    return comp, pairs


def group_duplicates(hashes, digests=None, max_distance: int = DEFAULT_MAX_DISTANCE,
                     max_group: int = DEFAULT_MAX_GROUP) -> DuplicateGroups:
    """Near-duplicate groups (connected components of the pairs) of N photos from their hashes ((N, 128)
    bool or (N, 16) packed); `digests` (one content key per photo) join byte-identical files as well. A group
    larger than `max_group` is dissolved into its byte-identical subsets. `pairs` counts the pairs found
    (banding may count a pair twice)."""
    n = len(hashes)
    same = []
    if digests is not None:
        first: dict = {}
        for i, key in enumerate(digests):
            if key in first:
                same.append((first[key], i))
            else:
                first[key] = i
    copies = [(np.array([a for a, _ in same], np.int64), np.array([b for _, b in same], np.int64))] if same else []
    if not n:
        return DuplicateGroups([], 0, 0, [])
    ids, pairs = _components(n, itertools.chain(copies, edge_blocks(hashes, max_distance)))
    sizes = np.bincount(ids, minlength=n) if n else np.zeros(0, int)
    big = np.nonzero(sizes > max_group)[0]
    oversized = []
    if len(big):
        members = np.isin(ids, big)
        order = np.argsort(ids[members], kind="stable")
        idx = np.nonzero(members)[0][order]
        oversized = [g.tolist() for g in np.split(idx, np.nonzero(np.diff(ids[idx]))[0] + 1)]
        dissolved = _components(n, copies)[0]
        ids = np.where(members, dissolved, ids)
        sizes = np.bincount(ids, minlength=n)
    return DuplicateGroups(ids.tolist(), int((sizes > 1).sum()), int(pairs), oversized)


def duplicate_groups(samples, max_distance: int = DEFAULT_MAX_DISTANCE, *, hashes=None,
                     max_group: int = DEFAULT_MAX_GROUP) -> tuple[list[int], int]:
    """(group id per sample, number of groups with 2 or more photos) for [(path, label)] samples:
    near-duplicates share a group, so a split can keep them together. `hashes` (from the collection index)
    saves decoding the photos again."""
    if hashes is None:
        hashes = hash_photos([p for p, _ in samples])
    groups = group_duplicates(hashes, None, max_distance, max_group)
    return groups.ids, groups.merged


def collection_groups(index, max_distance: int = DEFAULT_MAX_DISTANCE,
                      max_group: int = DEFAULT_MAX_GROUP) -> DuplicateGroups:
    """`group_duplicates` of a scanned collection (`DatasetIndex`): its index facts when the scan verified
    the photos (no photo is read again), else the photos hashed now."""
    facts = getattr(index, "facts", None)
    if facts is None:
        return group_duplicates(hash_photos([p for p, _ in index.samples]), None, max_distance, max_group)
    return group_duplicates(facts.phash, facts.digest_keys(), max_distance, max_group)
