"""Training under Accelerate: one loop from a laptop CPU to many GPUs.

    setup data -> build model/loss/optimiser -> fit(): train_one_epoch + evaluate per epoch

Accelerate owns devices, DDP, mixed precision and gathering. `batch_size` is the GLOBAL batch:
the loader yields global batches and Accelerate splits each one over the processes
(`split_batches=True`), so R processes see exactly the batches one process would see. Every
sample's augmentation is seeded by (seed, epoch, index), so data order and augmentation do not
depend on the process count, the worker count, or on a resume in the middle of an epoch.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mineralnet import data as mdata
from mineralnet.config import TrainConfig, add_config_arguments, config_from_args, load_config
from mineralnet.data import BatchMix, EpochShuffleSampler, PhotoDataset
from mineralnet.errors import MineralNetError
from mineralnet.losses import build_loss
from mineralnet.metrics import confusion_matrix, summarize
from mineralnet.model import FusionNet
from mineralnet.runs import atomic_write_json, atomic_write_text, model_meta, save_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- data
@dataclass
class DataSplit:
    classes: list
    train: list  # [(path, label)]
    val: list
    mean: list
    std: list
    bad: list  # [(path, reason)] excluded at scan time
    split_info: dict


def prepare_data(cfg: TrainConfig, run_dir: Path, is_main: bool) -> DataSplit:
    """Scan, check, split and measure the photos; write the split (and unreadable list) into the run."""
    index = mdata.scan_dataset(cfg.data, verify=True)
    bad = list(index.bad)
    if len(index.classes) < 2:
        raise MineralNetError(f"{cfg.data!r} has only {len(index.classes)} class folder(s) "
                              f"({', '.join(index.classes) or 'none'}); training needs at least 2 minerals")
    samples, labels = index.samples, index.labels()
    if cfg.val_data:
        vindex = mdata.scan_dataset(cfg.val_data, verify=True, classes=index.classes)
        bad += vindex.bad
        train, val = samples, vindex.samples
        split_info = {"kind": "val_data", "val_data": str(cfg.val_data)}
    elif cfg.folds:
        folds = mdata.stratified_kfold(labels, cfg.folds, seed=cfg.data_seed)
        val_idx = set(folds[cfg.fold])
        train = [s for i, s in enumerate(samples) if i not in val_idx]
        val = [s for i, s in enumerate(samples) if i in val_idx]
        split_info = {"kind": "kfold", "folds": cfg.folds, "fold": cfg.fold, "seed": cfg.data_seed}
    else:
        tr_idx, va_idx = mdata.stratified_split(labels, cfg.val_split, seed=cfg.data_seed)
        train, val = [samples[i] for i in tr_idx], [samples[i] for i in va_idx]
        split_info = {"kind": "val_split", "val_split": cfg.val_split, "seed": cfg.data_seed}
    if not val:
        raise MineralNetError(f"the validation split of {cfg.data!r} is empty; add photos or pass --val-data")
    if len(train) < cfg.batch_size:
        raise MineralNetError(f"the training split has {len(train)} photos, fewer than --batch-size "
                              f"{cfg.batch_size}; lower --batch-size")
    if cfg.normalize == "dataset":
        mean, std = mdata.channel_stats([p for p, _ in train], size=64, max_images=2000, seed=cfg.data_seed)
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if is_main:
        root = str(Path(index.root).resolve())
        rel = lambda s: os.path.relpath(s[0], root if Path(root).is_dir() else Path(root).parent)
        atomic_write_json(run_dir / "split.json", {
            **split_info, "root": root, "classes": index.classes,
            "train": [rel(s) for s in train], "val": [rel(s) if not cfg.val_data else s[0] for s in val]})
        if bad:
            atomic_write_text(run_dir / "unreadable.txt", "".join(f"{p}\t{r}\n" for p, r in bad))
            warnings.warn(f"{len(bad)} unreadable photo(s) excluded from training; the list is in "
                          f"{run_dir / 'unreadable.txt'} (`mineralnet data check` shows why)", stacklevel=2)
    return DataSplit(index.classes, train, val, [float(m) for m in mean], [float(s) for s in std], bad, split_info)


def build_loaders(cfg: TrainConfig, split: DataSplit):
    import cv2

    # Photos are small: OpenCV's own thread pool only fights the model's threads (and, loaded,
    # spins for seconds per image). Workers, when used, are the data parallelism.
    cv2.setNumThreads(1)
    cache_side = round(max(cfg.eval_resize, cfg.train_size / 0.875) * 1.25) if cfg.cache_images else None
    train_tf = mdata.build_transforms(cfg.train_size, split.mean, split.std, train=True, resize=cfg.eval_resize,
                                      scale=(cfg.scale_min, 1.0), rotate_limit=cfg.rotate, hflip=cfg.hflip)
    eval_tf = mdata.build_transforms(cfg.image_size, split.mean, split.std, train=False, resize=cfg.eval_resize)
    train_ds = PhotoDataset(split.train, train_tf, seed=cfg.seed, cache_side=cache_side,
                            size_at=cfg.train_size_at if cfg.train_crop_min else None)
    val_ds = PhotoDataset(split.val, eval_tf, seed=cfg.seed, cache_side=cache_side)
    sampler = EpochShuffleSampler(len(train_ds), cfg.seed)
    common = dict(num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, drop_last=False, **common)
    return train_loader, val_loader


# ----------------------------------------------------------------------------- optimisation
def build_optimizer(cfg: TrainConfig, params):
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class LRControl:
    """Learning-rate policy: per-step warm-up/cosine, or the paper's plateau rule per epoch
    (multiply by `plateau_factor` when the best val Top1 has not improved for `plateau_patience`
    epochs). Checkpointed with the run so a resume continues the same schedule."""

    def __init__(self, cfg: TrainConfig, optimizer, steps_per_epoch: int):
        self.cfg, self.opt, self.spe = cfg, optimizer, steps_per_epoch
        self.scale = 1.0  # plateau multiplier
        self.bad_epochs = 0
        self.best = -math.inf

    def lr_at(self, step: int) -> float:
        cfg, total = self.cfg, self.cfg.epochs * self.spe
        warm = cfg.warmup_epochs * self.spe
        if warm and step < warm:
            return cfg.lr * (step + 1) / warm
        if cfg.scheduler == "cosine":
            t = (step - warm) / max(1, total - warm)
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return cfg.lr * self.scale

    def step(self, step: int) -> float:
        lr = self.lr_at(step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def end_epoch(self, val_top1: float) -> None:
        if self.cfg.scheduler != "plateau":
            return
        if val_top1 > self.best:
            self.best, self.bad_epochs = val_top1, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.cfg.plateau_patience:
                self.scale *= self.cfg.plateau_factor
                self.bad_epochs = 0

    def state_dict(self):
        return {"scale": self.scale, "bad_epochs": self.bad_epochs, "best": self.best}

    def load_state_dict(self, s):
        self.scale, self.bad_epochs, self.best = s["scale"], s["bad_epochs"], s["best"]


class Progress:
    """Where training stands; checkpointed so --resume continues at the same step."""

    def __init__(self):
        self.epoch = 0          # epoch in progress (or next to run)
        self.step_in_epoch = 0  # optimizer steps done in that epoch
        self.global_step = 0
        self.best_top1 = -1.0
        self.best_epoch = -1
        self.train_seconds = 0.0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, s):
        vars(self).update(s)


class StopFlag:
    """Set by SIGTERM/SIGINT (a preempted cluster job); checked between steps."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


