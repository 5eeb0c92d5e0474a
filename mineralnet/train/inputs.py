"""Training inputs: scan and split the photos, measure their statistics, and build the loaders."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mineralnet import data as mdata
from mineralnet.config import TrainConfig
from mineralnet.errors import MineralNetError
from mineralnet.runs import SPLIT_FILE, RunDir, read_split

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataSplit:
    classes: list
    train: list  # [(path, label)]
    val: list
    mean: list
    std: list
    bad: list  # [(path, reason)] excluded at scan time
    split_info: dict


class RankExchange:
    """How the ranks of a DDP run share the preparation of the photos (`data.refresh_index`): rank, world,
    gather (every rank's list, concatenated in rank order, on every rank) and broadcast (rank 0's object)."""

    def __init__(self, state):
        self.state = state
        self.rank, self.world = state.process_index, state.num_processes

    def gather(self, items: list) -> list:
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def broadcast(self, obj):
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]


def rank_exchange() -> RankExchange | None:
    """The exchange of this process's DDP run, or None when it runs alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from accelerate import PartialState

    return RankExchange(PartialState())  # the state the run's Accelerator set up


def _groups(cfg: TrainConfig, index, run: RunDir):
    """(group id per sample or None, groups merged) for the split; says what it merged and dissolved."""
    if not cfg.group_duplicates:
        return None, 0
    dup = mdata.collection_groups(index, max_group=cfg.max_duplicate_group)
    if run.is_main and (dup.merged or dup.oversized):
        print(f"split: {dup.merged} group(s) of near-duplicate photos kept on one side of the split "
              f"({mdata.false_partner_note(len(index.samples), mdata.DEFAULT_MAX_DISTANCE)}; `mineralnet data check "
              f"{cfg.data} --duplicates` lists them; --no-group-duplicates turns this off)", flush=True)
    if run.is_main and dup.oversized:
        print(f"split: {dup.oversized_note([p for p, _ in index.samples], cfg.max_duplicate_group)}", flush=True)
    return dup.ids, dup.merged


def _split(cfg: TrainConfig, index, run: RunDir, exchange=None):
    """(train samples, val samples, split info, unreadable) as the config asks."""
    samples, labels = index.samples, index.labels()
    if cfg.val_data:
        vindex = mdata.scan_dataset(cfg.val_data, verify=True, classes=index.classes, exchange=exchange)
        return samples, vindex.samples, {"kind": "val_data", "val_data": str(cfg.val_data)}, list(vindex.bad)
    groups, merged = _groups(cfg, index, run)
    if cfg.folds:
        folds = mdata.stratified_kfold(labels, cfg.folds, seed=cfg.data_seed, classes=index.classes, groups=groups)
        val_idx = set(folds[cfg.fold])
        train = [s for i, s in enumerate(samples) if i not in val_idx]
        val = [s for i, s in enumerate(samples) if i in val_idx]
        return train, val, {"kind": "kfold", "folds": cfg.folds, "fold": cfg.fold, "seed": cfg.data_seed,
                            "duplicate_groups_merged": merged}, []
    tr_idx, va_idx = mdata.stratified_split(labels, cfg.val_split, seed=cfg.data_seed, groups=groups)
    info = {"kind": "val_split", "val_split": cfg.val_split, "seed": cfg.data_seed, "duplicate_groups_merged": merged}
    return [samples[i] for i in tr_idx], [samples[i] for i in va_idx], info, []


