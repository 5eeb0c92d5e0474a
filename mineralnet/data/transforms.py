"""Augmentation and preprocessing: photo (H, W, 3) uint8 RGB -> normalised (3, S, S) float32 tensor.

    build_transforms(size, mean, std, train=...) -> TrainTransform | EvalTransform
    BatchMix                                     -> CutMix / mixup of a whole batch (soft targets)

The training transform does RandomResizedCrop + rotation + flip as ONE affine warp of the source
photo and normalises through per-channel lookup tables straight into a CHW tensor (bench/data_pipeline.py
measures it against the torchvision pipeline).
"""
from __future__ import annotations

import math
import os
import random

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mineralnet.errors import MineralNetError
from mineralnet.sizes import eval_resize


_CV2_THREADS_BEFORE_FORK: list[int] = []


def _cv2_serial_for_fork() -> None:
    # OpenCV's thread pool does not survive fork(): a forked DataLoader worker that touches it
    # (even cv2.setNumThreads) can hang. So the pool is stopped just before each fork and
    # restored in the parent right after; forked workers run OpenCV on one thread, which is
    # also what they should do (N workers x M OpenCV threads would oversubscribe the cores).
    _CV2_THREADS_BEFORE_FORK.append(cv2.getNumThreads())
    cv2.setNumThreads(1)


def _cv2_restore_after_fork() -> None:
    if _CV2_THREADS_BEFORE_FORK:
        cv2.setNumThreads(_CV2_THREADS_BEFORE_FORK.pop())


os.register_at_fork(before=_cv2_serial_for_fork, after_in_parent=_cv2_restore_after_fork,
                    after_in_child=_CV2_THREADS_BEFORE_FORK.clear)