class ModelEma:
    """Exponential moving average of a model's weights and BatchNorm statistics (timm's ModelEmaV3
    with warm-up): after optimizer step n, ema <- d * ema + (1 - d) * live with
    d = min(decay, (1 + n) / (10 + n)), so a short run is not dominated by the random init.

    Every process keeps its own copy (DDP keeps the live weights identical, so the copies are too).
    The weights travel with the run's state/ as ema.safetensors; `n` is the global step.
    """

    FILE = "ema.safetensors"

    def __init__(self, model: torch.nn.Module, decay: float):
        model = getattr(model, "_orig_mod", model)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = float(decay)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        model = getattr(model, "_orig_mod", model)
        d = self.decay_at(step)
        ema_f, live_f = [], []
        for e, v in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                ema_f.append(e)
                live_f.append(v.detach())
            else:  # BatchNorm's num_batches_tracked
                e.copy_(v)
        torch._foreach_lerp_(ema_f, live_f, 1.0 - d)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(Path(directory) / self.FILE))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / self.FILE
        if not path.is_file():
            raise MineralNetError(f"{str(directory)!r} holds no {self.FILE}: the run was trained without "
                                  f"--ema-decay; resume it with --ema-decay 0")
        self.model.load_state_dict(load_file(str(path)))