def prepare_data(cfg: TrainConfig, run: RunDir) -> DataSplit:
    """Scan, check, split and measure the photos; write the split (and unreadable list) into the run."""
    exchange = rank_exchange()
    index = mdata.scan_dataset(cfg.data, verify=True, index_file=cfg.index, exchange=exchange)
    if len(index.classes) == 1 and Path(cfg.data).is_dir():
        inner = Path(cfg.data) / index.classes[0]
        if sum(1 for d in inner.iterdir() if d.is_dir() and not d.name.startswith(".")) >= 2:
            raise MineralNetError(f"{cfg.data!r} holds one folder, {index.classes[0]!r}, whose sub-folders look like "
                                  f"the mineral classes; pass --data {str(inner)!r}")
    if len(index.classes) < 2:
        raise MineralNetError(f"{cfg.data!r} has only {len(index.classes)} class folder(s) "
                              f"({', '.join(index.classes) or 'none'}); training needs at least 2 minerals")
    train, val, split_info, vbad = _split(cfg, index, run, exchange)
    kept = _resumed_split(cfg, run, index, val if cfg.val_data else [])
    if kept is not None:
        train, val, split_info = kept
    if exchange is not None:
        _check_same_split(exchange, train, val)
    bad = list(index.bad) + vbad
    if not val:
        raise MineralNetError(f"the validation split of {cfg.data!r} is empty; add photos or pass --val-data")
    if len(train) < cfg.batch_size:
        raise MineralNetError(f"the training split has {len(train)} photos, fewer than --batch-size "
                              f"{cfg.batch_size}; lower --batch-size")
    if cfg.normalize == "dataset":
        mean, std = mdata.channel_stats([p for p, _ in train], size=64, max_images=2000, seed=cfg.data_seed)
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if kept is None:  # a resumed run keeps its split.json as it was
        if run.is_main:
            _warn_copies_across_the_split(index, train, val)
        run.write_split(index, train, val, split_info)
    run.write_unreadable(bad)
    if bad and run.is_main:
        warnings.warn(f"{len(bad)} unreadable photo(s) excluded from training; the list is in "
                      f"{run.unreadable_file} (`mineralnet data check` shows why)", stacklevel=2)
    return DataSplit(index.classes, train, val, [float(m) for m in mean], [float(s) for s in std], bad, split_info)


def _resumed_split(cfg: TrainConfig, run: RunDir, index, val_data_samples):
    """On --resume: (train, val, info) of the run's saved split, restricted to the photos that are still there
    and readable; photos added or removed since are reported in one line each, never re-split. None when
    not resuming (or the saved split is of other classes: the resume check then says so)."""
    if cfg.resume is None or not (run / SPLIT_FILE).is_file():
        return None
    saved = read_split(run.path, root=index.base)
    if saved["classes"] != index.classes:
        return None
    now = {p for p, _ in index.samples} | {p for p, _ in val_data_samples}
    train, val = saved["splits"].get("train", []), saved["splits"].get("val", [])
    was = {p for p, _ in train + val}
    added, gone = len(now - was), len(was - now)
    if run.is_main and added:
        print(f"resume: {added} photo(s) in {cfg.data} are new since the run started and are not used (the run "
              f"keeps its split in {run / SPLIT_FILE}); start a new run to train on them", flush=True)
    if run.is_main and gone:
        print(f"resume: {gone} photo(s) of the run's split are missing or unreadable now and are left out; "
              f"restore them, or start a new run", flush=True)
    return ([s for s in train if s[0] in now], [s for s in val if s[0] in now], saved["info"])


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process: a signal to the whole process group
    (Slurm, `timeout`, Ctrl-C) then stops training between steps with its state saved, instead of killing
    the workers under the main process's feet."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_same_split(exchange, train, val) -> None:
    """Every rank trains and validates on the same photos, or all stop with one line."""
    import hashlib

    def digest(samples):
        return hashlib.sha256("\n".join(f"{p}\t{y}" for p, y in samples).encode("utf-8", "surrogateescape")).hexdigest()

    mine = (digest(train), digest(val), len(train), len(val))
    every = exchange.gather([mine])
    for rank, other in enumerate(every):
        if other != every[0]:
            raise MineralNetError(f"rank {rank} made another split than rank 0 ({other[2]} training / {other[3]} "
                                  f"validation photos vs {every[0][2]} / {every[0][3]}); every rank needs the same "
                                  f"photos, --data and --val-data paths and flags")


def _warn_copies_across_the_split(index, train, val) -> None:
    """Byte-identical photos on both sides of the split inflate every validation number: say so."""
    val_paths = {p for p, _ in val}
    samples = list(train) + list(val)
    digests = None
    if index.facts is not None:  # the index has every digest: no file is read again
        key = dict(zip((p for p, _ in index.samples), index.facts.digest_keys()))
        if all(p in key for p, _ in samples):
            digests = [key[p] for p, _ in samples]
    split = [g for g in mdata.identical_groups(samples, digests)
             if any(p in val_paths for p, _ in g) and any(p not in val_paths for p, _ in g)]
    if split:
        warnings.warn(f"{len(split)} byte-identical photo(s) are both in training and validation (e.g. "
                      f"{split[0][0][0]!r} = {split[0][1][0]!r}); remove the copies (`mineralnet data check` lists "
                      f"them)", stacklevel=3)


