"""FusionNet: a timm features-only backbone whose pooled stage outputs are concatenated.

Jia et al. (2021), Section 2.2: F_i is the global-average-pooled output of ResNet Layer i
(256, 512, 1024, 2048 channels for ResNet-50); the chosen F_i are concatenated and one Linear
layer classifies the fused vector. Their best fusion is F2 + F4 (2560-d).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence, Union

import timm
import torch
from torch import nn

from mineralnet.errors import MineralNetError
from mineralnet.stages import parse_stages

Pretrained = Union[bool, str, os.PathLike]


def _create_backbone(name: str, out_indices: Sequence[int] | None, pretrained: Pretrained) -> nn.Module:
    kwargs = dict(features_only=True)
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    if pretrained in (False, None, "", "none", "false", "False"):
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is True or str(pretrained).lower() in ("true", "hub", "timm"):
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # no network, no cache, unknown tag, ...
            raise MineralNetError(
                f"could not get pretrained weights for {name!r} from the timm hub "
                f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no detail'}); "
                f"download them elsewhere and pass the file with --pretrained PATH "
                f"(.safetensors or .pth), or train from scratch with --pretrained false") from None
    path = os.fspath(pretrained)
    if not os.path.isfile(path):
        raise MineralNetError(f"pretrained weights file {path!r} does not exist; pass an existing "
                              f".safetensors/.pth file, true (timm hub) or false")
    state_dict = read_weights_file(path)
    try:
        # timm takes the state dict through the pretrained config, filtering the classifier as it does for
        # hub weights, so the same file works for features_only; we read the file ourselves (no pickle).
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict,
                                 file=None, source=""), **kwargs)
    except Exception as e:
        raise MineralNetError(f"pretrained weights {path!r} do not fit backbone {name!r} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); pass weights of "
                              f"the same timm architecture") from None


def read_weights_file(path: str) -> dict:
    """A --pretrained file's state dict, without unpickling arbitrary objects: safetensors, or a torch file
    read with weights_only=True whatever the installed torch/timm default."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- unreadable or needs full unpickling
        raise MineralNetError(f"pretrained weights {path!r} do not fit: they cannot be read as tensors only "
                              f"({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'}); MineralNet loads no "
                              f"pickled objects: pass a .safetensors file or a plain state-dict .pth") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise MineralNetError(f"pretrained weights {path!r} hold no state dict; pass a timm/torchvision weights file")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


@functools.lru_cache(maxsize=None)
def _num_feature_levels(backbone: str) -> int:
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            probe = timm.create_model(backbone, features_only=True, pretrained=False)
    except (RuntimeError, ValueError) as e:
        raise MineralNetError(f"unknown or unsupported backbone {backbone!r} ({e}); use a timm model "
                              f"name with features_only support, e.g. resnet50") from None
    return len(probe.feature_info)


def stage_out_indices(backbone: str, stages: Sequence[int]) -> tuple[int, ...]:
    """Map the paper's stage numbers (1..4) to timm feature indices of `backbone`.

    ResNets expose five feature levels (stem, layer1..layer4), so stage i is index i; for other
    backbones the stages are their last four feature levels.
    """
    n = _num_feature_levels(backbone)
    if n < 4:
        raise MineralNetError(f"backbone {backbone!r} has only {n} feature levels; FusionNet needs 4")
    return tuple(n - 4 + (s - 1) for s in stages)


class FusionNet(nn.Module):
    """Backbone stages -> global average pool each -> concatenate -> Linear.

    Args:
        backbone: timm model name (resnet50 in the paper).
        stages: the paper's stage numbers to fuse, 1..4 (Layer1..Layer4); (2, 4) is the best.
        num_classes: number of minerals.
        pretrained: False, True (timm hub) or a path to a local weights file.
        drop_rate: dropout on the fused vector before the classifier (0 in the paper).
    """

    def __init__(self, backbone: str = "resnet50", stages: Sequence[int] = (2, 4), num_classes: int = 22,
                 pretrained: Pretrained = False, drop_rate: float = 0.0):
        super().__init__()
        if int(num_classes) < 1:
            raise MineralNetError(f"num_classes={num_classes} must be at least 1")
        self.backbone_name = backbone
        self.stages = parse_stages(stages)
        self.num_classes = int(num_classes)
        self.backbone = _create_backbone(backbone, stage_out_indices(backbone, self.stages), pretrained)
        self.feature_channels = tuple(self.backbone.feature_info.channels())
        self.feature_reductions = tuple(self.backbone.feature_info.reduction())
        self.feature_dim = sum(self.feature_channels)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage feature maps [(B, C_i, H_i, W_i), ...] in stage order."""
        return self.backbone(x)

    def fuse(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Global-average-pool each map and concatenate: (B, feature_dim)."""
        return torch.cat([f.mean(dim=(2, 3)) for f in feature_maps], dim=1)

    def forward_head(self, fused: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(fused))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The fused feature vector (B, feature_dim), e.g. (B, 2560) for resnet50 stages (2, 4)."""
        return self.fuse(self.forward_features(x))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        fused = self.embed(x)
        logits = self.forward_head(fused)  # (B, num_classes)
        return (logits, fused) if return_features else logits

    def config(self) -> dict:
        """What `FusionNet(**config)` needs to rebuild this architecture."""
        return dict(backbone=self.backbone_name, stages=list(self.stages), num_classes=self.num_classes,
                    drop_rate=self.drop.p if isinstance(self.drop, nn.Dropout) else 0.0)