# ----------------------------------------------------------------------------- loop
def train_one_epoch(model, loader, loss_fn, optimizer, accelerator, lr_control, progress, *,
                    stop: StopFlag | None = None, writer=None, log_every: int = 10, bar=None,
                    freeze_bn: bool = False, ema: ModelEma | None = None, mix: BatchMix | None = None):
    """One pass over the (prepared) loader. Returns {loss, images, seconds}; stops early on `stop`."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    total_loss, images, t0 = torch.zeros((), device=accelerator.device), 0, time.perf_counter()
    for x, y in loader:
        lr = lr_control.step(progress.global_step)
        if mix is not None:
            x, y = mix(x, y, progress.global_step)
        with accelerator.autocast():
            if loss_fn.needs_features:
                logits, feats = model(x, return_features=True)
                loss = loss_fn(logits, y, feats)
            else:
                loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        progress.step_in_epoch += 1
        progress.global_step += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), progress.global_step)
        total_loss += loss.detach()
        images += x.shape[0] * accelerator.num_processes
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}",
                            img_s=f"{images / (time.perf_counter() - t0):.1f}", refresh=False)
        if writer is not None and progress.global_step % log_every == 0:
            writer.add_scalar("train/loss", loss.item(), progress.global_step)
            writer.add_scalar("train/lr", lr, progress.global_step)
        if stop is not None and _any_process(accelerator, stop.set):
            break
    steps = max(1, progress.step_in_epoch)
    return {"loss": float(total_loss.item()) / steps, "images": images, "seconds": time.perf_counter() - t0}


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


@torch.no_grad()
def evaluate(model, loader, accelerator, loss_fn=None) -> dict:
    """Predictions over a prepared loader; every image counted exactly once whatever the process count.

    Returns numpy `targets` (N,), `preds` (N,), `probs` (N, C) and the mean cross-entropy `loss`.
    """
    model.eval()
    all_logits, all_targets = [], []
    for x, y in loader:
        with accelerator.autocast():
            logits = model(x)
        logits, y = accelerator.gather_for_metrics((logits.float().contiguous(), y))
        all_logits.append(logits.cpu())
        all_targets.append(y.cpu())
    logits = torch.cat(all_logits) if all_logits else torch.zeros(0, 1)
    targets = torch.cat(all_targets) if all_targets else torch.zeros(0, dtype=torch.long)
    probs = logits.softmax(dim=1)
    return {"targets": targets.numpy(), "preds": probs.argmax(1).numpy(), "probs": probs.numpy(),
            "loss": float(F.cross_entropy(logits, targets).item()) if len(targets) else float("nan")}


# ----------------------------------------------------------------------------- setup / fit
def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, GradientState

    # One Accelerator per fit(): clear what an earlier fit() in this process left (cv, tests).
    AcceleratorState._reset_state()
    GradientState._reset_state()
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise MineralNetError("--precision fp16 needs a CUDA GPU; on CPU use --precision bf16 or fp32")
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp,
                       dataloader_config=DataLoaderConfiguration(split_batches=True),
                       step_scheduler_with_optimizer=False)


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.backbone}-s{''.join(map(str, cfg.stages))}-{cfg.loss}"


def resolve_resume(cfg: TrainConfig, cli_overrides: dict | None = None) -> TrainConfig:
    """--resume RUN: the run's saved config, with only the explicitly given flags changed."""
    run = Path(cfg.resume)
    if not (run / "config.yaml").is_file():
        raise MineralNetError(f"--resume {str(run)!r} is not a run directory (no config.yaml); pass the folder "
                              f"training wrote")
    if not (run / "state").is_dir() and not (run / "state.old").is_dir():
        raise MineralNetError(f"--resume {str(run)!r} has no saved state/ (it stopped before its first "
                              f"checkpoint); start it again without --resume")
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved.update(cli_overrides or {})
    saved.update(resume=str(run), out=str(run))
    return load_config(None, **saved)