def build_loaders(cfg: TrainConfig, split: DataSplit, indexed: bool = False):
    """(train loader, validation loader): global batches, the sampler's order a function of (seed, epoch).
    `indexed`: the training batches carry each photo's index too, (x, y, i) (distillation's teacher rows)."""
    import cv2

    # Photos are small: OpenCV's own thread pool only fights the model's threads (and, loaded,
    # spins for seconds per image). Workers, when used, are the data parallelism.
    cv2.setNumThreads(1)
    # 1.25x the larger of the eval resize and the training crop's (unrounded) resize
    side = round(max(cfg.eval_resize, cfg.train_size / 0.875) * 1.25)
    cache_side = side if cfg.cache_images else None
    train_tf = mdata.build_transforms(cfg.train_size, split.mean, split.std, train=True, resize=cfg.eval_resize,
                                      scale=(cfg.scale_min, 1.0), rotate_limit=cfg.rotate, hflip=cfg.hflip)
    eval_tf = mdata.build_transforms(cfg.image_size, split.mean, split.std, train=False, resize=cfg.eval_resize)
    budget = cache_budget_bytes(cfg) if cfg.cache_images else None
    val_ds = mdata.PhotoDataset(split.val, eval_tf, seed=cfg.seed, cache_side=cache_side, cache_bytes=budget)
    left = None if budget is None else max(0, budget - sum(img.nbytes for img in (val_ds.cache or [])))
    if augment_on(cfg) == "device":  # uint8 photos letterboxed into side x side; DeviceAugment warps them
        train_ds = mdata.CanvasDataset(split.train, side, seed=cfg.seed, cache=cfg.cache_images, cache_bytes=left)
    else:
        train_ds = mdata.PhotoDataset(split.train, train_tf, seed=cfg.seed, cache_side=cache_side,
                                      size_at=cfg.train_size_at if cfg.train_crop_min else None, cache_bytes=left)
    if cfg.cache_images:
        _say_cache(budget, train_ds.cached + val_ds.cached, len(train_ds) + len(val_ds))
    if cfg.sampling == "uniform":
        sampler = mdata.EpochShuffleSampler(len(train_ds), cfg.seed)
    else:
        sampler = mdata.ClassBalancedSampler([y for _, y in split.train], cfg.sampling, cfg.seed)
    common = dict(num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
                  worker_init_fn=ignore_stop_signals if cfg.workers else None)
    if indexed:
        from mineralnet.train.teacher import IndexedDataset

        train_ds = IndexedDataset(train_ds)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, drop_last=False, **common)
    return train_loader, val_loader


def cache_budget_bytes(cfg: TrainConfig) -> int:
    """RAM for --cache-images in this process: --cache-budget-gb, else half the memory available now shared
    by the processes of this machine."""
    import os

    if cfg.cache_budget_gb is not None:
        return int(cfg.cache_budget_gb * 2**30)
    import psutil

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return int(psutil.virtual_memory().available * 0.5 / local)


def _say_cache(budget: int, cached: int, total: int) -> None:
    import torch.distributed as dist

    if cached >= total or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    print(f"cache: {cached} of {total} photos fit in the {budget / 2**30:.1f} GB cache budget per process; the "
          f"other {total - cached} are decoded from disk every epoch (--cache-budget-gb raises the budget; "
          f"`mineralnet data shard` writes pre-resized shards that decode faster)", flush=True)


def augment_on(cfg: TrainConfig) -> str:
    """'device' or 'workers': where the training augmentation runs (auto: device when the photos are cached
    and a CUDA GPU is there)."""
    if cfg.augment_on != "auto":
        return cfg.augment_on
    from mineralnet.data.shards import is_shard_source

    cached = cfg.cache_images and not is_shard_source(cfg.data)  # shards stream: nothing is cached
    return "device" if cached and torch.cuda.is_available() else "workers"


def build_device_augment(cfg: TrainConfig, split: DataSplit):
    """The train step's augmentation (a `data.DeviceAugment`) when it runs on the device, else None."""
    if augment_on(cfg) != "device":
        return None
    return mdata.DeviceAugment(cfg.train_size, split.mean, split.std, scale=(cfg.scale_min, 1.0),
                               rotate_limit=cfg.rotate, hflip=cfg.hflip,
                               size_at=cfg.train_size_at if cfg.train_crop_min else None)