class Transform:
    """Photo (H, W, 3) uint8 RGB -> normalised (3, S, S) float32 tensor.

    Call it as ``t(img)`` for the tensor, or albumentations-style as ``t(image=img)`` for
    ``{"image": tensor}``. Randomness comes from Python's `random` module (DataLoader seeds it
    in every worker) until `set_random_seed` gives the transform its own seeded generator.
    """

    min_decode_size: int  # load_image(min_size=...) that loses nothing this transform keeps

    def __init__(self, image_size: int, mean, std):
        if int(image_size) < 8:
            raise MineralNetError(f"image size {image_size} is too small; use at least 8 pixels (the paper uses 224)")
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise MineralNetError(f"mean {mean} / std {std} must be 3 RGB values on the 0..1 scale, std > 0")
        self.image_size, self.mean, self.std = int(image_size), mean, std
        # uint8 -> (x / 255 - mean) / std in float32, the same arithmetic as ToTensor + Normalize
        self._luts = [(np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(m)) / np.float32(s)
                      for m, s in zip(mean, std)]
        self._rng = random

    def set_random_seed(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def __call__(self, img=None, /, *, image=None):
        if image is not None:
            return {"image": self.apply(image)}
        if img is None:
            raise TypeError("pass the photo as t(img) or t(image=img)")
        return self.apply(img)

    def apply(self, img: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3 or 4) uint8 -> normalised (3, H, W) float32; channels beyond 3 are ignored."""
        h, w = rgb.shape[:2]
        out = np.empty((3, h, w), np.float32)
        for c, plane in enumerate(cv2.split(rgb)[:3]):
            cv2.LUT(plane, self._luts[c], dst=out[c])
        return torch.from_numpy(out)


class TrainTransform(Transform):
    """RandomResizedCrop + rotation (reflected border) + horizontal flip + Normalize, as ONE
    bilinear warp of the source photo. The result is the same as crop -> resize -> rotate ->
    flip except that corners uncovered by the rotation show the real surroundings of the crop
    (reflected only beyond the photo's edge) instead of a mirror of the crop. Crops more than
    2x larger than the output are first shrunk by an integer factor with INTER_AREA, so large
    photos are not aliased."""

    def __init__(self, image_size: int, mean, std, *, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3),
                 rotate_limit: float = 30, hflip: bool = True):
        super().__init__(image_size, mean, std)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise MineralNetError(f"crop scale {tuple(scale)} must satisfy 0 < min <= max <= 1")
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.rotate_limit, self.hflip = float(rotate_limit), bool(hflip)
        # the smallest crop side is sqrt(scale_min * 3/4) of the photo; keep that >= image_size
        self.min_decode_size = math.ceil(self.image_size / math.sqrt(self.scale[0] * self.ratio[0]))

    def __repr__(self):
        return (f"TrainTransform(image_size={self.image_size}, scale={self.scale}, rotate_limit={self.rotate_limit}, "
                f"hflip={self.hflip}, mean={self.mean}, std={self.std})")

    def params(self, height: int, width: int) -> tuple[tuple[float, float, float, float], float, bool]:
        """Draw ((x, y, w, h) crop box in source pixels, angle in degrees, flip)."""
        rng = self._rng
        box = _random_resized_crop_box(height, width, self.scale, self.ratio, rng)
        angle = rng.uniform(-self.rotate_limit, self.rotate_limit) if self.rotate_limit else 0.0
        flip = self.hflip and rng.random() < 0.5
        return box, angle, flip

    def apply(self, img: np.ndarray) -> torch.Tensor:
        box, angle, flip = self.params(*img.shape[:2])
        return self._to_tensor(_warp_crop_rgba(img, box, angle, flip, self.image_size))


def warp_crop(img: np.ndarray, box, angle: float, flip: bool, size: int) -> np.ndarray:
    """Crop `box` = (x, y, w, h) (source pixels, fractional allowed), resize it to size x size,
    rotate by `angle` degrees counter-clockwise about the centre (as cv2.getRotationMatrix2D)
    and optionally mirror, in one warp. Returns (size, size, 3) uint8."""
    return np.ascontiguousarray(_warp_crop_rgba(img, box, angle, flip, size)[:, :, :3])


def _warp_crop_rgba(img: np.ndarray, box, angle: float, flip: bool, size: int) -> np.ndarray:
    H, W = img.shape[:2]
    x, y, w, h = box
    rad = math.radians(angle)
    c, s = math.cos(rad), math.sin(rad)
    f = -1.0 if flip else 1.0
    # A: centred output coords -> source offsets from the crop centre = diag(w/S, h/S) @ R @ diag(f, 1)
    A = np.array([[w / size * c * f, -w / size * s], [h / size * s * f, h / size * c]])
    centre = np.array([x + w / 2, y + h / 2])
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * (size / 2) @ A.T + centre
    x0, y0 = (max(0, math.floor(v) - 1) for v in corners.min(0))
    x1, y1 = min(W, math.ceil(corners[:, 0].max()) + 1), min(H, math.ceil(corners[:, 1].max()) + 1)
    if x1 - x0 < 1 or y1 - y0 < 1:  # crop outside the photo cannot happen for boxes inside it
        x0, y0, x1, y1 = 0, 0, W, H
    sub = img[y0:y1, x0:x1]
    k = max(1, int(min(w, h, x1 - x0, y1 - y0) / size))  # integer pre-shrink: bilinear alone skips pixels
    if k > 1:
        sub = _shrink(sub, k)
    # OpenCV warps 4-channel uint8 with SIMD and 3-channel without: RGBA is ~2x faster overall
    sub = cv2.cvtColor(sub, cv2.COLOR_RGB2RGBA)
    # output pixel index u -> sub-image pixel index: ((centre + A (u + 0.5 - S/2)) - origin) / k - 0.5
    M = np.empty((2, 3))
    M[:, :2] = A / k
    M[:, 2] = (centre - (x0, y0)) / k - 0.5 + (A / k) @ np.array([0.5 - size / 2, 0.5 - size / 2])
    return cv2.warpAffine(sub, M, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)  # (size, size, 4)


def _shrink(img: np.ndarray, k: int) -> np.ndarray:
    """Average k x k blocks (OpenCV's fast integer INTER_AREA); drops the last < k rows/columns."""
    h, w = img.shape[0] // k, img.shape[1] // k
    return cv2.resize(img[:h * k, :w * k], (w, h), interpolation=cv2.INTER_AREA)


def _random_resized_crop_box(H: int, W: int, scale, ratio, rng) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop), in real numbers."""
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < w <= W and 0 < h <= H:
            return rng.uniform(0, W - w), rng.uniform(0, H - h), w, h
    if W / H < ratio[0]:
        w, h = W, W / ratio[0]
    elif W / H > ratio[1]:
        w, h = H * ratio[1], H
    else:
        w, h = W, H
    return (W - w) / 2, (H - h) / 2, w, h


class EvalTransform(Transform):
    """Resize the shorter side to `resize` (bilinear, after an integer INTER_AREA shrink when the
    photo is >= 2x larger), centre crop image_size x image_size (offset (size - crop) // 2),
    Normalize. Deterministic."""

    def __init__(self, image_size: int, mean, std, *, resize: int | None = None):
        super().__init__(image_size, mean, std)
        self.resize = int(resize) if resize else eval_resize(self.image_size)
        if self.resize < self.image_size:
            raise MineralNetError(f"resize {self.resize} is smaller than the crop {self.image_size}; use a resize "
                                  f">= image size (default {eval_resize(self.image_size)})")
        self.min_decode_size = self.resize

    def __repr__(self):
        return f"EvalTransform(image_size={self.image_size}, resize={self.resize}, mean={self.mean}, std={self.std})"

    def prepare(self, img: np.ndarray) -> np.ndarray:
        """The resize step alone: shorter side to `resize`. Idempotent, so a cache of prepared photos
        (training's validation set) gives exactly the tensors that `apply` gives from the files."""
        k = int(min(img.shape[:2]) / self.resize)
        if k > 1:  # same anti-aliasing as training: integer INTER_AREA shrink, then bilinear
            img = _shrink(img, k)
        H, W = img.shape[:2]
        s = self.resize / min(H, W)
        nh, nw = max(1, round(H * s)), max(1, round(W * s))
        if (nh, nw) != (H, W):
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        return img

    def apply(self, img: np.ndarray) -> torch.Tensor:
        img = self.prepare(img)
        nh, nw = img.shape[:2]
        top, left = (nh - self.image_size) // 2, (nw - self.image_size) // 2
        return self._to_tensor(img[top:top + self.image_size, left:left + self.image_size])


def build_transforms(image_size: int, mean, std, *, train: bool, resize: int | None = None,
                     scale=(0.35, 1.0), rotate_limit: int = 30, hflip: bool = True,
                     backend: str = "fast"):
    """The paper's preprocessing: img (H, W, 3) uint8 RGB -> (3, S, S) float32 tensor.

    train: RandomResizedCrop(image_size, scale) + rotation (+-rotate_limit degrees, reflected
    border) + horizontal flip + Normalize(mean, std). eval: resize the shorter side to `resize`
    (default ``eval_resize(image_size)``) + centre crop + Normalize. Mean/std are 0..1-scale RGB.

    Returns:
        backend "fast" (default): a `Transform`, callable as ``t(img) -> tensor`` or
        ``t(image=img) -> {"image": tensor}``. backend "albumentations": the equivalent
        ``A.Compose`` (``t(image=img)["image"]``; slower, for adding your own augmentations).
    """
    if backend == "albumentations":
        return _albumentations_pipeline(image_size, mean, std, train=train, resize=resize, scale=scale,
                                        rotate_limit=rotate_limit, hflip=hflip)
    if backend != "fast":
        raise MineralNetError(f"unknown transform backend {backend!r}; use 'fast' or 'albumentations'")
    if train:
        return TrainTransform(image_size, mean, std, scale=scale, rotate_limit=rotate_limit, hflip=hflip)
    return EvalTransform(image_size, mean, std, resize=resize)


def _albumentations_pipeline(image_size, mean, std, *, train, resize, scale, rotate_limit, hflip):
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    S = int(image_size)
    if train:
        ops = [A.RandomResizedCrop(size=(S, S), scale=tuple(scale), ratio=(3 / 4, 4 / 3)),
               A.Rotate(limit=rotate_limit, border_mode=cv2.BORDER_REFLECT_101, p=1.0 if rotate_limit else 0.0),
               A.HorizontalFlip(p=0.5 if hflip else 0.0)]
    else:
        ops = [A.SmallestMaxSize(max_size=int(resize or eval_resize(S)), area_for_downscale="image"),
               A.CenterCrop(S, S)]
    return A.Compose(ops + [A.Normalize(mean=list(mean), std=list(std), max_pixel_value=255.0), ToTensorV2()])


# ----------------------------------------------------------------------------- batch mixing
class BatchMix:
    """Mixup / CutMix of a batch with its reverse (timm's Mixup, batch mode): with probability
    `prob`, draw lam ~ Beta(a, a) and either blend the photos (mixup) or paste a box of area
    (1 - lam) from the partner (CutMix, lam then set to the exact kept area); with both alphas set,
    each mixed batch picks one at random. Returns soft targets lam * y + (1 - lam) * y_partner.

    The draw is seeded by (seed, global step, process), so a resumed run mixes exactly as an
    uninterrupted one. Under DDP each process mixes its own share of the batch (as timm does).
    """

    def __init__(self, num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                 seed: int = 0, rank: int = 0):
        self.num_classes, self.mixup, self.cutmix, self.prob = num_classes, mixup, cutmix, prob
        self.seed, self.rank = seed, rank

    def params(self, step: int, height: int, width: int):
        """(lam, box or None) for `step`; box = (y0, y1, x0, x1) pasted from the partner."""
        rng = np.random.default_rng([self.seed, step, self.rank])
        if rng.random() >= self.prob:
            return 1.0, None
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < 0.5)
        lam = float(rng.beta(*(2 * [self.cutmix if use_cutmix else self.mixup])))
        if not use_cutmix:
            return lam, None
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        return 1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int):
        lam, box = self.params(step, x.shape[-2], x.shape[-1])
        onehot = F.one_hot(y, self.num_classes).float()
        if lam >= 1.0:
            return x, onehot
        partner = x.flip(0)
        if box is None:
            x = x * lam + partner * (1.0 - lam)
        else:
            y0, y1, x0, x1 = box
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        return x, onehot * lam + onehot.flip(0) * (1.0 - lam)
