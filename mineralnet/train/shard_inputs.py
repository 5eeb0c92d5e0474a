"""Training inputs from WebDataset shards (`mineralnet data shard`): `train --data SHARDS`.

    prepare_shards(cfg, run)        -> ShardSplit (classes, the split fixed when sharding, mean/std)
    build_shard_loaders(cfg, split) -> (ShardLoader for training, DataLoader for validation)

How the streams are laid out over processes:
- Training: each epoch the training shards are shuffled by (seed, epoch) and dealt out, rank r taking
  shards r, r+R, r+2R, ... and within a rank each DataLoader worker its own share of those; a rank's stream
  cycles over its shards (reshuffled each cycle) through a shuffle buffer of SHUFFLE_BUFFER samples per
  worker. Every rank takes exactly len(loader) = (training photos from _info.json) // --batch-size steps of
  --batch-size / R photos, so all ranks step together and an epoch is as long as from the folder; with
  unequal shares a rank with fewer photos repeats some of them in the epoch (shards of equal size, and at
  least R x workers of them, avoid that). Augmentation is seeded per (seed, epoch, photo, repeat).
- Validation: the validation shards are read once per pass on the main process and Accelerate dispatches
  each global batch over the ranks (its IterableDataset mode), so every photo is scored exactly once.
- Every rank checks that it reads the same shards (a digest of _info.json's shard names and counts).
- Resume in the middle of an epoch: a stream cannot seek, so the epoch continues with a NEW stream (its shard
  order seeded by the step it resumes at) for the steps that were left; the step count, learning-rate
  schedule and later epochs are as without the interruption, the photos of the rest of that one epoch are
  a fresh draw (some may repeat, some be missed).
- A shard member that is missing or unreadable (a sample without its .jpg/.cls, a photo that does not
  decode, a truncated or corrupt tar) is skipped and counted: the first one is named, the count printed at
  the end of the epoch; a rank whose shards yield no sample at all stops with one line.
"""
from __future__ import annotations

import copy
import hashlib
import os
import random
import sys
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset

from mineralnet import data as mdata
from mineralnet.config import TrainConfig
from mineralnet.data.datasets import sample_seed
from mineralnet.data.decode import ImageDecodeError, decode_photo
from mineralnet.data.scan import DatasetIndex
from mineralnet.data.shards import _TAR, is_shard_source, read_shard_info, read_shard_split
from mineralnet.errors import MineralNetError
from mineralnet.runs import SPLIT_FILE, RunDir, read_split
from mineralnet.train.inputs import IMAGENET_MEAN, IMAGENET_STD, DataSplit, ignore_stop_signals, rank_exchange

SHUFFLE_BUFFER = 2000  # samples (JPEG bytes, ~20 KB each at 256 px) held per worker for the streaming shuffle
_SLOTS = 257  # bad-member counters: slot 0 for the main process, 1.. for DataLoader workers

is_shards = is_shard_source


@dataclass
class ShardSplit(DataSplit):
    """A DataSplit whose photos stream from shards (train/val list the original photos, for split.json)."""
    train_urls: list = field(default_factory=list)
    train_lengths: list = field(default_factory=list)
    val_urls: list = field(default_factory=list)
    val_lengths: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(sum(self.train_lengths))


def _sets(cfg: TrainConfig, info: dict, where: str):
    """(training set names, validation set name, stats key) for this run's --folds/--fold."""
    split = info["split"]
    if split["kind"] == "kfold":
        if cfg.folds != split["folds"]:
            raise MineralNetError(f"the shards at {where} are written in {split['folds']} folds; pass --folds "
                                  f"{split['folds']} --fold i (0..{split['folds'] - 1})")
        val = f"fold{cfg.fold}"
        return [f"fold{k}" for k in range(cfg.folds) if k != cfg.fold], val, f"without_{val}"
    if cfg.folds:
        raise MineralNetError(f"the shards at {where} have a fixed train/val split; drop --folds, or write them "
                              f"with `mineralnet data shard PHOTOS --out SHARDS --folds {cfg.folds}`")
    return ["train"], "val", "train"


def _check_cfg(cfg: TrainConfig, where: str) -> None:
    if cfg.val_data:
        raise MineralNetError(f"--val-data does not combine with shards ({where}): they carry their validation "
                              f"set; drop --val-data")
    if cfg.sampling != "uniform":
        raise MineralNetError(f"--sampling {cfg.sampling} needs an index of the photos, which a shard stream does "
                              f"not have; use --sampling uniform with shards, or train from the photo folder")
    if cfg.augment_on == "device":
        raise MineralNetError("--augment-on device needs the cached photo canvases of the folder path; with shards "
                              "use --augment-on workers (or auto)")


