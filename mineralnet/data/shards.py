"""WebDataset shards of a photo collection: written once, streamed by training on any number of ranks.

    write_shards(scan_dataset(PHOTOS), OUT, size=256, shard_size="1000", val_split=0.1, folds=0, seed=0) -> info dict
    read_shard_info(SHARDS or spec)  -> ShardInfo (the _info.json, checked, and where the shards are)
    is_shard_source(data)            -> True for a shard folder, a .tar pattern, a pipe: or URL spec

Layout of OUT (the `webdataset` package writes and reads the tar files):
    train-000000.tar ...   val-000000.tar ...     (with --folds K: fold0-000000.tar ... foldK-1-...)
    _info.json             shard names and sample counts per split (timm's `wds` reader reads the same keys),
                           class names, image size, the source's index digest, the MineralNet version
    split.json             which original photo went where (`data.save_splits`' format), so `eval --split
                           val`, `calibrate` and `explain` of a run trained from shards find the photos

Each sample is `<key>.jpg` (the photo re-encoded as JPEG with its SHORTER side at most --size pixels; smaller
photos keep their size), `<key>.cls` (class index, ASCII) and `<key>.json` (class name, duplicate group,
split, fold, original path). The split is made when sharding, by the same `stratified_split` /
`stratified_kfold` with near-duplicate groups that training from the folder uses, so a folder run with the
same seed validates on the same photos. Training photos are shuffled before they are written (a shard
holds every class, so a streaming shuffle buffer suffices).

Every shard is written under a temporary name and renamed when complete; _info.json is written last. A crash
leaves no shard named as finished and no _info.json, and training refuses a folder without one.
"""
from __future__ import annotations

import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mineralnet.errors import MineralNetError

SHARDS_FORMAT = "mineralnet-shards/1"
INFO_FILE = "_info.json"
SPLIT_FILE = "split.json"
_TAR = re.compile(r"[^/\s'\"]*\.tar\b")  # the shard file pattern at the end of a path, URL or pipe: command


# ---- writing ---------------------------------------------------------------------------------------------

def parse_shard_size(text) -> tuple[int, int]:
    """(max photos, max bytes) per shard from '1000' (photos) or '500MB' / '2GB' (size)."""
    s = str(text).strip().upper().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(MB|GB)", s)
    if m:
        n = float(m.group(1)) * (2**20 if m.group(2) == "MB" else 2**30)
        if n < 2**20:
            raise MineralNetError(f"--shard-size {text} is below 1MB; use e.g. 500MB or a photo count")
        return 10**12, int(n)
    if s.isdigit() and int(s) >= 1:
        return int(s), 10**15
    raise MineralNetError(f"--shard-size {text!r} must be a photo count (e.g. 1000) or a size (e.g. 500MB, 2GB)")


