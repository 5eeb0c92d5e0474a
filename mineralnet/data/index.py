"""The collection index: what every photo of a collection is, read once and kept between runs.

    refresh_index(root, files, index_file=None, exchange=None) -> PhotoFacts, one row per file
    default_index_path(root)                                    -> $MINERALNET_CACHE/index/<name>-<key>.npz
    load_index(path) / save_index(path, root, facts)            (atomic; "mineralnet-index/1")

Per photo: its path relative to the collection, size and modification time (how a change is noticed),
class, image size, content digest (the first 16 bytes of its SHA-256), perceptual hash (128 bits,
duplicates.py) and why it cannot be read (empty when it can). Each file is read once and, when it is a
JPEG, decoded at reduced scale (the hash needs 32x32 pixels), so indexing costs a fraction of a training
epoch; a later scan re-reads only the files that are new or whose size or mtime changed.

The file is a numpy .npz without pickles: strings travel as one UTF-8 blob plus offsets, so a
million-photo index loads in well under a second. Under DDP the files to read are shared out over the
ranks (`exchange`), gathered, and the merged index is the main rank's, sent to every rank.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mineralnet.data.decode import ImageDecodeError, _jpeg_header, decode_photo, read_photo_bytes
from mineralnet.data.duplicates import HASH_DECODE_SIDE, photo_hash
from mineralnet.errors import MineralNetError

INDEX_FORMAT = "mineralnet-index/1"
_ZERO16 = bytes(16)


@dataclass
class PhotoFacts:
    """Column-wise facts of N photos (row i describes file i)."""

    rel: list          # path relative to the collection root (POSIX)
    label: list        # class name
    size: np.ndarray   # (N,) int64 bytes
    mtime: np.ndarray  # (N,) int64 ns
    width: np.ndarray  # (N,) int32, 0 when unreadable
    height: np.ndarray
    digest: np.ndarray  # (N, 16) uint8: SHA-256 of the file, first 16 bytes
    phash: np.ndarray   # (N, 16) uint8: the 128-bit perceptual hash, packed
    reason: list       # "" when readable, else why not

    def __len__(self) -> int:
        return len(self.rel)

    def take(self, idx) -> PhotoFacts:
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        return PhotoFacts(pick(self.rel), pick(self.label), self.size[idx], self.mtime[idx], self.width[idx],
                          self.height[idx], self.digest[idx], self.phash[idx], pick(self.reason))

    def hashes(self) -> np.ndarray:
        """(N, 128) bool perceptual hashes."""
        return np.unpackbits(self.phash, axis=1).astype(bool)

    def digest_keys(self) -> list:
        """One hashable content key per photo (equal for byte-identical files)."""
        return [bytes(row) for row in self.digest]

    @staticmethod
    def empty() -> PhotoFacts:
        z = np.zeros(0, np.int64)
        return PhotoFacts([], [], z, z, z.astype(np.int32), z.astype(np.int32), np.zeros((0, 16), np.uint8),
                          np.zeros((0, 16), np.uint8), [])


def cache_root() -> Path:
    """$MINERALNET_CACHE, or ~/.cache/mineralnet."""
    return Path(os.environ.get("MINERALNET_CACHE") or Path.home() / ".cache" / "mineralnet")


def default_index_path(root) -> Path:
    """Where the index of the collection at `root` (folder or CSV) lives when no --index is given."""
    root = os.path.abspath(os.fspath(root))
    key = hashlib.sha1(root.encode()).hexdigest()[:12]
    return cache_root() / "index" / f"{Path(root).name or 'photos'}-{key}.npz"


# ---- reading one photo ----------------------------------------------------------------------------------

def index_photo(path: str):
    """(digest 16 bytes, packed hash 16 bytes, width, height, reason) of one file, reading it once."""
    try:
        data = read_photo_bytes(path)
    except ImageDecodeError as e:
        return _ZERO16, _ZERO16, 0, 0, e.reason
    digest = hashlib.sha256(data).digest()[:16]
    try:
        img = decode_photo(path, data, min_size=HASH_DECODE_SIDE)
    except ImageDecodeError as e:
        return digest, _ZERO16, 0, 0, e.reason
    h, w = img.shape[:2]
    head = _jpeg_header(data) if data[:3] == b"\xff\xd8\xff" else None
    if head is not None:  # decoded at reduced scale: the header has the full size (before EXIF rotation)
        fw, fh = head[0], head[1]
        w, h = (fw, fh) if (fw >= fh) == (w >= h) else (fh, fw)
    return digest, np.packbits(photo_hash(img)).tobytes(), int(w), int(h), ""


def _index_files(paths: list, progress: bool, threads: int | None = None) -> list:
    """index_photo over `paths` in threads (decoders and SHA-256 release the GIL), in order."""
    if not paths:
        return []
    threads = threads or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        it = pool.map(index_photo, paths, chunksize=8)
        if progress and len(paths) >= 200:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(paths), desc="indexing photos", unit="photo", leave=False)
        return list(it)


def _stat(paths: list):
    size = np.zeros(len(paths), np.int64)
    mtime = np.zeros(len(paths), np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            size[i] = mtime[i] = -1  # vanished since the listing: indexed as unreadable
            continue
        size[i], mtime[i] = st.st_size, st.st_mtime_ns
    return size, mtime


# ---- the file --------------------------------------------------------------------------------------------

def _blob(strings: list) -> tuple[np.ndarray, np.ndarray]:
    enc = [s.encode("utf-8", "surrogateescape") for s in strings]
    offsets = np.zeros(len(enc) + 1, np.int64)
    np.cumsum([len(b) for b in enc], out=offsets[1:])
    return np.frombuffer(b"".join(enc), np.uint8), offsets


def _unblob(data: np.ndarray, offsets: np.ndarray) -> list:
    raw = data.tobytes()
    return [raw[offsets[i]:offsets[i + 1]].decode("utf-8", "surrogateescape") for i in range(len(offsets) - 1)]


def save_index(path, root: str, facts: PhotoFacts) -> None:
    """Write atomically: a crash or a full disk leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"format": np.array(INDEX_FORMAT), "root": np.array(str(root)), "size": facts.size,
              "mtime": facts.mtime, "width": facts.width, "height": facts.height, "digest": facts.digest,
              "phash": facts.phash}
    for name in ("rel", "label", "reason"):
        arrays[f"{name}_data"], arrays[f"{name}_offsets"] = _blob(getattr(facts, name))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_index(path, root: str | None = None) -> PhotoFacts:
    """Read an index file. Raises MineralNetError naming the file for one written by another version, for
    another collection (when `root` is given) or unreadable (partly written, not an index)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt = str(z["format"]) if "format" in z.files else None
            if fmt != INDEX_FORMAT:
                raise MineralNetError(f"{path} is a collection index of format {fmt!r}, not {INDEX_FORMAT} (another "
                                      f"MineralNet version); delete it and it is rebuilt")
            if root is not None and str(z["root"]) != str(root):
                raise MineralNetError(f"{path} indexes {str(z['root'])!r}, not {root!r}; pass another --index file "
                                      f"(or delete this one)")
            strings = {n: _unblob(z[f"{n}_data"], z[f"{n}_offsets"]) for n in ("rel", "label", "reason")}
            return PhotoFacts(strings["rel"], strings["label"], z["size"], z["mtime"], z["width"], z["height"],
                              z["digest"], z["phash"], strings["reason"])
    except MineralNetError:
        raise
    except Exception as e:  # zipfile.BadZipFile, KeyError, ValueError, OSError: partly written or not ours
        raise MineralNetError(f"cannot read the collection index {path} ({type(e).__name__}: {e}); delete it and it "
                              f"is rebuilt") from None


# ---- refreshing ------------------------------------------------------------------------------------------

def listing_digest(rel: list, label: list, size: np.ndarray) -> str:
    """What every rank must agree on: the same files, classes and sizes (mtimes may differ between copies)."""
    h = hashlib.sha256()
    for r, c, s in zip(rel, label, size.tolist()):
        h.update(f"{r}\t{c}\t{s}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _check_ranks_agree(rel, label, size, exchange, where: str) -> None:
    """All ranks see the same file list, or every rank stops with the same line naming a difference."""
    digests = exchange.gather([listing_digest(rel, label, size)])
    if len(set(digests)) == 1:
        return
    lists = exchange.gather([sorted(zip(rel, label, size.tolist()))])
    first = set(map(tuple, lists[0]))
    for rank, other in enumerate(lists[1:], 1):
        diff = set(map(tuple, other)) ^ first
        if diff:
            row = sorted(diff)[0]
            side = 0 if tuple(row) in first else rank
            raise MineralNetError(
                f"the ranks see different photos under {where}: rank 0 has {len(lists[0])}, rank {rank} has "
                f"{len(other)}; e.g. {row[0]} [{row[1]}, {row[2]} bytes] is seen only by rank {side}; give every "
                f"machine the same copy of the collection")


def refresh_index(root, files: list, *, index_file=None, exchange=None, progress: bool = True) -> PhotoFacts:
    """The facts of `files` [(absolute path, class name)] under `root` (folder, or the CSV manifest), in
    that order: read from the index file where size and mtime are unchanged, otherwise read now, and the
    index file rewritten when anything changed. Under DDP (`exchange`) the ranks check that they see the
    same files, share the reading, and all return the main rank's result."""
    root_key = os.path.abspath(os.fspath(root))
    base = os.path.dirname(root_key) if root_key.lower().endswith(".csv") else root_key
    paths = [p for p, _ in files]
    rel = [Path(os.path.relpath(p, base)).as_posix() for p in paths]
    label = [c for _, c in files]
    size, mtime = _stat(paths)
    rank, world = (exchange.rank, exchange.world) if exchange is not None else (0, 1)
    if world > 1:
        _check_ranks_agree(rel, label, size, exchange, root_key)
    explicit = index_file is not None
    index_path = Path(index_file) if explicit else default_index_path(root_key)
    old, reuse, stale = None, None, list(range(len(paths)))
    if rank == 0:
        old = _load_old(index_path, root_key, explicit)
        reuse, stale = _match(old, rel, size, mtime)
    if world > 1:
        stale = exchange.broadcast(stale)
    mine = stale[rank::world]
    got = _index_files([paths[i] for i in mine], progress=progress and rank == 0,
                       threads=max(1, (os.cpu_count() or 1) // _local_world(world)))
    if world > 1:
        got = exchange.gather(got)
        mine = [i for r in range(world) for i in stale[r::world]]
    facts = None
    if rank == 0:
        facts = _merge(rel, label, size, mtime, old, reuse, dict(zip(mine, got)))
        if stale or old is None or len(old) != len(rel):
            _try_save(index_path, root_key, facts)
    return exchange.broadcast(facts) if world > 1 else facts


def _local_world(world: int) -> int:
    return max(1, min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world))))