def _train_urls(sinfo, names: list) -> tuple[list, list]:
    """(shard URLs, photos per shard) to train on: the sets' shards, or those of the user's pattern."""
    known = {}
    for n in names:
        e = sinfo.split_entry(n)
        known.update(zip(e["filenames"], e["shard_lengths"]))
    if sinfo.spec is None:
        return [sinfo.url(f) for f in known], list(known.values())
    import braceexpand

    urls = list(braceexpand.braceexpand(sinfo.spec))
    lengths = []
    for u in urls:
        found = _TAR.findall(u)
        name = os.path.basename(found[-1] if found else u)
        if name not in known:
            raise MineralNetError(f"--data names {name}, which is not a shard of the training set(s) "
                                  f"{', '.join(names)} in its _info.json; give a pattern of those shards")
        lengths.append(known[name])
    return urls, lengths


def prepare_shards(cfg: TrainConfig, run: RunDir) -> ShardSplit:
    """The split of the shards (fixed when they were written), their mean/std, and the run's split.json."""
    sinfo = read_shard_info(cfg.data)
    info, where = sinfo.info, sinfo.where
    _check_cfg(cfg, where)
    train_sets, val_set, stats_key = _sets(cfg, info, where)
    train_urls, train_lengths = _train_urls(sinfo, train_sets)
    val_entry = sinfo.split_entry(val_set)
    val_urls = [sinfo.url(f) for f in val_entry["filenames"]]
    if sinfo.spec is None:
        missing = [u for u in train_urls + val_urls if not os.path.isfile(u)]
        if missing:
            raise MineralNetError(f"shard {missing[0]} listed in {where}/_info.json is missing ({len(missing)} in "
                                  f"all); restore it or write the shards again")
    doc = read_shard_split(sinfo)
    if doc["classes"] != info["classes"]:
        raise MineralNetError(f"{sinfo.split_doc} and _info.json of {where} list other classes; write the shards again")
    train = [s for n in train_sets for s in doc["splits"].get(n, [])]
    val = list(doc["splits"].get(val_set, []))
    if cfg.normalize == "dataset":
        mean, std = info["stats"][stats_key]["mean"], info["stats"][stats_key]["std"]
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    n_train = sum(train_lengths)
    if n_train < cfg.batch_size:
        raise MineralNetError(f"the training shards hold {n_train} photos, fewer than --batch-size {cfg.batch_size}; "
                              f"lower --batch-size")
    digest = hashlib.sha256(repr(sorted(info["splits"].items())).encode()).hexdigest()[:16]
    split_info = dict(info["split"], kind="shards", shards=str(cfg.data), sets=train_sets + [val_set],
                      shards_digest=digest, shard_image_size=info["image_size"])
    if cfg.folds:
        split_info["fold"] = cfg.fold
    _check_ranks_agree(digest, where)
    if run.is_main:
        _notes(cfg, info)
    if cfg.resume is not None and (run / SPLIT_FILE).is_file():
        old = read_split(run.path)["info"].get("shards_digest")
        if old is not None and old != digest:
            raise MineralNetError(f"cannot resume {run.path}: the shards at {where} are not the ones it started from "
                                  f"(other shard names or counts); resume with the same shards or start a new run")
    else:
        run.write_split(DatasetIndex(doc["root"], list(info["classes"]), []), train, val, split_info)
    return ShardSplit(list(info["classes"]), train, val, [float(m) for m in mean], [float(s) for s in std], [],
                      split_info, train_urls, train_lengths, val_urls, list(val_entry["shard_lengths"]), info)


def _check_ranks_agree(digest: str, where: str) -> None:
    """Every rank of every machine reads the same shards (same names and counts), or all stop with one line."""
    exchange = rank_exchange()
    if exchange is None:
        return
    every = exchange.gather([digest])
    for rank, other in enumerate(every):
        if other != every[0]:
            raise MineralNetError(f"rank {rank} sees other shards at {where} than rank 0 (another _info.json); give "
                                  f"every machine the same shards")


def _notes(cfg: TrainConfig, info: dict) -> None:
    if cfg.cache_images:
        print("shards: --cache-images does not apply to streamed shards (the photos are read from the tar files "
              "every epoch, already resized); it is ignored", flush=True)
    need = max(cfg.eval_resize, cfg.train_size)
    if info["image_size"] < need:
        print(f"shards: the stored photos have a shorter side of at most {info['image_size']} px but --image-size "
              f"{cfg.image_size} resizes to {need} px, so they are enlarged; write the shards with --size {need} "
              f"or more", flush=True)


