"""`mineralnet bench RUN --train-step`: our training step (mineralnet.train) against a bare timm-style
loop on the same model, batch and precision, interleaved in one process."""
from __future__ import annotations

import gc
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from mineralnet.errors import MineralNetError
from mineralnet.bench.harness import _interleave, skipped_row
from mineralnet.bench.runtimes import Skip, _autocast, _check_torch_precision, open_model
from mineralnet.config import load_config
from mineralnet.model import FusionNet
from mineralnet.artifact import load_model
from mineralnet.losses import build_loss
from mineralnet.train import LRControl, Progress, TrainParts, build_optimizer, make_accelerator, train_one_epoch

TRAIN_LOOPS = ("mineralnet", "mineralnet-cl", "bare", "bare-cl")


# ============================================================================ training-step benchmark
class TimedLoader:
    """Wraps a loader and records a timestamp (after device sync) each time a batch is requested and
    when it is exhausted: consecutive differences are the wall time of each training step."""

    def __init__(self, loader, sync: Optional[Callable] = None):
        self.loader, self.sync, self.stamps = loader, sync or (lambda: None), []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.stamps = []
        for batch in self.loader:
            self.sync()
            self.stamps.append(time.perf_counter())
            yield batch
        self.sync()
        self.stamps.append(time.perf_counter())

    def step_times_ms(self) -> list[float]:
        return list(np.diff(self.stamps) * 1e3)


def _train_variant(loop: str, meta: dict, state: dict, precision: str, batch: int, size: int, steps: int):
    """Build one training loop variant -> (run_epoch() -> [step ms], accelerator or None)."""
    from torch.utils.data import DataLoader, TensorDataset


    channels_last = loop.endswith("-cl")
    ours = loop.startswith("mineralnet")
    cfg = load_config(None, backbone=meta["backbone"], stages=meta["stages"], precision=precision,
                      batch_size=batch, image_size=size, channels_last=channels_last, epochs=1, loss="wtopk",
                      optimizer="sgd", lr=1e-3, momentum=0.9, scheduler="none")
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(batch * steps, 3, size, size, generator=g)
    ys = torch.randint(0, meta["num_classes"], (batch * steps,), generator=g)
    model = FusionNet(meta["backbone"], meta["stages"], meta["num_classes"], pretrained=False)
    model.load_state_dict(state)
    loss_fn = build_loss("wtopk", k=cfg.k, alpha=cfg.alpha, scope=cfg.loss_scope)
    loader = DataLoader(TensorDataset(xs, ys), batch_size=batch, shuffle=False, drop_last=True)
    if ours:
        accelerator = make_accelerator(cfg)
        device = accelerator.device
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, model)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        timed = TimedLoader(loader, sync)
        progress = Progress()
        # the training loop's own parts; this benchmark needs no run directory, split, EMA or mixing
        parts = TrainParts(cfg, run=None, split=None, model=model, loss_fn=loss_fn, optimizer=optimizer,
                           train_loader=timed, val_loader=None, lr_control=LRControl(cfg, optimizer, len(loader)),
                           progress=progress, ema=None, mix=None)

        def run_epoch():
            progress.step_in_epoch = 0
            train_one_epoch(parts, accelerator)
            return timed.step_times_ms()
        return run_epoch, accelerator

    # The bare loop: what a timm-style script does per step, nothing else.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # as timm's NativeScaler
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timed = TimedLoader(loader, sync)

    def run_epoch():
        model.train()
        for x, y in timed:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device.type, precision):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return timed.step_times_ms()
    return run_epoch, None


def run_train_step(model_path: str, *, loops: Optional[Sequence[str]] = None,
                   precisions: Sequence[str] = ("fp32",), batch_sizes: Sequence[int] = (32,),
                   image_size: Optional[int] = None, warmup_s: float = 2.0, duration_s: float = 10.0,
                   min_runs: int = 5, steps_per_epoch: int = 3, peak_gflops: Optional[float] = None,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Training images/s of each loop variant; the variants of one (precision, batch) are interleaved
    epoch by epoch in this process so that load changes hit them alike. Works under `accelerate launch`
    (the `mineralnet` loops run DDP; bare loops are single-process only and are skipped there)."""
    loops = list(loops or TRAIN_LOOPS)
    bad = [l for l in loops if l not in TRAIN_LOOPS]
    if bad:
        raise MineralNetError(f"unknown training loop(s) {', '.join(bad)} for --train-step; choose from "
                              f"{', '.join(TRAIN_LOOPS)}")
    bm = open_model(model_path, image_size, train=True)
    state = {k: v.clone() for k, v in load_model(bm.path)[0].state_dict().items()}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for prec in precisions:
        for b in batch_sizes:
            common = dict(model=bm.name, precision=prec, batch=b, image_size=bm.image_size,
                          gflop_per_image=bm.gflop_per_image, peak_gflops=peak_gflops, device=dev,
                          processes=world, threads=torch.get_num_threads())
            variants, accel = {}, None
            for loop in loops:  # ratios: each of our loops against the bare loop of the same memory format
                base = dict(common, runtime=loop, baseline=loop.startswith("bare"),
                            group=f"{prec} batch {b} {'channels_last' if loop.endswith('-cl') else 'nchw'}")
                try:
                    _check_torch_precision(prec, dev)
                    if loop.startswith("bare") and world > 1:
                        raise Skip("the bare loop is single-process; run it without accelerate launch")
                    fn, a = _train_variant(loop, bm.meta, state, prec, b, bm.image_size, steps_per_epoch)
                    variants[loop] = (fn, base)
                    accel = a or accel
                except Skip as e:
                    rows.append(skipped_row(str(e), **base))
                except MineralNetError as e:
                    rows.append(skipped_row(str(e), **base))
            rows += _interleave(variants, warmup_s, duration_s, min_runs, log)
            if accel is not None and world == 1:
                accel.free_memory()
            variants = None
            gc.collect()
    return rows