def reencode(path: str, size: int, quality: int) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of the photo with its shorter side shrunk to `size` (never enlarged)."""
    from mineralnet.data.decode import load_image

    img = load_image(path, min_size=size)  # upright RGB; a large JPEG is decoded at reduced scale
    h, w = img.shape[:2]
    s = size / min(h, w)
    if s < 1:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise MineralNetError(f"OpenCV could not encode {path} as JPEG")
    return buf.tobytes(), img.shape[1], img.shape[0]


@dataclass
class _Plan:
    """What goes where: set name per photo and the (shuffled) writing order of each set."""
    names: list        # set names in writing order: ["train", "val"] or ["fold0", ...]
    set_of: list       # set name per photo
    fold_of: list      # fold id per photo, or None
    group_of: list     # near-duplicate group id per photo (its own index when not grouped)
    order: dict        # set name -> photo indices in writing order
    info: dict         # how the split was made


def plan_split(index, *, val_split: float = 0.1, folds: int = 0, seed: int = 0, group_duplicates: bool = True,
               max_group: int | None = None) -> _Plan:
    """The split of a scanned collection, made exactly as training from the folder makes it."""
    from mineralnet.data.duplicates import DEFAULT_MAX_GROUP, collection_groups
    from mineralnet.data.splits import stratified_kfold, stratified_split

    labels = index.labels()
    groups, merged = None, 0
    n = len(labels)
    if group_duplicates:
        dup = collection_groups(index, max_group=max_group or DEFAULT_MAX_GROUP)
        groups, merged = dup.ids, dup.merged
    if folds:
        fold_idx = stratified_kfold(labels, folds, seed=seed, classes=index.classes, groups=groups)
        fold_of = [0] * n
        for k, ix in enumerate(fold_idx):
            for i in ix:
                fold_of[i] = k
        names = [f"fold{k}" for k in range(folds)]
        set_of = [names[k] for k in fold_of]
        info = {"kind": "kfold", "folds": folds, "seed": seed}
    else:
        tr, va = stratified_split(labels, val_split, seed=seed, groups=groups)
        names, fold_of = ["train", "val"], [None] * n
        set_of = [""] * n
        for i in tr:
            set_of[i] = "train"
        for i in va:
            set_of[i] = "val"
        info = {"kind": "val_split", "val_split": val_split, "seed": seed}
    info.update(duplicate_groups_merged=merged, group_duplicates=group_duplicates,
                max_duplicate_group=max_group or DEFAULT_MAX_GROUP)
    rng = random.Random(seed)
    order = {}
    for name in names:
        ix = [i for i in range(n) if set_of[i] == name]
        rng.shuffle(ix)  # a shard holds every class: a streaming shuffle buffer then mixes well enough
        order[name] = ix
    return _Plan(names, set_of, fold_of, list(groups) if groups is not None else list(range(n)), order, info)


def training_sets(names: list) -> dict:
    """{key: the sets a run trains on}: "train" -> ["train"], or per fold "without_fold2" -> the other folds."""
    if names == ["train", "val"]:
        return {"train": ["train"]}
    return {f"without_{k}": [n for n in names if n != k] for k in names}


def write_shards(index, out, *, size: int = 256, shard_size="1000", val_split: float = 0.1, folds: int = 0,
                 seed: int = 0, quality: int = 90, group_duplicates: bool = True, max_group: int | None = None,
                 threads: int | None = None, progress: bool = True, log=print) -> dict:
    """Write the photos of a scanned collection (`scan_dataset(PHOTOS)`, verified: its index facts give the
    duplicate groups and the digest) as WebDataset shards in `out`; returns the _info.json written.

    Raises MineralNetError (one line) for a folder that already holds finished shards, bad options, and a
    write that fails (full disk, no permission): the shard being written is removed, _info.json not written.
    """
    import webdataset as wds

    from mineralnet import __version__
    from mineralnet.data.decode import ImageDecodeError
    from mineralnet.data.index import listing_digest
    from mineralnet.data.splits import save_splits
    from mineralnet.data.stats import channel_stats

    if size < 16:
        raise MineralNetError(f"--size {size} must be at least 16 pixels (the shorter side of a stored photo)")
    if not 1 <= quality <= 100:
        raise MineralNetError(f"--quality {quality} must be in 1..100 (JPEG quality)")
    maxcount, maxsize = parse_shard_size(shard_size)
    out = Path(out)
    if (out / INFO_FILE).exists():
        raise MineralNetError(f"{out} already holds finished shards ({INFO_FILE}); delete the folder or pass another "
                              f"--out")
    if len(index.classes) < 2:
        raise MineralNetError(f"{index.root} has {len(index.classes)} class folder(s); shards for training need at least 2")
    plan = plan_split(index, val_split=val_split, folds=folds, seed=seed, group_duplicates=group_duplicates,
                      max_group=max_group)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob(".*.tar.tmp"):  # left by a crashed earlier attempt
            old.unlink()
    except OSError as e:
        raise MineralNetError(f"cannot write in {out}: {e.strerror or e}; pass another --out") from None
    base = Path(index.base)
    rel = [Path(os.path.relpath(p, base)).as_posix() for p, _ in index.samples]
    splits, written, failed = {}, {}, []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(index.samples), desc="sharding photos", unit="photo")
    threads = threads or max(1, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for name in plan.names:
                splits[name], written[name] = _write_set(
                    wds, pool, out, name, plan.order[name], index, rel, plan, size, quality, maxcount,
                    maxsize, failed, bar, ImageDecodeError)
    except OSError as e:
        raise MineralNetError(f"cannot write shards in {out}: {e.strerror or e}"
                              f"{f' ({e.filename})' if getattr(e, 'filename', None) else ''}; free space or pass "
                              f"another --out (finished shards stay; {INFO_FILE} is written only when all are)"
                              ) from None
    finally:
        if bar is not None:
            bar.close()
    stats = {}  # the mean/std of each training set, sampled as `normalize: dataset` samples the folder's
    for key, parts in training_sets(plan.names).items():
        paths = [index.samples[i][0] for i in sorted(i for n in parts for i in written[n])]
        mean, std = channel_stats(paths, size=64, max_images=2000, seed=seed)
        stats[key] = {"mean": mean, "std": std}
    facts = index.facts
    info = {
        "format": SHARDS_FORMAT, "name": Path(index.root).name, "version": __version__,
        "source": str(index.root),
        "index_digest": listing_digest(facts.rel, facts.label, facts.size) if facts is not None else None,
        "classes": list(index.classes), "num_classes": len(index.classes),
        "image_size": size, "size_rule": "shorter side at most image_size pixels (never enlarged)",
        "jpeg_quality": quality, "split": plan.info, "stats": stats, "splits": splits,
        "skipped": {"unreadable": len(index.bad), "failed_when_sharding": len(failed)},
    }
    save_splits(out / SPLIT_FILE, index, {name: sorted(written[name]) for name in plan.names},
                info=dict(plan.info, shards=True))
    _write_json_atomic(out / INFO_FILE, info)
    if log:
        _summary(log, out, info, index, failed)
    return info


def _write_set(wds, pool, out: Path, name: str, order: list, index, rel, plan, size, quality,
               maxcount, maxsize, failed: list, bar, decode_error):
    """Write one set's shards; returns (its _info split entry, photo indices written)."""
    filenames, lengths, done = [], [], []
    count = [0]
    counts = np.zeros(len(index.classes), np.int64)

    def finished(tmp_name: str) -> None:  # ShardWriter's `post`: the shard is closed, give it its real name
        tmp = Path(tmp_name)
        final = tmp.with_name(tmp.name[1:-len(".tmp")])
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        filenames.append(final.name)
        lengths.append(count[0])
        count[0] = 0

    def encode(i):
        try:
            return i, reencode(index.samples[i][0], size, quality), None
        except (decode_error, MineralNetError, cv2.error) as e:
            return i, None, getattr(e, "reason", str(e))

    writer = wds.ShardWriter(str(out / f".{name}-%06d.tar.tmp"), maxcount=maxcount, maxsize=maxsize, post=finished,
                             verbose=0)
    try:
        for start in range(0, len(order), 256):  # bounded: results are written as they come, in order
            for i, got, why in pool.map(encode, order[start:start + 256]):
                if bar is not None:
                    bar.update(1)
                if got is None:
                    failed.append((index.samples[i][0], why))
                    continue
                jpg, w, h = got
                label = index.samples[i][1]
                meta = {"class": index.classes[label], "group": int(plan.group_of[i]),
                        "split": name, "path": rel[i], "width": w, "height": h}
                if plan.fold_of[i] is not None:
                    meta["fold"] = plan.fold_of[i]
                writer.write({"__key__": f"{i:08d}", "jpg": jpg, "cls": str(label).encode(), "json": meta})
                count[0] += 1
                counts[label] += 1
                done.append(i)
        writer.close()
    except BaseException:
        stream = getattr(writer, "tarstream", None)
        fname = getattr(writer, "fname", None)
        try:
            if stream is not None:
                stream.close()
        except Exception:
            pass
        if fname and fname.endswith(".tmp"):
            Path(fname).unlink(missing_ok=True)
        raise
    if not done:
        raise MineralNetError(f"no photo of the {name} set could be re-encoded (e.g. {failed[0][0]}: {failed[0][1]})"
                              if failed else f"the {name} set is empty; add photos")
    entry = {"name": name, "num_samples": int(sum(lengths)), "filenames": filenames, "shard_lengths": lengths,
             "class_counts": counts.tolist()}
    return entry, done


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _summary(log, out: Path, info: dict, index, failed: list) -> None:
    total = sum(s["num_samples"] for s in info["splits"].values())
    mb = sum((out / f).stat().st_size for s in info["splits"].values() for f in s["filenames"]) / 2**20
    sets = ", ".join(f"{n} {s['num_samples']} photos in {len(s['filenames'])} shard(s)"
                     for n, s in info["splits"].items())
    log(f"wrote {total} photos of {info['num_classes']} classes to {out} ({sets}; {mb:.1f} MB, shorter side at most "
        f"{info['image_size']} px)")
    skipped = list(index.bad) + failed
    if skipped:
        log(f"skipped {len(index.bad)} unreadable photo(s) and {len(failed)} that failed to re-encode, e.g. "
            f"{skipped[0][0]}: {skipped[0][1]} (`mineralnet data check` lists them)")
    if info["split"]["duplicate_groups_merged"]:
        log(f"split: {info['split']['duplicate_groups_merged']} group(s) of near-duplicate photos kept on one side")
    fold = " --folds {0} --fold 0".format(info["split"]["folds"]) if info["split"]["kind"] == "kfold" else ""
    log(f"train from them: mineralnet train --data {out}{fold} --out runs/from-shards")