# ---- the streams -----------------------------------------------------------------------------------------

class ShardStream(IterableDataset):
    """(float32 CHW tensor, int label) from WebDataset shards.

    train=True: an endless stream of this rank's shards (see the module docstring), shuffled; train=False:
    one pass over all shards in order (the workers share them). Bad members are counted in `bad`.
    """

    def __init__(self, urls: list, lengths: list, transform, num_classes: int, *, train: bool, seed: int = 0,
                 rank: int = 0, world: int = 1, size_at=None, buffer: int = SHUFFLE_BUFFER):
        self.urls, self.lengths = list(urls), list(lengths)
        self.transform, self.num_classes = transform, num_classes
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.size_at, self.buffer = size_at, buffer
        self.epoch, self.restart = 0, 0
        self.min_size = getattr(transform, "min_decode_size", None)
        self.bad = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()
        self.opened: list = []  # shard URLs opened by this process (workers keep their own): for tests

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.size_at is not None:
            self.transform.image_size = self.size_at(epoch)

    def reset_bad(self) -> None:
        self.bad.zero_()

    def bad_count(self) -> int:
        return int(self.bad.sum())

    # which shards this process reads
    def rank_shards(self) -> list:
        """This rank's shards in this epoch (for validation: all on the main process, none elsewhere, since
        Accelerate reads validation batches on the main process and hands them out)."""
        if not self.train:
            return list(self.urls) if self.rank == 0 else []
        order = list(self.urls)
        random.Random(f"{self.seed}:{self.epoch}:{self.restart}").shuffle(order)
        return order[self.rank::self.world]

    def _worker(self):
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _source(self, mine: list, wid: int):
        """{"url": ...} dicts: one pass (validation), or cycles over `mine` until the loader stops."""
        if not self.train:
            for u in mine:
                self.opened.append(u)
                yield {"url": u}
            return
        cycle = 0
        while True:
            before = self._raw
            order = list(mine)
            if cycle:
                random.Random(f"{self.seed}:{self.epoch}:{self.restart}:{self.rank}:{wid}:{cycle}").shuffle(order)
            for u in order:
                self.opened.append(u)
                yield {"url": u}
            if self._raw == before:
                raise MineralNetError(f"none of the {len(mine)} training shard(s) of rank {self.rank} (e.g. {mine[0]}) "
                                      f"yields a sample; check them with `tar tf`, or write the shards again")
            cycle += 1

    def _count_raw(self, samples):
        for s in samples:
            self._raw += 1
            yield s

    def _skip(self, what: str, why: str, slot: int) -> None:
        if int(self.bad[slot]) == 0:
            print(f"shards: skipped {what} ({why}); further unreadable members are counted", file=sys.stderr,
                  flush=True)
        self.bad[slot] += 1

    def __iter__(self):
        import webdataset as wds

        wid, nw = self._worker()
        slot = wid + 1 if torch.utils.data.get_worker_info() is not None else 0
        mine = self.rank_shards()[wid::nw]
        if not mine:
            return
        self._raw = 0

        def handler(exn) -> bool:  # webdataset's hook for a shard that cannot be opened or read: skip it
            where = next((a for a in reversed(exn.args) if isinstance(a, str) and a), "a shard")
            self._skip(f"the rest of {where}", f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}", slot)
            return True

        samples = self._count_raw(wds.tarfile_to_samples(handler=handler)(self._source(mine, wid)))
        if self.train:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.restart}:{self.rank}:{wid}:buffer")
            samples = wds.shuffle(self.buffer, min(self.buffer, 200), rng=rng)(samples)
        seen: dict = {}
        bad_run = 0
        limit = 2 * sum(self.lengths) + self.buffer + 1000
        for s in samples:
            item = self._decode(s, seen, slot)
            if item is None:
                bad_run += 1
                if self.train and bad_run > limit:
                    raise MineralNetError(f"rank {self.rank}: {bad_run} shard members in a row could not be read "
                                          f"(e.g. in {s.get('__url__')}); write the shards again")
                continue
            bad_run = 0
            yield item

    def _decode(self, s: dict, seen: dict, slot: int):
        key, url = s.get("__key__"), s.get("__url__")
        what = f"{key} in {url}"
        if "jpg" not in s or "cls" not in s:
            self._skip(what, f"no {'.jpg' if 'jpg' not in s else '.cls'} member", slot)
            return None
        try:
            label = int(s["cls"])
        except ValueError:
            self._skip(what, f".cls is {s['cls'][:20]!r}, not a class number", slot)
            return None
        if not 0 <= label < self.num_classes:
            self._skip(what, f"class {label} is outside 0..{self.num_classes - 1}", slot)
            return None
        try:
            img = decode_photo(what, s["jpg"], min_size=self.min_size)
        except ImageDecodeError as e:
            self._skip(what, e.reason, slot)
            return None
        if hasattr(self.transform, "set_random_seed"):
            try:
                index = int(key)
            except (TypeError, ValueError):
                index = int(hashlib.sha1(str(key).encode()).hexdigest()[:8], 16)
            repeat = seen.get(key, 0)
            seen[key] = repeat + 1
            self.transform.set_random_seed((sample_seed(self.seed, self.epoch, index)
                                            + repeat * 0x9E3779B1) % 2**32)
        return self.transform(image=img)["image"], label


