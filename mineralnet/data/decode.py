"""Photo collections: scanning, robust decoding, checks, channel statistics, augmentation, splits.

    scan_dataset(DIR or CSV) -> DatasetIndex(classes, samples, bad)
    load_image(path)         -> (H, W, 3) uint8 RGB, upright
    build_transforms(...)    -> callable: img -> (3, S, S) float32 tensor
    stratified_kfold / stratified_split / save_splits / load_splits
    make_demo_dataset()      -> a small synthetic mineral set for demos and tests

Decoding is the hot path of training, so ordinary JPEGs go straight to OpenCV (libjpeg-turbo,
EXIF orientation applied) and everything unusual (PNG, WEBP, palette, alpha, CMYK, 16-bit,
truncated files) goes through Pillow, which is the judge of what is broken. The training
transform does RandomResizedCrop + rotation + flip as ONE affine warp of the source photo and
normalises through per-channel lookup tables straight into a CHW tensor (bench/data.py measures
it against the torchvision pipeline).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mineralnet.errors import MineralNetError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

_LAYOUT_HINT = "expected one sub-folder per mineral (DIR/quartz/*.jpg) or a CSV with columns path,label"


# ----------------------------------------------------------------------------- decoding
class ImageDecodeError(MineralNetError):
    """A photo that cannot be decoded; ``path`` and ``reason`` are kept for reports."""

    def __init__(self, path, reason: str):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"cannot read image {self.path}: {reason}; remove or replace the file "
                         f"(`mineralnet data check` lists every such file)")


def load_image(path, *, min_size: int | None = None) -> np.ndarray:
    """Decode a photo to an upright (H, W, 3) uint8 RGB array.

    Applies EXIF orientation; composites alpha and transparent palettes on white; converts
    CMYK, greyscale and 16-bit images (scaled, not clipped); recognises the format by content,
    not by extension.

    Args:
        min_size: if given, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling,
            several times faster) as long as its shorter side stays >= min_size.

    Raises:
        ImageDecodeError: empty, truncated or non-image files, and images with more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bombs).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageDecodeError(path, e.strerror or str(e)) from None
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    if data[:3] == b"\xff\xd8\xff":
        img = _decode_jpeg_fast(path, data, min_size)
        if img is not None:
            return img
    return _decode_pil(path, data)


def verify_image(path) -> str | None:
    """None if `path` decodes, else the reason it does not (decodes JPEGs at 1/8 scale: fast)."""
    try:
        load_image(path, min_size=1)
    except ImageDecodeError as e:
        return e.reason
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_CV2_REDUCED = {1: cv2.IMREAD_COLOR_RGB, 2: cv2.IMREAD_REDUCED_COLOR_2,
                4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the JPEG frame header, or None if it cannot be found."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # scan or end before any frame header
            return None
        if marker in _JPEG_SOF:
            if i + 10 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            return (w, h, data[i + 9]) if w and h else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _check_pixels(path: str, w: int, h: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise ImageDecodeError(path, f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of "
                                     f"{limit} (PIL.Image.MAX_IMAGE_PIXELS)")


def _decode_jpeg_fast(path: str, data: bytes, min_size: int | None) -> np.ndarray | None:
    """OpenCV decode of an ordinary (greyscale or YCbCr, complete) JPEG; None means 'ask Pillow'."""
    head = _jpeg_header(data)
    if head is None:
        return None
    w, h, ncomp = head
    _check_pixels(path, w, h)
    # OpenCV decodes a truncated JPEG without complaint (grey fill), so only files that end with
    # the EOI marker take this path; Pillow judges the rest. CMYK/YCCK (4 components) go to Pillow.
    if ncomp not in (1, 3) or not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return None
    factor = 1
    if min_size:
        while factor < 8 and min(w, h) // (factor * 2) >= min_size:
            factor *= 2
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_REDUCED[factor])  # applies EXIF orientation
    if img is None or img.ndim != 3:
        return None
    if factor > 1:  # the reduced modes only decode to BGR
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


# EXIF orientation -> how to make the array upright (same as PIL.ImageOps.exif_transpose).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: a.transpose(1, 0, 2)[::-1],
}