def _check_resume_compatible(run_dir: Path, classes, model: FusionNet) -> None:
    meta_path = run_dir / "resume.json"
    if not meta_path.is_file():
        return
    old = json.loads(meta_path.read_text())
    if old["classes"] != list(classes):
        raise MineralNetError(f"cannot resume {str(run_dir)!r}: it was trained on classes {old['classes']} but "
                              f"the data now has {list(classes)}; use the same data or start a new run")
    if old["model"] != model.config():
        raise MineralNetError(f"cannot resume {str(run_dir)!r}: it holds a {old['model']} model, not "
                              f"{model.config()}; drop the changed model flags or start a new run")


def save_checkpoint(accelerator, run_dir: Path, ema: ModelEma | None = None) -> None:
    """accelerate save_state (+ the EMA weights) into state/, atomically: write state.tmp, then swap."""
    tmp, final, old = run_dir / "state.tmp", run_dir / "state", run_dir / "state.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if ema is not None and accelerator.is_main_process:
        ema.save(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def fit(cfg: TrainConfig) -> dict:
    """Train one model as configured; returns {run_dir, best: {top1, mean_class_acc, epoch}, status}."""
    from accelerate.utils import broadcast_object_list, set_seed
    from tqdm.auto import tqdm

    cfg.validate()
    accelerator = make_accelerator(cfg)
    try:
        return _fit(cfg, accelerator, set_seed, broadcast_object_list, tqdm)
    finally:
        accelerator.end_training()


def _fit(cfg, accelerator, set_seed, broadcast_object_list, tqdm) -> dict:
    main = accelerator.is_main_process
    R = accelerator.num_processes
    if cfg.batch_size % R:
        raise MineralNetError(f"--batch-size {cfg.batch_size} does not divide over {R} processes; use a multiple "
                              f"of {R} (it is the GLOBAL batch)")
    if cfg.sync_bn and accelerator.device.type != "cuda":
        raise MineralNetError("--sync-bn needs CUDA GPUs (SyncBatchNorm is unavailable on CPU); drop the flag")
    if cfg.data is None:
        cfg.data = str(mdata.make_demo_dataset()) if main else None
        cfg.data = broadcast_object_list([cfg.data])[0]
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    resuming = cfg.resume is not None
    if main:
        if run_dir.exists() and any(run_dir.iterdir()) and not resuming:
            if (run_dir / "config.yaml").exists():
                raise MineralNetError(f"run directory {str(run_dir)!r} already holds a run; pass --resume "
                                      f"{run_dir} to continue it or choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    split = prepare_data(cfg, run_dir, main)
    train_loader, val_loader = build_loaders(cfg, split)
    train_set = train_loader.dataset
    model = FusionNet(cfg.backbone, cfg.stages, len(split.classes), pretrained=cfg.pretrained_value,
                      drop_rate=cfg.drop_rate)
    if resuming:
        _check_resume_compatible(run_dir, split.classes, model)
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss, k=cfg.k, alpha=cfg.alpha, scope=cfg.loss_scope, num_classes=len(split.classes),
                         feature_dim=model.feature_dim, center_weight=cfg.center_weight,
                         label_smoothing=cfg.label_smoothing)
    optimizer = build_optimizer(cfg, list(model.parameters()) + list(loss_fn.parameters()))
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if any(True for _ in loss_fn.parameters()):
        loss_fn = accelerator.prepare(loss_fn)
        loss_fn.needs_features = True
    lr_control = LRControl(cfg, optimizer, len(train_loader))
    progress = Progress()
    accelerator.register_for_checkpointing(lr_control, progress)
    ema = ModelEma(accelerator.unwrap_model(model), cfg.ema_decay) if cfg.ema_decay else None
    mix = None
    if cfg.mixup or cfg.cutmix:
        mix = BatchMix(len(split.classes), mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mix_prob, seed=cfg.seed,
                       rank=accelerator.process_index)

    if main:
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        atomic_write_json(run_dir / "resume.json", {"classes": split.classes,
                                                    "model": accelerator.unwrap_model(model).config()})
    if resuming:
        state = run_dir / "state" if (run_dir / "state").is_dir() else run_dir / "state.old"
        accelerator.load_state(str(state))
        if ema is not None:
            ema.load(state)
        if main:
            print(f"resumed {run_dir} at epoch {progress.epoch + 1}, step {progress.step_in_epoch}")
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=progress.global_step or None)
        _truncate_metrics(run_dir / "metrics.jsonl", progress.epoch)
        print(f"training {cfg.backbone} stages {','.join(map(str, cfg.stages))} on {len(split.train)} photos, "
              f"validating on {len(split.val)}, {len(split.classes)} classes, {R} process(es) on "
              f"{accelerator.device.type}, global batch {cfg.batch_size}, {cfg.precision}; run: {run_dir}")

    unwrapped = accelerator.unwrap_model(model)
    best_source = ema.model if ema is not None else unwrapped  # the weights validated, kept and exported
    meta_common = dict(classes=split.classes, image_size=cfg.image_size, mean=split.mean, std=split.std,
                       resize=cfg.eval_resize)
    status = "finished"
    with StopFlag() as stop:
        while progress.epoch < cfg.epochs:
            epoch = progress.epoch
            # Accelerate's loader re-sets its sampler and dataset to its own iteration count at every
            # pass (a count that restarts at 0 in a resumed process): set it to the true epoch.
            train_loader.set_epoch(epoch)
            train_set.set_epoch(epoch)  # under DDP the loader's set_epoch does not reach our dataset
            loader = train_loader
            if progress.step_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, progress.step_in_epoch)
                loader.set_epoch(epoch)
            bar = tqdm(total=len(train_loader), initial=progress.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not main, leave=False, dynamic_ncols=True)
            tr = train_one_epoch(model, loader, loss_fn, optimizer, accelerator, lr_control, progress,
                                 stop=stop, writer=writer, log_every=cfg.log_every, bar=bar,
                                 freeze_bn=cfg.freeze_bn, ema=ema, mix=mix)
            bar.close()
            progress.train_seconds += tr["seconds"]
            if stop.set:  # preempted mid-epoch: save where we are and leave cleanly
                save_checkpoint(accelerator, run_dir, ema)
                status = "interrupted"
                if main:
                    print(f"stopped by signal at epoch {epoch + 1} step {progress.step_in_epoch}; state saved. "
                          f"Continue with: mineralnet train --resume {run_dir}")
                break
            t_val = time.perf_counter()
            ev = evaluate(best_source, val_loader, accelerator)
            m = summarize(confusion_matrix(ev["targets"], ev["preds"], len(split.classes)))
            live = None
            if ema is not None:  # the live weights too, to show what the average gains
                ev_live = evaluate(model, val_loader, accelerator)
                live = summarize(confusion_matrix(ev_live["targets"], ev_live["preds"], len(split.classes)))
            lr_control.end_epoch(m["top1"])
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            improved = m["top1"] > progress.best_top1
            if improved:
                progress.best_top1, progress.best_epoch = m["top1"], epoch + 1
                if main:
                    metrics = {"top1": m["top1"], "mean_class_acc": m["mean_class_acc"], "epoch": epoch + 1,
                               "val_images": m["n"]}
                    extra = {"split": split.split_info}
                    if ema is not None:
                        extra["ema_decay"] = cfg.ema_decay
                    save_model(run_dir, best_source, model_meta(unwrapped, metrics=metrics, **meta_common,
                                                                extra=extra))
            save_checkpoint(accelerator, run_dir, ema)
            if main:
                line = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": tr["loss"],
                        "val_loss": ev["loss"], "val_top1": m["top1"], "val_mean_class_acc": m["mean_class_acc"],
                        "img_per_s": tr["images"] / max(tr["seconds"], 1e-9), "seconds": tr["seconds"],
                        "val_seconds": time.perf_counter() - t_val}
                if cfg.train_crop_min:
                    line["train_crop"] = cfg.train_size_at(epoch)
                if live is not None:
                    line.update(val_top1_live=live["top1"], val_mean_class_acc_live=live["mean_class_acc"])
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
                for key in ("train_loss", "val_loss", "val_top1", "val_mean_class_acc", "img_per_s", "lr",
                            "val_top1_live", "val_mean_class_acc_live"):
                    if key in line:
                        writer.add_scalar(f"epoch/{key}", line[key], epoch + 1)
                live_note = f"  (live weights {live['top1']:.4f})" if live else ""
                if cfg.train_crop_min:
                    live_note += f"  crop {cfg.train_size_at(epoch)}px"
                print(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {tr['loss']:.4f}  val top1 {m['top1']:.4f}  "
                      f"mean class acc {m['mean_class_acc']:.4f}"
                      f"{live_note}"
                      f"  {line['img_per_s']:.1f} img/s  "
                      f"{tr['seconds']:.0f}s{'  *best' if improved else ''}", flush=True)
            if cfg.max_train_minutes and progress.train_seconds > 60 * cfg.max_train_minutes:
                if main:
                    print(f"time budget of {cfg.max_train_minutes} min reached after epoch {epoch + 1}")
                status = "time_budget"
                break
    result = {"run_dir": str(run_dir), "status": status, "train_seconds": progress.train_seconds,
              "best": {"top1": progress.best_top1, "epoch": progress.best_epoch}}
    if status != "interrupted" and progress.best_epoch > 0:
        result["best"] = final_evaluation(run_dir, unwrapped, val_loader, accelerator, split.classes)
    if main:
        if writer is not None:
            writer.close()
        atomic_write_json(run_dir / "result.json", result)
        if status != "interrupted":
            _print_summary(result, run_dir)
    return result