# ---- reading ---------------------------------------------------------------------------------------------

@dataclass
class ShardInfo:
    """A checked _info.json and where its shards are: `url(name)` is the path, URL or pipe: command of one."""
    info: dict
    where: str            # the folder, or the spec the shard names are substituted into
    spec: str | None      # the user's train spec (a pattern), or None for a folder
    split_doc: str        # where split.json is (path or spec)

    def url(self, filename: str) -> str:
        if self.spec is None:
            return os.path.join(self.where, filename)
        return _substitute(self.where, filename)

    def split_entry(self, name: str) -> dict:
        splits = self.info["splits"]
        if name not in splits:
            raise MineralNetError(f"the shards at {self.where} have no {name!r} set (they have "
                                  f"{', '.join(splits)}); write them with the split you train on")
        return splits[name]


def is_shard_source(data) -> bool:
    """True when --data names shards rather than photos: a folder with _info.json (or with .tar files and no
    class folders), a .tar path or pattern, or a pipe:/URL spec."""
    if data is None:
        return False
    s = str(data)
    if s.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", s):
        return True
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        if (p / INFO_FILE).is_file():
            return True
        return any(p.glob("*.tar")) and not any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir())
    return bool(_TAR.search(s)) and not p.suffix.lower() == ".csv"


