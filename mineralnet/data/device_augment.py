"""Training augmentation on the training device: the loader ships uint8 photos, the train step warps them.

    CanvasDataset(samples, side, seed)      -> (RawPhotos(pixels (side, side, 3) uint8, info (3,) int64), label)
    DeviceAugment(size, mean, std, ...)     -> RawPhotos batch -> normalised (B, 3, size, size) float32

The same augmentation family as the worker pipeline (transforms.TrainTransform): torchvision's
RandomResizedCrop box (10 tries, then a centre crop; the same scale/ratio ranges), a rotation of
+-rotate_limit degrees, a horizontal flip, all as ONE affine per sample (the matrix of
transforms.warp_crop), sampled bilinearly with `grid_sample`, reflected (BORDER_REFLECT_101) at the
photo's own edges, then the dataset's mean/std normalisation. Mixup/CutMix (BatchMix) follow in the step.

Canvas (letterboxed, top-left): each photo is shrunk (INTER_AREA, never enlarged) so that its LONGER side
fits `side`, and put at the top-left corner of a side x side zero canvas; `info` holds (seed, height,
width) of the photo inside it, and no padding pixel is ever read. Letterboxing keeps the whole photo (a
crop can reach every pixel, as in the worker pipeline); a 4:3 photo keeps 0.75 of the worker cache's
resolution, which at the default side (1.25x the evaluation resize) is still about the evaluation resize.
Crops more than 2x the output size are sampled bilinearly without the worker pipeline's integer
pre-shrink (mild aliasing; it does not occur at the default side).

Randomness: every sample's parameters come from a counter-based hash of its seed, which is the worker
pipeline's per-sample seed, a function of (seed, epoch, index) only. So the batch a sample lands in and
the number of processes cannot change its augmentation.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mineralnet.data.decode import load_image
from mineralnet.data.datasets import sample_seed
from mineralnet.errors import MineralNetError

TRIES = 10  # RandomResizedCrop attempts before the centre-crop fallback (torchvision's)
_MASK = 0xFFFFFFFF


class RawPhotos(NamedTuple):
    """A photo (or, collated, a batch) as the loader ships it for device-side augmentation."""
    pixels: torch.Tensor  # (side, side, 3) uint8 RGB, photo at the top-left; batched (B, side, side, 3)
    info: torch.Tensor    # (3,) int64: per-sample seed, photo height, photo width; batched (B, 3)


def letterbox(img: np.ndarray, side: int) -> tuple[np.ndarray, int, int]:
    """(side, side, 3) uint8 canvas with `img` shrunk to fit at its top-left, and the photo's (height, width)."""
    h, w = img.shape[:2]
    s = side / max(h, w)
    if s < 1:
        h, w = max(1, round(h * s)), max(1, round(w * s))
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[:h, :w] = img[:, :, :3]
    return canvas, h, w


def _progress(items, desc: str):
    """A progress bar over a long up-front pass (only for large collections)."""
    if len(items) < 2000:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="photo", leave=False)


