"""A synthetic, deterministic set of mineral-like photos for the demo and the tests.

    make_demo_dataset() -> folder with one sub-folder per mineral (DEMO_MINERALS)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from mineralnet.errors import MineralNetError


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