def _substitute(spec: str, filename: str) -> str:
    """The spec with its shard pattern (the last `*.tar` token) replaced by `filename`."""
    m = list(_TAR.finditer(spec))
    if not m:
        raise MineralNetError(f"--data {spec!r} names no .tar shards; give a folder written by `mineralnet data "
                              f"shard`, or a pattern such as 'pipe:cat shards/train-{{000000..000003}}.tar'")
    last = m[-1]
    return spec[:last.start()] + filename + spec[last.end():]


def _read_text(url: str) -> str:
    import webdataset as wds

    with wds.gopen(url) as f:
        return f.read().decode("utf-8")


def read_shard_info(data, info_file=None) -> ShardInfo:
    """The _info.json of a shard folder or spec, checked (format, version) -> ShardInfo. One clear line for
    a folder without it, an unreadable one and shards written by another version."""
    s = os.path.expanduser(str(data))
    if Path(s).is_dir():
        where, spec = os.path.abspath(s), None
        info_url = info_file or os.path.join(where, INFO_FILE)
        if info_file is None and not Path(info_url).is_file():
            tars = sorted(Path(where).glob("*.tar"))
            raise MineralNetError(
                f"{where} holds {len(tars)} .tar file(s) but no {INFO_FILE}: `mineralnet data shard` writes it last, "
                f"so these shards are unfinished or were not written by it; run `mineralnet data shard PHOTOS --out "
                f"{where}` again")
    else:
        where, spec = s, s
        info_url = info_file or _substitute(s, INFO_FILE)
    try:
        info = json.loads(_read_text(info_url) if spec is not None or info_file else Path(info_url).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MineralNetError(f"cannot read the shard description {info_url} ({type(e).__name__}: {e}); it is "
                              f"written by `mineralnet data shard` beside the shards") from None
    fmt = info.get("format") if isinstance(info, dict) else None
    if fmt != SHARDS_FORMAT:
        raise MineralNetError(f"{info_url} describes shards of format {fmt!r} (written by MineralNet "
                              f"{info.get('version') if isinstance(info, dict) else '?'}), not {SHARDS_FORMAT}; "
                              f"write them again with this version: mineralnet data shard PHOTOS --out SHARDS")
    for key in ("classes", "splits", "image_size", "split", "stats"):
        if key not in info:
            raise MineralNetError(f"{info_url} lacks {key!r}; it is not a complete {SHARDS_FORMAT} description: "
                                  f"write the shards again")
    split_doc = os.path.join(os.path.dirname(info_url), SPLIT_FILE) if spec is None else _substitute(s, SPLIT_FILE)
    return ShardInfo(info, where, spec, split_doc)


def read_shard_split(sinfo: ShardInfo) -> dict:
    """The shards' split.json (which original photo is in which set) -> `load_splits`' dict."""
    import tempfile

    from mineralnet.data.splits import load_splits

    if sinfo.spec is None:
        return load_splits(sinfo.split_doc, check_files=False)
    try:
        text = _read_text(sinfo.split_doc)
    except OSError as e:
        raise MineralNetError(f"cannot read {sinfo.split_doc} ({e}); it is written beside the shards") from None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / SPLIT_FILE
        path.write_text(text)
        return load_splits(path, check_files=False)


def shard_source_note(path) -> str | None:
    """When `path` is a folder of shards: the one line saying that photos are needed here, and which; else None."""
    p = Path(os.path.expanduser(str(path)))
    if not (p.is_dir() and (p / INFO_FILE).is_file()):
        return None
    try:
        source = json.loads((p / INFO_FILE).read_text()).get("source")
    except (OSError, ValueError):
        source = None
    return (f"{p} is a folder of WebDataset shards (`mineralnet data shard`); this command needs the original "
            f"photos: pass the class-folder tree or CSV they were written from"
            + (f" ({source})" if source else "") + "; only `mineralnet train --data SHARDS` reads shards")