def _png_webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or WEBP header, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":  # extended: 24-bit (width - 1), (height - 1)
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if chunk == b"VP8L":  # lossless: 14-bit (width - 1), (height - 1) after the 0x2f signature
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 ":  # lossy key frame
            return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _decode_pil(path: str, data: bytes) -> np.ndarray:
    size = _png_webp_size(data)
    if size:  # refuse a bomb before Pillow merely warns about it
        _check_pixels(path, *size)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image (content is not a format Pillow can read)") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(path, "decompression bomb: more than twice PIL.Image.MAX_IMAGE_PIXELS") from None
    except Exception as e:  # a broken header can raise almost anything inside a Pillow plugin
        raise ImageDecodeError(path, f"unreadable image header ({type(e).__name__}: {e})") from None
    _check_pixels(path, *im.size)
    try:
        im.load()
        try:
            orientation = int(im.getexif().get(0x0112, 1))
        except Exception:  # malformed EXIF must not make a good photo unreadable
            orientation = 1
        img = _to_rgb(im)
    except Exception as e:  # truncated or corrupt pixel data: Pillow raises OSError, SyntaxError, ...
        reason = str(e) or type(e).__name__
        if "truncated" in reason:
            reason = f"truncated file ({reason})"
        raise ImageDecodeError(path, reason) from None
    if orientation in _ORIENT:
        img = np.ascontiguousarray(_ORIENT[orientation](img))
    return img


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> (H, W, 3) uint8 RGB; alpha composited on white."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float greyscale
        a = np.asarray(im)
        if mode == "F":  # float images: 0..1 if they fit, else 0..255
            scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
            grey = np.rint(np.clip(np.nan_to_num(a) * scale, 0, 255)).astype(np.uint8)
        else:  # treat as 16-bit: 0..65535 -> 0..255 by rounding x / 257 (65535 = 255 * 257)
            a = np.clip(a.astype(np.int64), 0, 65535)
            grey = ((a + 128) // 257).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    elif mode in ("L", "RGB") and "transparency" in im.info:  # PNG colour-key transparency
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        a = np.asarray(im).astype(np.uint16)
        alpha = a[:, :, 3:]
        rgb = (a[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255  # composite on white
        return rgb.astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK (incl. Adobe inverted), YCbCr, LAB, HSV
    return np.array(im)


# ----------------------------------------------------------------------------- scanning
@dataclass
class DatasetIndex:
    """The photos of a collection: class names, (path, label) samples and unreadable files."""

    root: str  # folder or CSV it came from
    classes: list[str]  # sorted class names; index = label
    samples: list[tuple[str, int]]  # (absolute path, label), sorted by (class, path)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), not in samples
    empty: list[str] = field(default_factory=list)  # classes without a single readable photo

    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
            counts[self.classes[label]] += 1
        return counts

    @property
    def base(self) -> Path:
        """Folder that relative sample paths refer to (the CSV's folder for a manifest)."""
        root = Path(self.root)
        return root.parent if root.suffix.lower() == ".csv" and root.is_file() else root


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursively), skipping hidden files and folders; sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if _is_image_name(f)]
    return sorted(os.path.abspath(p) for p in found)


def scan_dataset(path, *, verify: bool = True, classes: list[str] | None = None,
                 allow_empty: bool = False) -> DatasetIndex:
    """Index a class-folder tree or a CSV manifest (header ``path,label``, label = class name).

    Args:
        verify: decode-check every file (in threads); failures go to ``.bad``, not ``.samples``.
        classes: map class names onto this list (evaluating a trained model on other photos);
            a class that is not in it is an error.
        allow_empty: report classes without readable photos in ``.empty`` instead of raising
            (used by ``mineralnet data check``).
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise MineralNetError(f"data path {p} does not exist; {_LAYOUT_HINT}")
    if p.is_dir():
        names, files, seen = _scan_folder(p, classes)
    elif p.suffix.lower() == ".csv":
        names, files, seen = _scan_csv(p, classes)
    else:
        raise MineralNetError(f"data path {p} is neither a folder nor a .csv manifest; {_LAYOUT_HINT}")
    bad: list[tuple[str, str]] = []
    if verify and files:
        paths = [f for f, _ in files]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            reasons = list(pool.map(verify_image, paths, chunksize=16))
        bad = [(f, r) for f, r in zip(paths, reasons) if r is not None]
        files = [s for s, r in zip(files, reasons) if r is None]
    samples = sorted(files, key=lambda s: (s[1], s[0]))
    present = {names[label] for _, label in samples}
    empty = [c for c in names if c in seen and c not in present]
    if empty and not allow_empty:
        raise MineralNetError(
            f"class(es) without readable photos in {p}: {', '.join(empty)}; add photos or remove the "
            f"class (`mineralnet data check {p}` shows the details)")
    return DatasetIndex(os.path.abspath(p), names, samples, bad, empty)  # not resolve(): keep symlinked roots


def _class_list(found: Sequence[str], classes: list[str] | None, where: Path) -> list[str]:
    if classes is None:
        return sorted(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise MineralNetError(
            f"{where} has class(es) {', '.join(unknown)} that the model does not know (it knows "
            f"{', '.join(classes)}); remove or rename them")
    return list(classes)


def _scan_folder(root: Path, classes: list[str] | None):
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise MineralNetError(f"no class folders in {root}; {_LAYOUT_HINT}")
    names = _class_list(dirs, classes, root)
    files = [(f, names.index(d)) for d in dirs for f in _list_images(root / d)]
    return names, files, set(dirs)


def _scan_csv(csv_path: Path, classes: list[str] | None):
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"path", "label"} - set(reader.fieldnames or [])
            if missing:
                raise MineralNetError(
                    f"{csv_path} lacks the column(s) {', '.join(sorted(missing))}; the first line must be "
                    f"a header with at least: path,label")
            rows = [(n, (r["path"] or "").strip(), (r["label"] or "").strip()) for n, r in enumerate(reader, 2)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MineralNetError(f"cannot read the CSV manifest {csv_path}: {e}; save it as UTF-8 text") from None
    if not rows:
        raise MineralNetError(f"{csv_path} lists no photos; add one line per photo: path,label")
    for line, rel, label in rows:
        if not rel or not label:
            raise MineralNetError(f"{csv_path} line {line}: empty path or label; fill in both columns")
        full = base / os.path.expanduser(rel)
        if not full.is_file():
            raise MineralNetError(f"{csv_path} line {line}: file {full} does not exist; fix the path "
                                  f"(relative paths are read from {base})")
    seen = {label for _, _, label in rows}
    names = _class_list(seen, classes, csv_path)
    files = [(os.path.abspath(base / os.path.expanduser(rel)), names.index(label)) for _, rel, label in rows]
    return names, files, seen


# ----------------------------------------------------------------------------- statistics
def channel_stats(paths, *, size: int = 64, max_images: int | None = None,
                  seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel RGB mean and std (0..1 scale) over all pixels of the given photos.

    Each photo is decoded with ``load_image(p, min_size=size)`` and resized to size x size
    (INTER_AREA), so every photo weighs the same whatever its resolution. The sums are exact
    integers, so the result equals numpy's mean/std (population) over the stacked pixels.

    Args:
        max_images: use a deterministic random subset (by `seed`) of at most this many photos.

    Returns:
        (mean, std), each [R, G, B].
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise MineralNetError("no photos to compute the channel mean/std from; check the data folder")
    if max_images is not None and len(paths) > max_images:
        keep = sorted(random.Random(seed).sample(range(len(paths)), max_images))
        paths = [paths[i] for i in keep]

    def sums(p):
        small = cv2.resize(load_image(p, min_size=size), (size, size), interpolation=cv2.INTER_AREA)
        v = small.reshape(-1, 3).astype(np.int64)
        return v.sum(0), (v * v).sum(0)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(sums, paths))
    n = len(paths) * size * size
    s = [int(sum(p[0][c] for p in parts)) for c in range(3)]
    ss = [int(sum(p[1][c] for p in parts)) for c in range(3)]
    mean = [s[c] / (n * 255) for c in range(3)]
    std = [math.sqrt(n * ss[c] - s[c] * s[c]) / (n * 255) for c in range(3)]  # exact variance numerator
    return mean, std


# ----------------------------------------------------------------------------- transforms
def eval_resize(image_size: int) -> int:
    """Default shorter-side resize before the evaluation centre crop: round(image_size / 0.875)."""
    return round(image_size / 0.875)


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


class ImageDataset(torch.utils.data.Dataset):
    """(float32 CHW tensor, int label) for each (path, label) sample.

    A file that fails to decode raises ImageDecodeError naming it (scan_dataset(verify=True)
    should have excluded it). JPEGs are decoded at reduced scale when the transform's
    ``min_decode_size`` allows it (large photos only).
    """

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples = list(samples)
        self.transform = transform
        self.min_size = getattr(transform, "min_decode_size", None)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_image(path, min_size=self.min_size)
        if isinstance(self.transform, Transform):
            return self.transform(img), int(label)
        return self.transform(image=img)["image"], int(label)


# ----------------------------------------------------------------------------- splits
def _groups(labels) -> dict:
    groups: dict = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return dict(sorted(groups.items(), key=lambda kv: str(kv[0]) if not isinstance(kv[0], int) else kv[0]))


def _class_name(label, classes) -> str:
    return str(classes[label]) if classes is not None and isinstance(label, int) else str(label)


def stratified_kfold(labels, folds: int, seed: int = 0, *, classes: list[str] | None = None) -> list[list[int]]:
    """`folds` lists of validation indices: disjoint, covering every index, each class spread
    so that its per-fold counts differ by at most 1 (fold sizes too). Deterministic for a seed.

    Args:
        labels: one label per sample (ints or names).
        classes: class names for integer labels, used in error messages.
    """
    if int(folds) < 2:
        raise MineralNetError(f"folds={folds}: cross-validation needs at least 2 folds")
    groups = _groups(labels)
    small = [(lab, len(ix)) for lab, ix in groups.items() if len(ix) < folds]
    if small:
        lab, n = min(small, key=lambda t: t[1])
        raise MineralNetError(
            f"class {_class_name(lab, classes)!r} has only {n} photo(s), fewer than the {folds} folds; "
            f"use at most {n} folds or add photos of it")
    rng = random.Random(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    start = 0  # continue the round-robin across classes so fold sizes stay within 1 as well
    for ix in groups.values():
        ix = list(ix)
        rng.shuffle(ix)
        for j, i in enumerate(ix):
            out[(start + j) % folds].append(i)
        start = (start + len(ix)) % folds
    return [sorted(f) for f in out]


def stratified_split(labels, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train indices, val indices): round(n * val_fraction) of each class to val, but at least
    one (and at most n - 1) for a class with >= 2 photos. Deterministic for a seed."""
    if not 0 < val_fraction < 1:
        raise MineralNetError(f"validation fraction {val_fraction} must be between 0 and 1 (e.g. 0.2)")
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    for ix in _groups(labels).values():
        ix = list(ix)
        rng.shuffle(ix)
        n = len(ix)
        k = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
        val += ix[:k]
        train += ix[k:]
    return sorted(train), sorted(val)


SPLITS_FORMAT = "mineralnet-splits/1"


def save_splits(path, index: DatasetIndex, splits: dict) -> None:
    """Write splits as JSON: class names and, per split, [relative path, class name] pairs.

    Args:
        splits: name -> indices into ``index.samples`` or (path, label) samples.
    """
    base = index.base
    out = {}
    for name, items in splits.items():
        rows = []
        for item in items:
            p, label = index.samples[item] if isinstance(item, (int, np.integer)) else item
            rows.append([Path(os.path.relpath(p, base)).as_posix(), index.classes[int(label)]])
        out[str(name)] = rows
    doc = {"format": SPLITS_FORMAT, "root": str(index.root), "classes": list(index.classes), "splits": out}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def load_splits(path, root=None) -> dict:
    """Read a `save_splits` file. Returns {"root", "classes", "splits": name -> [(absolute path,
    label)]} with paths resolved against `root` (default: the root saved in the file; pass the
    new location of a moved collection). A missing file is an error."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MineralNetError(f"cannot read splits file {path}: {e}; pass a file written by save_splits") from None
    if not isinstance(doc, dict) or doc.get("format") != SPLITS_FORMAT:
        raise MineralNetError(f"{path} is not a MineralNet splits file ({SPLITS_FORMAT}); pass one written by save_splits")
    saved = Path(doc["root"])
    base = Path(root) if root is not None else (saved.parent if saved.suffix.lower() == ".csv" else saved)
    if base.suffix.lower() == ".csv":
        base = base.parent
    classes = list(doc["classes"])
    lookup = {c: i for i, c in enumerate(classes)}
    splits = {}
    for name, rows in doc["splits"].items():
        items = []
        for rel, cls in rows:
            full = base / rel
            if not full.is_file():
                raise MineralNetError(f"{path}: split {name!r} lists {full}, which does not exist; pass root= "
                                      f"the collection's current folder")
            items.append((os.path.abspath(full), lookup[cls]))
        splits[name] = items
    return {"root": str(base), "classes": classes, "splits": splits}


# ----------------------------------------------------------------------------- demo set
DEMO_MINERALS = ("pyrite", "malachite", "quartz", "amethyst", "hematite", "azurite", "chrysocolla", "biotite")
_DEMO_VERSION = 1


def make_demo_dataset(root=None, *, classes: int = 6, per_class: int = 60, size: int = 96,
                      seed: int = 0) -> Path:
    """Write (or reuse) a synthetic, deterministic set of mineral-like photos; return its folder.

    Classes (first `classes` of DEMO_MINERALS) differ in colour, texture and crystal habit:
    brassy striated cubes, green banded nodules, clear hexagonal prisms, purple crystal
    clusters, grey metallic botryoids, deep-blue blades, cyan mottled masses, dark mica books;
    backgrounds, position, scale, rotation, lighting and noise vary, and neighbouring hues
    overlap, so the task is learnable but not trivial.

    Args:
        root: folder to write to; default $MINERALNET_CACHE (or ~/.cache/mineralnet) /
            demo-v1-<params>. A complete set already there is reused. The set is written to a
            temporary sibling and renamed, so a half-written set is never reused.
    """
    if not 2 <= classes <= len(DEMO_MINERALS):
        raise MineralNetError(f"demo classes={classes}: choose 2..{len(DEMO_MINERALS)}")
    if per_class < 1 or size < 32:
        raise MineralNetError(f"demo per_class={per_class}, size={size}: need per_class >= 1 and size >= 32")
    params = {"version": _DEMO_VERSION, "classes": classes, "per_class": per_class, "size": size, "seed": seed}
    if root is None:
        cache = Path(os.environ.get("MINERALNET_CACHE") or Path.home() / ".cache" / "mineralnet")
        root = cache / f"demo-v{_DEMO_VERSION}-c{classes}-n{per_class}-s{size}-seed{seed}"
    root = Path(os.path.expanduser(os.fspath(root)))
    marker = root / ".mineralnet-demo.json"
    if _demo_complete(marker, params):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise MineralNetError(f"{root} exists and is not a demo set with these parameters; pass an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for ci, name in enumerate(DEMO_MINERALS[:classes]):
            (tmp / name).mkdir()
            for i in range(per_class):
                img = _draw_demo(name, np.random.default_rng([seed, ci, i]), size)
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
                (tmp / name / f"{name}_{i:04d}.jpg").write_bytes(buf.tobytes())
        (tmp / marker.name).write_text(json.dumps(params) + "\n")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, root)  # atomic; replaces an empty folder
        except OSError:
            if not _demo_complete(marker, params):  # another process may have just finished it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _demo_complete(marker: Path, params: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


def _draw_demo(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One synthetic photo (size, size, 3) uint8 RGB, drawn at 2x and shrunk (anti-aliasing)."""
    S = 2 * size
    img = _background(rng, S)
    cx, cy = rng.uniform(0.3, 0.7, 2) * S
    scale = rng.uniform(0.55, 1.0) * S
    angle = rng.uniform(0, 2 * math.pi)
    _DRAWERS[name](img, rng, (cx, cy), scale, angle)
    img *= rng.uniform(0.75, 1.2)  # exposure
    img += rng.uniform(-15, 15, 3)  # white balance
    if rng.random() < 0.3:
        img[:] = cv2.GaussianBlur(img, (0, 0), rng.uniform(1.0, 2.5))
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    img += rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _background(rng, S: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # studio backdrop: plain neutral gradient
        base = rng.choice([235.0, 200.0, 130.0, 35.0]) + rng.uniform(-15, 15)
        ramp = np.linspace(-1, 1, S, dtype=np.float32)[:, None, None] * rng.uniform(0, 25)
        return np.broadcast_to(base + ramp + rng.uniform(-8, 8, 3).astype(np.float32), (S, S, 3)).copy()
    colour = np.array([rng.uniform(90, 160), rng.uniform(75, 130), rng.uniform(55, 110)], np.float32)
    if kind == 1:  # rock matrix: brownish-grey mottling
        return colour + _noise(rng, S, 8) * rng.uniform(20, 45)
    return colour * 0.6 + _noise(rng, S, 24) * 25  # darker fine-grained host rock


def _noise(rng, S: int, cells: int) -> np.ndarray:
    """Smooth value noise in about [-1, 1], (S, S, 1) float32."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (S, S), interpolation=cv2.INTER_CUBIC)[:, :, None]


def _rot(points, centre, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    p = np.asarray(points, np.float64)
    return np.stack([p[:, 0] * c - p[:, 1] * s, p[:, 0] * s + p[:, 1] * c], 1) + centre


def _fill(img: np.ndarray, pts, colour, alpha: float = 1.0) -> None:
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(pts) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    _blend(img, mask, colour, alpha)


def _blend(img, mask, colour, alpha: float = 1.0) -> None:
    m = mask.astype(np.float32)[:, :, None] * (alpha / 255)
    img *= 1 - m
    img += m * np.asarray(colour, np.float32)


def _jitter(rng, rgb, amount: float = 18) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _pyrite(img, rng, centre, scale, angle):
    """Brassy cubes with striated faces."""
    brass = _jitter(rng, (205, 175, 80))
    for _ in range(rng.integers(1, 4)):
        e = scale * rng.uniform(0.18, 0.32)
        c = np.asarray(centre) + rng.uniform(-0.25, 0.25, 2) * scale
        a = angle + rng.uniform(-0.4, 0.4)
        d = e * 0.45  # oblique depth
        top = [(-e / 2, -e / 2), (e / 2, -e / 2), (e / 2 + d, -e / 2 - d), (-e / 2 + d, -e / 2 - d)]
        side = [(e / 2, -e / 2), (e / 2 + d, -e / 2 - d), (e / 2 + d, e / 2 - d), (e / 2, e / 2)]
        front = [(-e / 2, -e / 2), (e / 2, -e / 2), (e / 2, e / 2), (-e / 2, e / 2)]
        for face, shade in ((front, 1.0), (top, 1.2), (side, 0.7)):
            _fill(img, _rot(face, c, a), np.clip(brass * shade, 0, 255))
        for t in np.linspace(-0.4, 0.4, 5):  # striations
            p = _rot([(-e / 2, t * e), (e / 2, t * e)], c, a)
            cv2.line(img, tuple(np.round(p[0]).astype(int)), tuple(np.round(p[1]).astype(int)),
                     tuple(float(v) for v in brass * 0.8), 1, cv2.LINE_AA)


def _malachite(img, rng, centre, scale, angle):
    """Green nodule with concentric light/dark bands."""
    S = img.shape[0]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    a, b = scale * rng.uniform(0.3, 0.45), scale * rng.uniform(0.22, 0.35)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (xx - centre[0]) * c + (yy - centre[1]) * s, -(xx - centre[0]) * s + (yy - centre[1]) * c
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 0.06 * np.sin(np.arctan2(v, u) * rng.integers(3, 7))
    bands = 0.5 + 0.5 * np.sin(r * rng.uniform(18, 30))
    dark, light = _jitter(rng, (25, 95, 55), 12), _jitter(rng, (80, 185, 110), 15)
    col = dark + (light - dark) * bands[:, :, None]
    mask = np.clip((1.0 - r) * 40, 0, 1)[:, :, None]
    img *= 1 - mask
    img += mask * col


def _quartz(img, rng, centre, scale, angle):
    """Clear-white hexagonal prisms with pointed terminations (semi-transparent)."""
    white = _jitter(rng, (232, 232, 236), 10)
    for _ in range(rng.integers(1, 5)):
        L, W = scale * rng.uniform(0.35, 0.6), scale * rng.uniform(0.09, 0.16)
        c = np.asarray(centre) + rng.uniform(-0.2, 0.2, 2) * scale
        a = angle + rng.uniform(-0.6, 0.6)
        body = [(-W, L / 2), (W, L / 2), (W, -L / 2), (0, -L / 2 - W * 1.4), (-W, -L / 2)]
        _fill(img, _rot(body, c, a), white, rng.uniform(0.55, 0.85))
        _fill(img, _rot([(-W / 3, L / 2), (W / 3, L / 2), (W / 3, -L / 2), (0, -L / 2 - W * 1.2),
                         (-W / 3, -L / 2)], c, a), white * 1.05, 0.5)  # bright central face


def _amethyst(img, rng, centre, scale, angle):
    """Cluster of purple pointed crystals radiating from a base (geode)."""
    purple = _jitter(rng, (135, 70, 175), 20)
    n = rng.integers(8, 18)
    for k in range(n):
        a = angle + rng.uniform(-1.1, 1.1)
        L, W = scale * rng.uniform(0.15, 0.35), scale * rng.uniform(0.04, 0.08)
        base = np.asarray(centre) + rng.uniform(-0.15, 0.15, 2) * scale
        tri = [(-W, 0), (W, 0), (W * 0.7, -L * 0.7), (0, -L), (-W * 0.7, -L * 0.7)]
        _fill(img, _rot(tri, base, a), np.clip(purple * rng.uniform(0.6, 1.25), 0, 255))


def _hematite(img, rng, centre, scale, angle):
    """Grey metallic botryoidal spheres with specular highlights."""
    S = img.shape[0]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    grey = _jitter(rng, (70, 70, 76), 12)
    for _ in range(rng.integers(4, 10)):
        c = np.asarray(centre) + rng.uniform(-0.3, 0.3, 2) * scale
        r = scale * rng.uniform(0.08, 0.17)
        d = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / r
        mask = np.clip((1 - d) * r / 1.5, 0, 1)[:, :, None]
        hx, hy = c[0] - 0.35 * r, c[1] - 0.35 * r
        spec = np.exp(-(((xx - hx) ** 2 + (yy - hy) ** 2) / (0.3 * r) ** 2))[:, :, None]
        col = grey * (1.1 - 0.5 * np.clip(d, 0, 1))[:, :, None] + 160 * spec
        img *= 1 - mask
        img += mask * col


def _azurite(img, rng, centre, scale, angle):
    """Deep-blue bladed crystals in a rosette."""
    blue = _jitter(rng, (30, 55, 165), 18)
    n = rng.integers(10, 22)
    for k in range(n):
        a = angle + 2 * math.pi * k / n + rng.uniform(-0.2, 0.2)
        L, W = scale * rng.uniform(0.2, 0.4), scale * rng.uniform(0.015, 0.035)
        blade = [(-W, 0), (W, 0), (W, -L), (0, -L - W * 2), (-W, -L)]
        _fill(img, _rot(blade, centre, a), np.clip(blue * rng.uniform(0.55, 1.3), 0, 255))


def _chrysocolla(img, rng, centre, scale, angle):
    """Cyan-turquoise mottled mass."""
    S = img.shape[0]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    a, b = scale * rng.uniform(0.3, 0.45), scale * rng.uniform(0.25, 0.4)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (xx - centre[0]) * c + (yy - centre[1]) * s, -(xx - centre[0]) * s + (yy - centre[1]) * c
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 0.25 * _noise(rng, S, 6)[:, :, 0]
    mottle = _noise(rng, S, 20)
    col = _jitter(rng, (70, 185, 195), 20) + mottle * np.array([15, 35, 30], np.float32)
    mask = np.clip((1.0 - r) * 30, 0, 1)[:, :, None]
    img *= 1 - mask
    img += mask * col


def _biotite(img, rng, centre, scale, angle):
    """Dark brown-black mica books: stacked hexagonal plates with bright cleavage edges."""
    brown = _jitter(rng, (60, 42, 28), 12)
    W = scale * rng.uniform(0.22, 0.38)
    hexagon = [(W * math.cos(t), 0.55 * W * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 7)[:-1]]
    layers = rng.integers(5, 10)
    for k in range(layers):
        off = np.array([0.0, scale * 0.02 * (layers / 2 - k)])
        _fill(img, _rot(hexagon, np.asarray(centre) + _rot([off], (0, 0), angle)[0], angle),
              np.clip(brown * (0.8 + 0.5 * (k == layers - 1)) + (45 if k % 2 else 0), 0, 255))


_DRAWERS = {"pyrite": _pyrite, "malachite": _malachite, "quartz": _quartz, "amethyst": _amethyst,
            "hematite": _hematite, "azurite": _azurite, "chrysocolla": _chrysocolla, "biotite": _biotite}


# ----------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="count photos per class and list every unreadable file "
                                         "(exit 1 if any file is unreadable or a class is empty)")
    check.add_argument("path", metavar="DIR", help="class-folder root (DIR/<class>/*.jpg) or CSV manifest (path,label)")
    check.add_argument("--stats", action="store_true", help="also print the RGB mean/std (0..1) used to normalise")
    demo = sub.add_parser("demo", help="write the synthetic demo set (reused if present) and print its folder")
    demo.add_argument("--out", default=None, help="folder (default: $MINERALNET_CACHE or ~/.cache/mineralnet)")
    demo.add_argument("--classes", type=int, default=6, help="number of minerals (2..8; default 6)")
    demo.add_argument("--per-class", type=int, default=60, help="photos per mineral (default 60)")
    demo.add_argument("--size", type=int, default=96, help="side of each photo in pixels (default 96)")
    demo.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    if args.action == "demo":
        print(make_demo_dataset(args.out, classes=args.classes, per_class=args.per_class, size=args.size,
                                seed=args.seed))
        return 0
    return _check(args.path, stats=args.stats)


def _check(path, *, stats: bool) -> int:
    index = scan_dataset(path, verify=True, allow_empty=True)
    counts = index.counts()
    total = sum(counts.values())
    width = max(len("class"), *(len(c) for c in counts))
    print(f"{index.root}: {len(index.classes)} classes, {total} readable photos, {len(index.bad)} unreadable")
    print(f"  {'class':<{width}}  {'photos':>7}  {'share':>6}")
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>7}  {100 * n / max(total, 1):>5.1f}%")
    print(f"  {'total':<{width}}  {total:>7}")
    nonzero = [n for n in counts.values() if n]
    if nonzero:
        print(f"smallest/largest class: {min(nonzero)}/{max(nonzero)} photos")
    if index.bad:
        print(f"unreadable files ({len(index.bad)}), excluded from training:")
        for p, reason in index.bad:
            print(f"  {p}: {reason}")
    if index.empty:
        print(f"classes without readable photos: {', '.join(index.empty)}")
    if stats and index.samples:
        mean, std = channel_stats([p for p, _ in index.samples])
        print(f"RGB mean {[round(m, 4) for m in mean]}  std {[round(s, 4) for s in std]}  (0..1 scale, 64x64 per photo)")
    return 1 if index.bad or index.empty else 0
