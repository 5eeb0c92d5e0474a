"""Quantization-aware fine-tuning for the ONNX Runtime int8 file (`mineralnet train --qat RUN`).

Post-training int8 of some runs is refused by the export's gate on CPUs without VNNI, where the recipe keeps 7-bit
weights (`recipe.default_recipe`: reduce_range). QAT fine-tunes the trained weights for a few epochs while the
forward pass sees what ONNX Runtime's QDQ recipe will do to them (Jacob et al. 2018; TensorRT's and NNCF's QAT):

- weights: per-output-channel symmetric, of the convolution AFTER its BatchNorm is folded in (the export folds
  it), w_q = fq(w * g) / g with g = gamma / sqrt(running_var + eps), so BN's own scaling reproduces the folded
  int8 weight; [-64, 64] with reduce_range, else [-127, 127], scale = max|w| / qmax (onnxruntime's
  `compute_scale_zp`). BatchNorm statistics stay fixed (`--freeze-bn`), as folding needs.
- activations: uint8 asymmetric per tensor, at every backbone convolution's input and every BatchNorm's output
  (after its activation where timm fuses one), ranges from MinMax over the first training batches (rmin <= 0 <=
  rmax, scale = (rmax - rmin) / 255), then fixed; the export recalibrates on its own photos anyway.
- the fusion tail (pooling, concatenation, the linear head) stays float, as in the export.

Gradients pass the rounding straight through (torch.fake_quantize_*). What the run saves is the plain float
weights (model.safetensors, no wrapper keys): `mineralnet-export RUN --int8` quantizes them with the usual recipe
and gate, and `eval`/`predict` use them as any run's.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from mineralnet.errors import MineralNetError

QAT_FILE = "qat.json"  # the activation ranges and settings, in the QAT run's folder (a resume reads them back)
CALIB_BATCHES = 8


def weight_qmax(reduce_range: bool) -> int:
    """onnxruntime's symmetric int8 weight range: [-64, 64] with reduce_range, else [-127, 127]."""
    return 64 if reduce_range else 127


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric (scale, zero point) of the range [lo, hi] as onnxruntime's MinMax calibration makes it."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / 255.0
    return scale, int(min(255, max(0, round(-lo / scale))))


class FoldedWeightFQ(nn.Module):
    """Parametrization of a convolution's weight: fake-quantized as the BN-folded weight the export quantizes."""

    def __init__(self, bn: nn.Module | None, qmax: int):
        super().__init__()
        self.bn = [bn]  # a list: not a sub-module (the BN stays where it is in the state dict)
        self.qmax = qmax

    def gain(self, w: torch.Tensor) -> torch.Tensor:
        bn = self.bn[0]
        if bn is None:
            return torch.ones(w.shape[0], device=w.device, dtype=w.dtype)
        g = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        return torch.where(g.abs() < 1e-12, torch.ones_like(g), g)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g = self.gain(w).view(-1, *([1] * (w.dim() - 1)))
        folded = w * g
        scale = (folded.detach().abs().amax(dim=tuple(range(1, w.dim()))) / self.qmax).clamp_min(1e-12)
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(folded, scale.float(), zero, 0, -self.qmax, self.qmax) / g


@dataclass
class ActQuant:
    """One activation tensor's range (observed, then fixed) and its fake quantization."""
    lo: float = float("inf")
    hi: float = float("-inf")
    observing: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.lo, self.hi = min(self.lo, float(x.detach().min())), max(self.hi, float(x.detach().max()))
            return x
        if self.lo > self.hi:
            raise MineralNetError("internal: a QAT activation range was never observed; calibrate before training")
        scale, zero = act_qparams(self.lo, self.hi)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


