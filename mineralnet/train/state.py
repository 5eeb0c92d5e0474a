"""What training carries from step to step and across a resume: the learning-rate policy, the
progress counters, the stop flag of a pre-empted job and the weight EMA.

LRControl and Progress save as plain JSON (`state_dict()` is a dict of numbers), never as a pickle.
"""
from __future__ import annotations

import contextlib
import copy
import math
import signal
from pathlib import Path

import torch

from mineralnet.config import TrainConfig
from mineralnet.errors import MineralNetError


def param_groups(cfg: TrainConfig, model, extra=()) -> list[dict]:
    """Backbone parameters at `lr * backbone_lr_scale`, the head (and any loss parameters) at `lr`.

    Each group carries its `lr_scale`; LRControl multiplies the scheduled lr by it. One group when the
    scale is 1, so plain training builds exactly the optimiser it always did.
    """
    backbone = {id(p) for p in model.backbone.parameters()} if hasattr(model, "backbone") else set()
    params = [p for p in list(model.parameters()) + list(extra) if p.requires_grad]
    if cfg.backbone_lr_scale == 1.0 or not backbone:
        return [{"params": params, "lr_scale": 1.0}]
    groups = [{"params": [p for p in params if id(p) in backbone], "lr_scale": cfg.backbone_lr_scale},
              {"params": [p for p in params if id(p) not in backbone], "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: TrainConfig, model, extra=()):
    groups = param_groups(cfg, model, extra)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
            g["lr"] = lr * g.get("lr_scale", 1.0)
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
        # -inf is not JSON: store "no best yet" as None
        return {"scale": self.scale, "bad_epochs": self.bad_epochs,
                "best": None if self.best == -math.inf else self.best}

    def load_state_dict(self, s):
        self.scale, self.bad_epochs = float(s["scale"]), int(s["bad_epochs"])
        self.best = -math.inf if s["best"] is None else float(s["best"])


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
        for key, value in self.state_dict().items():
            setattr(self, key, type(value)(s[key]))


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