class ShardLoader:
    """This rank's training batches: exactly `steps` batches of `batch_size` photos per epoch, moved to
    `device`. Not a DataLoader, so `accelerator.prepare` passes it through (the ranks already read
    different shards; Accelerate would otherwise read every batch on the main process and dispatch it)."""

    def __init__(self, dataset: ShardStream, batch_size: int, steps: int, device, loader_kwargs: dict):
        self.dataset, self.batch_size, self.steps = dataset, batch_size, steps
        self.device, self.kw = device, loader_kwargs

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def skip_first_batches(self, done: int) -> ShardLoader:
        """The rest of an epoch resumed after `done` steps: a new stream (seeded by `done`) for the steps left."""
        ds = copy.copy(self.dataset)
        ds.restart = done
        return ShardLoader(ds, self.batch_size, max(0, self.steps - done), self.device, self.kw)

    def __iter__(self):
        self.dataset.reset_bad()
        loader = DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True, **self.kw)
        it = iter(loader)
        non_blocking = self.device.type == "cuda"
        try:
            for step in range(self.steps):
                try:
                    x, y = next(it)
                except StopIteration:
                    raise MineralNetError(f"the training shards of rank {self.dataset.rank} ran dry after {step} of "
                                          f"{self.steps} steps (every member unreadable?); write the shards again"
                                          ) from None
                yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)
        finally:
            del it
        bad = self.dataset.bad_count()
        if bad:
            who = f"rank {self.dataset.rank}: " if self.dataset.world > 1 else ""
            print(f"shards: {who}{bad} unreadable or incomplete shard member(s) skipped in this epoch (the first is "
                  f"named above); `tar tf SHARD` shows a shard's members", file=sys.stderr, flush=True)


def build_shard_loaders(cfg: TrainConfig, split: ShardSplit):
    """(ShardLoader, validation DataLoader): the folder path's transforms, --batch-size split over the ranks."""
    import cv2
    from accelerate import PartialState

    cv2.setNumThreads(1)
    state = PartialState()
    rank, world = state.process_index, state.num_processes
    if len(split.train_urls) < world:
        raise MineralNetError(f"{len(split.train_urls)} training shard(s) for {world} processes: every process needs "
                              f"its own; write the shards again with a smaller --shard-size (at least {world} "
                              f"training shards, better {world} x --workers)")
    steps = split.n_train // cfg.batch_size
    train_tf = mdata.build_transforms(cfg.train_size, split.mean, split.std, train=True, resize=cfg.eval_resize,
                                      scale=(cfg.scale_min, 1.0), rotate_limit=cfg.rotate, hflip=cfg.hflip)
    eval_tf = mdata.build_transforms(cfg.image_size, split.mean, split.std, train=False, resize=cfg.eval_resize)
    n = len(split.classes)
    train_ds = ShardStream(split.train_urls, split.train_lengths, train_tf, n, train=True, seed=cfg.seed, rank=rank,
                           world=world, size_at=cfg.train_size_at if cfg.train_crop_min else None)
    val_ds = ShardStream(split.val_urls, split.val_lengths, eval_tf, n, train=False, seed=cfg.seed, rank=rank,
                         world=world)
    common = dict(num_workers=cfg.workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
                  prefetch_factor=4 if cfg.workers else None,
                  worker_init_fn=ignore_stop_signals if cfg.workers else None)
    train_loader = ShardLoader(train_ds, cfg.batch_size // world, steps, state.device, common)
    # a DataLoader over an IterableDataset: accelerator.prepare reads it on the main process and dispatches
    # each global batch over the ranks, and gather_for_metrics drops the padding of the last one
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, drop_last=False, **common)
    return train_loader, val_loader
