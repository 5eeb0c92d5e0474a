"""The training epoch loop (the prediction loop that validation uses is mineralnet/infer/loop.py).

A device sync costs a step on a GPU, so the loss is read back (`.item()`) and the cross-process stop
check runs only every `log_every` steps and at the end of the epoch.
"""
from __future__ import annotations

import time

import torch

from mineralnet.train.state import StopFlag


def fresh_accelerator(**kwargs):
    """An Accelerator with state of its own, even when an earlier one ran in this process (cv, tests,
    notebooks): Accelerate keeps its state in class-level singletons."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    kwargs.setdefault("cpu", not torch.cuda.is_available())
    return Accelerator(**kwargs)


def _set_bn_eval(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_one_epoch(parts, accelerator, stop: StopFlag | None = None, bar=None) -> dict:
    """One pass over `parts.train_loader` (skipping the steps a resumed epoch already did).

    Args:
        parts: the built training parts (`mineralnet.train.fit.TrainParts`).
        stop: checked every `log_every` steps (all processes agree); the epoch ends early when set.
        bar: a tqdm bar to advance, or None.
    Returns:
        {loss: mean training loss, images: images seen by all processes, seconds}.
    """
    model, loss_fn, opt, progress = parts.model, parts.loss_fn, parts.optimizer, parts.progress
    log_every = parts.cfg.log_every
    model.train()
    if parts.cfg.freeze_bn:
        _set_bn_eval(model)
    loader = parts.train_loader
    if progress.step_in_epoch:
        # a stream (train.shard_inputs.ShardLoader) cannot seek: it resumes its own way, never by reading and
        # dropping batches of an endless IterableDataset
        own = getattr(loader, "skip_first_batches", None)
        loader = own(progress.step_in_epoch) if own else accelerator.skip_first_batches(loader, progress.step_in_epoch)
        loader.set_epoch(progress.epoch)
    first_step = progress.step_in_epoch
    total_loss, images, t0 = torch.zeros((), device=accelerator.device), 0, time.perf_counter()
    for batch in loader:
        x, y = batch[0], batch[1]
        rows = parts.teacher[batch[2]] if parts.teacher is not None else None  # --teacher: (x, y, index)
        lr = parts.lr_control.step(progress.global_step)
        if parts.augment is not None:  # --augment-on device: x is a RawPhotos batch of uint8 photos
            x = parts.augment(x)
        if parts.mix is not None:
            x, y = parts.mix(x, y, progress.global_step)
        if parts.cfg.channels_last:  # the model's format: the first convolution then copies nothing
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits, features = model(x, return_features=True)
            loss = loss_fn(logits, y, features) if rows is None else loss_fn(logits, y, features, rows)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        progress.step_in_epoch += 1
        progress.global_step += 1
        if parts.ema is not None:
            parts.ema.update(accelerator.unwrap_model(model), progress.global_step)
        total_loss += loss.detach()
        images += x.shape[0] * accelerator.num_processes
        if bar is not None:
            bar.update(1)
        if progress.global_step % log_every == 0:
            _log_step(parts, loss.item(), lr, images / (time.perf_counter() - t0), bar)
            if stop is not None and any_process(accelerator, stop.set):
                break
    steps = max(1, progress.step_in_epoch - first_step)
    return {"loss": float(total_loss.item()) / steps, "images": images, "seconds": time.perf_counter() - t0}


def _log_step(parts, loss: float, lr: float, img_s: float, bar) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}", refresh=False)
    if parts.writer is not None:
        parts.writer.add_scalar("train/loss", loss, parts.progress.global_step)
        parts.writer.add_scalar("train/lr", lr, parts.progress.global_step)


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is set on any of them."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)