@dataclass
class Qat:
    """The fake quantization attached to a model: conv -> BN pairs, activation quantizers, hooks."""
    model: nn.Module
    reduce_range: bool
    convs: dict = field(default_factory=dict)   # conv name -> BN name (or None)
    acts: dict = field(default_factory=dict)    # "in:<conv>" / "out:<bn>" -> ActQuant
    handles: list = field(default_factory=list)

    def calibrate(self, batches) -> int:
        """MinMax ranges of every quantized activation over `batches` of images (run through the prediction loop,
        so in eval mode without gradients); returns the number of images."""
        from mineralnet.infer.loop import predict_loader

        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            raise MineralNetError("QAT calibration got no training batches; check --data")
        was = self.model.training
        for a in self.acts.values():
            a.observing, a.lo, a.hi = True, float("inf"), float("-inf")
        try:
            pairs = ((x, torch.zeros(len(x), dtype=torch.long)) for x in itertools.chain([first], batches))
            return len(predict_loader(self.model, pairs)["labels"])
        finally:
            for a in self.acts.values():
                a.observing = False
            self.model.train(was)

    @property
    def weight_bits(self) -> int:
        return 7 if self.reduce_range else 8

    def ranges(self) -> dict:
        return {k: [a.lo, a.hi] for k, a in self.acts.items()}

    def load_ranges(self, ranges: dict) -> None:
        missing = sorted(set(self.acts) - set(ranges))
        if missing:
            raise MineralNetError(f"the QAT ranges saved in {QAT_FILE} do not match this model ({len(missing)} "
                                  f"tensors missing, e.g. {missing[0]}); start the QAT run again without --resume")
        for k, a in self.acts.items():
            a.lo, a.hi = map(float, ranges[k])

    def to_dict(self) -> dict:
        return {"reduce_range": self.reduce_range, "weight_qmax": weight_qmax(self.reduce_range),
                "convs": len(self.convs), "activations": len(self.acts), "ranges": self.ranges()}

    def save(self, run_dir, source: str) -> None:
        from mineralnet.files import atomic_write_json

        atomic_write_json(Path(run_dir) / QAT_FILE, {"from": source, **self.to_dict()})

    def detach(self) -> nn.Module:
        """Remove the hooks and parametrizations: the model computes in float with its (trained) weights."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for name in self.convs:
            conv = self.model.get_submodule(name)
            if parametrize.is_parametrized(conv, "weight"):
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
        return self.model


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish)


def trace(backbone: nn.Module, image_size: int) -> tuple[dict, dict, set]:
    """What one forward pass on a blank image shows (any timm backbone whose convs, BNs and activations are
    modules): ({conv name: the BatchNorm reading its output directly, or None}, {BN name: the activation module
    reading its output directly (timm's BatchNormAct2d holds its own: no entry)}, {names of blocks whose output,
    made by an op of their own such as a residual add, a convolution reads}). onnxruntime quantizes such a
    tensor once for all its readers, the block's shortcut included."""
    made, pairs, acts, blocks, handles = {}, {}, {}, set(), []  # made: id -> (innermost maker, tensor)
    names = {m: n for n, m in backbone.named_modules()}

    def reads(table, kind):  # a pre-hook: this module reads a tensor made by a module of `kind`
        def hook(mod, i):
            name, out, version = made.get(id(i[0]), (None, None, None))
            if out is not i[0] or not isinstance(backbone.get_submodule(name), kind):
                return
            if i[0]._version != version:  # changed in place since (ResNet's `x += shortcut`): the sum's reader
                blocks.add(names[mod])
            elif table.get(name) is None:
                table[name] = names[mod]  # the first reader
        return hook

    def conv_reads(mod, i):
        name, out, _ = made.get(id(i[0]), (None, None, None))
        if out is i[0] and name and any(True for _ in backbone.get_submodule(name).children()):
            blocks.add(name)

    def maker(mod, i, o):  # the innermost module that made a tensor keeps it (kept alive: ids stay unique)
        if isinstance(o, torch.Tensor):
            made.setdefault(id(o), (names[mod], o, o._version))

    for m in backbone.modules():
        if m is not backbone:
            handles.append(m.register_forward_hook(maker))
        if isinstance(m, nn.Conv2d):
            pairs.setdefault(names[m], None)
            handles.append(m.register_forward_pre_hook(conv_reads))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(reads(pairs, nn.Conv2d)))
        elif isinstance(m, ACTIVATIONS):
            handles.append(m.register_forward_pre_hook(reads(acts, nn.modules.batchnorm._BatchNorm)))
    was = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            p = next(backbone.parameters())
            backbone(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        backbone.train(was)
    return pairs, acts, blocks


def attach(model: nn.Module, reduce_range: bool, image_size: int = 64) -> Qat:
    """Fake-quantize `model.backbone`'s convolutions (folded weights) and activations as the int8 export will:
    every convolution's input, and every BatchNorm's output after the activation that reads it (onnxruntime
    quantizes after a ReLU/Clip it fuses)."""
    backbone = model.backbone
    pairs, after, blocks = trace(backbone, image_size)
    if not pairs:
        raise MineralNetError(f"--qat: the backbone {type(backbone).__name__} has no convolutions to quantize")
    qat = Qat(model, reduce_range)
    qmax = weight_qmax(reduce_range)
    for conv_name, bn_name in pairs.items():
        conv = backbone.get_submodule(conv_name)
        bn = backbone.get_submodule(bn_name) if bn_name else None
        parametrize.register_parametrization(conv, "weight", FoldedWeightFQ(bn, qmax))
        qat.convs[f"backbone.{conv_name}"] = f"backbone.{bn_name}" if bn_name else None
        act = qat.acts[f"in:backbone.{conv_name}"] = ActQuant()
        qat.handles.append(conv.register_forward_pre_hook(lambda mod, i, a=act: (a(i[0]), *i[1:])))
        if bn is not None:
            where = after.get(bn_name, bn_name)
            out = qat.acts[f"out:backbone.{where}"] = ActQuant()
            qat.handles.append(backbone.get_submodule(where).register_forward_hook(lambda mod, i, o, a=out: a(o)))
    for name in sorted(blocks):  # a residual block's sum: quantized once, for the next convolution and shortcut
        out = qat.acts[f"out:backbone.{name}"] = ActQuant()
        qat.handles.append(backbone.get_submodule(name).register_forward_hook(lambda mod, i, o, a=out: a(o)))
    return qat


def read_saved(run_dir) -> dict | None:
    path = Path(run_dir) / QAT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MineralNetError(f"{str(path)!r} is not readable JSON ({e}); start the QAT run again without "
                              f"--resume") from None