def final_evaluation(run_dir: Path, model, val_loader, accelerator, classes) -> dict:
    """Reload the best weights, evaluate the validation split and write eval/ (metrics, plots)."""
    from safetensors.torch import load_file

    from mineralnet.evaluate import write_eval_report

    accelerator.wait_for_everyone()
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))  # copied onto the model's device
    ev = evaluate(model, val_loader, accelerator)
    best = summarize(confusion_matrix(ev["targets"], ev["preds"], len(classes)))
    if accelerator.is_main_process:
        write_eval_report(run_dir / "eval", ev["targets"], ev["preds"], ev["probs"], classes)
    meta = json.loads((run_dir / "model.json").read_text())
    return {"top1": best["top1"], "mean_class_acc": best["mean_class_acc"], "epoch": meta["metrics"].get("epoch")}


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """On resume, drop metric lines of epochs after the restored state (they will be re-run)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["epoch"] <= epochs_done]
    atomic_write_text(path, "".join(l + "\n" for l in lines))


def _print_summary(result: dict, run_dir: Path) -> None:
    b = result["best"]
    print(f"\nbest val top1 {b['top1']:.4f}, mean class acc (paper's mAP) {b.get('mean_class_acc', float('nan')):.4f} "
          f"at epoch {b['epoch']}; {result['train_seconds'] / 60:.1f} min of training\n"
          f"run: {run_dir}\nnext:\n"
          f"  mineralnet eval {run_dir} --data <labelled photos>\n"
          f"  mineralnet explain {run_dir} --data <labelled photos>\n"
          f"  mineralnet-export {run_dir} --int8 --calib-data <photos>\n"
          f"  mineralnet predict {run_dir} photo.jpg")


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.description = ("Train FusionNet (stage-feature fusion + weighted top-k loss). Single process: "
                          "`python launch/train.py ...`; several GPUs: `accelerate launch --multi_gpu "
                          "--num_processes N launch/train.py ...`. With no arguments: a short demo on a "
                          "synthetic photo set.")
    add_config_arguments(parser)


def run(args) -> int:
    explicit = {k: v for k, v in vars(args).items() if k not in ("config",)}
    if explicit.get("resume"):
        cfg = resolve_resume(load_config(None, resume=explicit["resume"]),
                             {k: v for k, v in explicit.items() if k != "resume"})
    elif not explicit and args.config is None:
        cfg = load_config("demo")
        print("no arguments: training the demo preset on the built-in synthetic mineral photos "
              "(train on yours with --data DIR --config cpu|paper)")
    else:
        cfg = config_from_args(args)
    result = fit(cfg)
    if cfg.data is None or "demo-v1" in str(cfg.data):
        if result["status"] == "finished":
            print("this was the demo. Train on your own photos (one folder per mineral):\n"
                  "  accelerate launch launch/train.py --config cpu --data /path/to/photos --out runs/mine")
    return 0  # an interrupted run saved its state: that is a clean exit too


def main(argv=None) -> int:
    """Entry point of launch/train.py (same flags as `mineralnet train`)."""
    from mineralnet.cli import run_command

    return run_command("train", list(sys.argv[1:] if argv is None else argv), prog="train.py")