def _load_old(index_path: Path, root_key: str, explicit: bool) -> PhotoFacts | None:
    if not index_path.is_file():
        return None
    try:
        return load_index(index_path, root_key)
    except MineralNetError as e:
        if explicit and "indexes" in str(e):  # another collection's index: never overwrite it
            raise
        warnings.warn(f"{e}: rebuilding it", stacklevel=3)
        return None


def _match(old: PhotoFacts | None, rel, size, mtime):
    """(row of `old` per file or -1, positions to read now)."""
    reuse = np.full(len(rel), -1, np.int64)
    if old is not None and len(old):
        where = {r: i for i, r in enumerate(old.rel)}
        for i, r in enumerate(rel):
            j = where.get(r)
            if j is not None and old.size[j] == size[i] and old.mtime[j] == mtime[i] and size[i] >= 0:
                reuse[i] = j
    return reuse, [int(i) for i in np.nonzero(reuse < 0)[0]]


def _merge(rel, label, size, mtime, old, reuse, fresh: dict) -> PhotoFacts:
    n = len(rel)
    width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
    digest, phash = np.zeros((n, 16), np.uint8), np.zeros((n, 16), np.uint8)
    reason = [""] * n
    if old is not None and len(old) and (reuse >= 0).any():
        have = np.nonzero(reuse >= 0)[0]
        src = reuse[have]
        width[have], height[have] = old.width[src], old.height[src]
        digest[have], phash[have] = old.digest[src], old.phash[src]
        for i, j in zip(have.tolist(), src.tolist()):
            reason[i] = old.reason[j]
    for i, (dg, ph, w, h, why) in fresh.items():
        digest[i] = np.frombuffer(dg, np.uint8)
        phash[i] = np.frombuffer(ph, np.uint8)
        width[i], height[i], reason[i] = w, h, why
    return PhotoFacts(list(rel), list(label), size, mtime, width, height, digest, phash, reason)


def _try_save(index_path: Path, root_key: str, facts: PhotoFacts) -> None:
    """The index is a cache: a failed write (full disk, read-only folder) costs the next run a re-read, not
    this run, so it is one warning."""
    try:
        save_index(index_path, root_key, facts)
    except OSError as e:
        warnings.warn(f"could not write the collection index {index_path} ({e.strerror or e}); the next run "
                      f"reads the photos again (free space, or pass --index FILE on another disk)", stacklevel=3)
