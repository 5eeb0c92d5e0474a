"""Decoding photos: `load_image(path) -> (H, W, 3) uint8 RGB, upright`, and `verify_image`.

Decoding is the hot path of training, so ordinary JPEGs go straight to OpenCV (libjpeg-turbo,
EXIF orientation applied) and everything unusual (PNG, WEBP, palette, alpha, CMYK, 16-bit,
truncated files) goes through Pillow, which is the judge of what is broken.
"""
from __future__ import annotations

import io
import os
import stat

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from mineralnet.errors import MineralNetError


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
    return decode_photo(path, read_photo_bytes(path), min_size=min_size)


def decode_photo(path: str, data: bytes, *, min_size: int | None = None) -> np.ndarray:
    """`load_image` of bytes already read from `path` (named in errors): the collection index reads
    each file once for its digest and its hash."""
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    if data[:3] == b"\xff\xd8\xff":
        img = _decode_jpeg_fast(path, data, min_size)
        if img is not None:
            return img
    return _decode_pil(path, data)


# Limits that bound what one accepted photo can cost to evaluate (the pixel cap is PIL.Image.MAX_IMAGE_PIXELS).
MAX_FILE_BYTES = int(float(os.environ.get("MINERALNET_MAX_PHOTO_MB", "200")) * 2**20)
MAX_ASPECT = 20  # longer side at most this many times the shorter one
# Decoded by content; every other format (EPS, PSD, ICO, ...) is refused without touching its plugin.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
ACCEPTED = "JPEG, PNG, WEBP, BMP, TIFF or GIF"


def read_photo_bytes(path: str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES. A FIFO, device or socket is refused before
    any read (opened non-blocking, checked with fstat), so it cannot hang or fill memory."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ImageDecodeError(path, e.strerror or str(e)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(path, "not a regular file (a FIFO, device or socket)")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageDecodeError(path, f"file of {st.st_size / 2**20:.0f} MB exceeds the {MAX_FILE_BYTES / 2**20:.0f}"
                                         f" MB limit per photo (MINERALNET_MAX_PHOTO_MB)")
        try:
            return f.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]
        except OSError as e:
            raise ImageDecodeError(path, e.strerror or str(e)) from None


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
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        raise ImageDecodeError(path, f"{w}x{h} pixels: the longer side is more than {MAX_ASPECT}x the shorter "
                                     f"(not a photo; resizing it would cost unbounded memory)")


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
        im = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(path, f"{_sniff(data)}; only {ACCEPTED} photos are read (convert it)") from None
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


def _sniff(data: bytes) -> str:
    """A short description of content that is not an accepted photo format."""
    if data[:4] in (b"%!PS", b"\xc5\xd0\xd3\xc6"):
        return "PostScript/EPS content (never rendered: it would run Ghostscript)"
    if data[4:8] == b"ftyp":
        return f"{data[8:12].decode('ascii', 'replace').strip()!r} (HEIC/AVIF-family) content"
    return "not an image in an accepted format"


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
