"""What the phone-format runners (LiteRT .tflite, ExecuTorch .pte) share at run time: the metadata every
phone file carries (inside, or in the sidecar `<file>.json`), the one-line message when a runtime package is
missing, and running a fixed-batch model over any number of images. Writing them is mineralnet/export/phone.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mineralnet.errors import MineralNetError

METADATA_KEY = "mineralnet"  # the name of the metadata entry inside each phone format
# package to import -> (what needs it, pip install line)
PACKAGES = {
    "litert_torch": ("the LiteRT (.tflite) export", "pip install 'mineralnet[litert]'  (litert-torch, ai-edge-litert)"),
    "ai_edge_litert": ("running a .tflite model", "pip install ai-edge-litert  (or 'mineralnet[litert]')"),
    "ai_edge_quantizer": ("fp16/int8 .tflite files", "pip install 'mineralnet[litert]'  (ai-edge-quantizer)"),
    "executorch": ("ExecuTorch (.pte) export and runtime", "pip install 'mineralnet[executorch]'"),
    "coremltools": ("the Core ML (.mlpackage) export", "pip install 'mineralnet[coreml]'"),
}


def missing(module: str) -> str | None:
    """None when `module` imports, else the one line saying what needs it and how to install it."""
    if importlib.util.find_spec(module) is not None:
        return None
    what, install = PACKAGES[module]
    return f"{what} needs the {module.replace('_', '-')} package, which is not installed: {install}"


def require(*modules: str) -> None:
    for module in modules:
        line = missing(module)
        if line:
            raise MineralNetError(line)


def sidecar_path(path) -> Path:
    return Path(os.fspath(path) + ".json")


def read_sidecar(path) -> dict | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise MineralNetError(f"{side}: unreadable sidecar ({e}); export the model again") from None
    return meta if isinstance(meta, dict) else None


def check_meta(meta: dict | None, path) -> dict:
    keys = ("classes", "image_size", "resize", "mean", "std", "outputs")
    absent = [k for k in keys if not isinstance(meta, dict) or k not in meta]
    if absent:
        raise MineralNetError(f"{os.fspath(path)!r} carries no MineralNet metadata ({', '.join(absent)} missing) "
                              f"and has no {sidecar_path(path).name} beside it; export it with mineralnet-export")
    return meta


def run_fixed(call: Callable[[np.ndarray], list], images: np.ndarray, batch: int, names: Sequence[str]
              ) -> dict[str, np.ndarray]:
    """Run a fixed-batch model over (N, 3, S, S) images in chunks of `batch`, the last one padded."""
    parts: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(images), batch):
        x = np.ascontiguousarray(images[start:start + batch], dtype=np.float32)
        n = len(x)
        if n < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])
        for name, value in zip(names, call(x)):
            parts[name].append(np.asarray(value, np.float32)[:n])
    return {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in parts.items()}