class CanvasDataset(Dataset):
    """(RawPhotos, label) per (path, label) sample, for `DeviceAugment`. With `cache` every photo is decoded
    and letterboxed once, up front, into one (N, side, side, 3) uint8 tensor; otherwise at every access.
    `set_epoch` changes the per-sample seeds exactly as PhotoDataset's."""

    def __init__(self, samples, side: int, seed: int = 0, cache: bool = True, cache_bytes: int | None = None):
        if int(side) < 8:
            raise MineralNetError(f"canvas side {side} is too small; use at least 8 pixels")
        self.samples, self.side, self.seed, self.epoch = list(samples), int(side), seed, 0
        self.pixels = self.sizes = None
        self.cached = 0  # the first `cached` photos are in RAM (all of them unless the budget says otherwise)
        if cache:
            per_photo = self.side * self.side * 3
            n = len(self.samples) if cache_bytes is None else min(len(self.samples), int(cache_bytes) // per_photo)
            self.pixels = torch.zeros((n, self.side, self.side, 3), dtype=torch.uint8)
            self.sizes = []
            for i, (path, _) in enumerate(_progress(self.samples[:n], "caching photos")):
                canvas, h, w = letterbox(load_image(path, min_size=self.side), self.side)
                self.pixels[i] = torch.from_numpy(canvas)
                self.sizes.append((h, w))
            self.cached = n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        if i < self.cached:
            pixels, (h, w) = self.pixels[i], self.sizes[i]
        else:
            canvas, h, w = letterbox(load_image(path, min_size=self.side), self.side)
            pixels = torch.from_numpy(canvas)
        info = torch.tensor((sample_seed(self.seed, self.epoch, i), h, w), dtype=torch.int64)
        return RawPhotos(pixels, info), int(label)


# ----------------------------------------------------------------------------- per-sample randomness
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), in 16-bit halves so no product overflows int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a 32-bit integer hash with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) int64 seeds -> (B, n) float32 uniforms in [0, 1): draw j of a sample depends on (seed, j) only."""
    j = torch.arange(n, dtype=torch.int64, device=seeds.device)
    x = _hash32((_hash32(seeds & _MASK)[:, None] + _mul32(j, 0x9E3779B9)[None, :]) & _MASK)
    return (x >> 8).float() / float(1 << 24)  # 24 bits: exact in float32


def draw_params(info: torch.Tensor, *, scale, ratio, rotate_limit: float, hflip: bool):
    """Per-sample augmentation parameters from `info` (B, 3) = (seed, photo height, photo width).

    Returns:
        boxes (B, 4) float32 crop (x, y, w, h) in photo pixels (torchvision's RandomResizedCrop law, as
        transforms._random_resized_crop_box), angles (B,) degrees in [-rotate_limit, rotate_limit],
        flips (B,) bool.
    """
    u = uniforms(info[:, 0], 2 * TRIES + 4)
    H, W = info[:, 1:2].float(), info[:, 2:3].float()  # (B, 1)
    target = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, :TRIES])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, TRIES:2 * TRIES])
    w, h = torch.sqrt(target * aspect), torch.sqrt(target / aspect)  # (B, TRIES)
    fits = (w <= W) & (h <= H)
    first = (~fits).long().cumprod(1).sum(1, keepdim=True).clamp(max=TRIES - 1)  # the first try that fits
    found = fits.any(1)
    H, W = H[:, 0], W[:, 0]
    # centre-crop fallback: the whole photo, cut to the nearest allowed aspect ratio
    fw = torch.where(W / H > ratio[1], H * ratio[1], W)
    fh = torch.where(W / H < ratio[0], W / ratio[0], H)
    w = torch.where(found, w.gather(1, first)[:, 0], fw)
    h = torch.where(found, h.gather(1, first)[:, 0], fh)
    x = (W - w) * torch.where(found, u[:, 2 * TRIES], torch.full_like(W, 0.5))
    y = (H - h) * torch.where(found, u[:, 2 * TRIES + 1], torch.full_like(H, 0.5))
    angles = (2 * u[:, 2 * TRIES + 2] - 1) * float(rotate_limit)
    flips = (u[:, 2 * TRIES + 3] < 0.5) & bool(hflip)
    return torch.stack([x, y, w, h], 1), angles, flips


# ----------------------------------------------------------------------------- the warp
def affine_matrices(boxes: torch.Tensor, angles: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 2, 3): centred output coordinates (u + 0.5 - size/2, v + 0.5 - size/2, 1) -> source position in
    photo pixels (pixel i spans [i, i + 1)). Crop, resize, rotate (counter-clockwise, as
    cv2.getRotationMatrix2D) and mirror in one matrix, the same as transforms.warp_crop's."""
    x, y, w, h = boxes.unbind(1)
    rad = torch.deg2rad(angles)
    c, s = torch.cos(rad), torch.sin(rad)
    f = 1.0 - 2.0 * flips.float()
    row0 = torch.stack([w / size * c * f, -w / size * s, x + w / 2], 1)
    row1 = torch.stack([h / size * s * f, h / size * c, y + h / 2], 1)
    return torch.stack([row0, row1], 1)


def warp(pixels: torch.Tensor, info: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """(B, side, side, 3) uint8 canvases -> (B, 3, size, size) float32 on the 0..255 scale, bilinear, each
    sample through its own `theta` (B, 2, 3) (see `affine_matrices`); reflected at the photo's edges."""
    B, side = pixels.shape[0], pixels.shape[1]
    theta = theta.float()
    t = torch.arange(size, dtype=torch.float32, device=pixels.device) + (0.5 - size / 2)
    # source pixel index (x, y) of every output pixel, planar (B, 2, size, size): separable, as
    # theta[:, :, 0] t[col] + (theta[:, :, 1] t[row] + theta[:, :, 2] - 0.5)
    across = theta[:, :, 0, None] * t
    down = theta[:, :, 1, None] * t + (theta[:, :, 2, None] - 0.5)
    idx = torch.add(across[:, :, None, :], down[:, :, :, None])
    # BORDER_REFLECT_101 into [0, last]: last - |last - |i||, exact for i in [-last, 2 last], which a crop
    # inside the photo never leaves (clamped beyond); fused with grid_sample's coordinate map
    # g = (2 i + 1) / side - 1 (align_corners=False), as in-place passes (planar: several times faster on
    # CPU than over interleaved (x, y) pairs)
    last = (info[:, [2, 1]] - 1).to(idx).reshape(B, 2, 1, 1)  # (width - 1, height - 1)
    lo, hi = 1.0 / side - 1.0, (2 * last + 1) / side - 1.0  # g of index 0 and of index last
    grid = idx.abs_().sub_(last).abs_().mul_(-2.0 / side).add_(hi).clamp_(min=lo).permute(0, 2, 3, 1)
    img = pixels.permute(0, 3, 1, 2).float()  # channels_last view of the HWC canvases
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


class DeviceAugment:
    """RawPhotos batch (on the training device) -> augmented, normalised (B, 3, S, S) float32, channels_last.

    Args:
        image_size: output side S; `size_at(epoch)` (progressive resizing) replaces it in `set_epoch`.
        mean, std: RGB on the 0..1 scale, as the worker pipeline's.
        scale, ratio, rotate_limit, hflip: as transforms.TrainTransform.
    """

    def __init__(self, image_size: int, mean, std, *, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3),
                 rotate_limit: float = 30, hflip: bool = True, size_at=None):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise MineralNetError(f"crop scale {tuple(scale)} must satisfy 0 < min <= max <= 1")
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise MineralNetError(f"mean {mean} / std {std} must be 3 RGB values on the 0..1 scale, std > 0")
        self.image_size, self.mean, self.std, self.size_at = int(image_size), mean, std, size_at
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.rotate_limit, self.hflip = float(rotate_limit), bool(hflip)
        # the worker pipeline's (v / 255 - mean) / std as v * scale + shift; copied to each device once
        std = torch.tensor(std, dtype=torch.float64)
        self._affine = {"cpu": ((1.0 / (255.0 * std)).float().reshape(1, 3, 1, 1),
                                (-torch.tensor(mean, dtype=torch.float64) / std).float().reshape(1, 3, 1, 1))}

    def __repr__(self):
        return (f"DeviceAugment(image_size={self.image_size}, scale={self.scale}, rotate_limit={self.rotate_limit}, "
                f"hflip={self.hflip}, mean={self.mean}, std={self.std})")

    def set_epoch(self, epoch: int) -> None:
        if self.size_at is not None:
            self.image_size = int(self.size_at(epoch))

    def params(self, info: torch.Tensor):
        """(boxes, angles, flips) for `info` (B, 3); see `draw_params`."""
        return draw_params(info, scale=self.scale, ratio=self.ratio, rotate_limit=self.rotate_limit,
                           hflip=self.hflip)

    @torch.no_grad()
    def __call__(self, batch: RawPhotos) -> torch.Tensor:
        pixels, info = batch
        S = self.image_size
        theta = affine_matrices(*self.params(info), S)
        out = warp(pixels, info, theta, S)
        key = str(out.device)
        if key not in self._affine:
            self._affine[key] = tuple(t.to(out.device) for t in self._affine["cpu"])
        scale, shift = self._affine[key]
        return torch.addcmul(shift, out, scale).contiguous(memory_format=torch.channels_last)
