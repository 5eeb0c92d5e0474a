"""Every piece of metadata an export writes, in one place.

- inside the ONNX file: `onnx_props` (strings holding JSON: classes, preprocessing, precision, outputs,
  batch, the open-set calibration), stored by `set_onnx_metadata`, read back by `parse_metadata`; the
  OpenVINO IR carries the same strings in its rt_info (export/ir.py stores and reads them);
- beside a TensorRT engine: `engine_sidecar` (`<engine>.json`: what a plan file cannot hold);
- beside all of them: the manifest `model.json` (the run's metadata + one `file_record` per exported file).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Sequence

from mineralnet import __version__
from mineralnet.infer.metadata import major_of
from mineralnet.artifact import META_FILE

MANIFEST = META_FILE  # the export folder describes itself like a run: RUN/export/model.json
SIDECAR_FORMAT = "mineralnet-engine/2"  # /2: records tensorrt_major and strongly_typed
INPUT_NAME = "images"
PREPROCESS = ("decode (EXIF upright) -> resize shorter side to `resize` (area when shrinking, bilinear when "
              "enlarging) -> centre crop image_size -> x / 255 -> (x - mean) / std")
# metadata_props keys; every value is JSON text (the edge runner parses them with json.loads).
METADATA_KEYS = ("classes", "num_classes", "image_size", "resize", "mean", "std", "backbone", "stages",
                 "feature_dim", "precision", "outputs", "input", "batch", "mineralnet_version")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict:
    """The library versions an export was made with (recorded per file in the manifest)."""
    import onnx
    import onnxruntime
    import torch

    return {"mineralnet": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


# ----------------------------------------------------------------------------- inside the ONNX file / IR
def onnx_props(meta: dict, *, precision: str, outputs: Sequence[str], batch: dict) -> dict[str, str]:
    """The metadata stored inside the ONNX file (strings holding JSON), from a run's model.json."""
    values = {
        "classes": list(meta["classes"]), "num_classes": int(meta["num_classes"]),
        "image_size": int(meta["image_size"]), "resize": int(meta["resize"]),
        "mean": [float(m) for m in meta["mean"]], "std": [float(s) for s in meta["std"]],
        "backbone": meta["backbone"], "stages": list(meta["stages"]),
        "feature_dim": int(meta.get("feature_dim", 0)), "precision": precision, "outputs": list(outputs),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "color": "RGB",
                  "preprocess": PREPROCESS},
        "batch": batch, "mineralnet_version": __version__,
    }
    props = {k: json.dumps(values[k]) for k in METADATA_KEYS}
    if meta.get("calibration"):  # temperature, threshold, conformal scores (mineralnet.calibration)
        props["calibration"] = json.dumps(meta["calibration"])
    return props


def set_onnx_metadata(proto, props: dict[str, str]) -> None:
    """Replace the model-level metadata_props of `proto` by `props` (keeps nothing else)."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = proto.producer_name or "pytorch"
    proto.doc_string = (f"MineralNet {__version__} FusionNet; input `{INPUT_NAME}` (B,3,S,S) normalised RGB; "
                        f"class names and preprocessing in metadata_props")


# ----------------------------------------------------------------------------- beside a TensorRT engine
def engine_sidecar(meta: dict, *, precision: str, profile, onnx_file: str, onnx_sha256: str,
                   device: dict, outputs, workspace_mib: int) -> dict:
    """The `<engine>.json` contents: what the plan file cannot carry (the calibration too, when the run has one)."""
    s = int(meta["image_size"])
    side = {
        "format": SIDECAR_FORMAT,
        "classes": list(meta["classes"]), "num_classes": int(meta["num_classes"]),
        "image_size": s, "resize": int(meta["resize"]),
        "mean": [float(m) for m in meta["mean"]], "std": [float(v) for v in meta["std"]],
        "backbone": meta.get("backbone"), "stages": meta.get("stages"), "feature_dim": meta.get("feature_dim"),
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "color": "RGB",
                  "preprocess": "resize shorter side to `resize`, centre crop image_size, x/255, (x-mean)/std"},
        "outputs": list(outputs),
        "precision": precision,
        "profile": {**profile.to_dict(), "shapes": profile.shapes(s)},
        "tensorrt_version": device["tensorrt_version"], "tensorrt_major": major_of(device["tensorrt_version"]),
        "strongly_typed": True, "gpu": device["gpu"],
        "compute_capability": device["compute_capability"], "cuda": device.get("cuda"),
        "workspace_mib": int(workspace_mib),
        "onnx": {"file": onnx_file, "sha256": onnx_sha256},
        "mineralnet_version": __version__,
    }
    if meta.get("calibration"):  # temperature, threshold, conformal scores for `mineralnet predict`
        side["calibration"] = meta["calibration"]
    return side


# ----------------------------------------------------------------------------- the manifest
def file_record(name: str, data: bytes, record: dict) -> dict:
    """One exported file's manifest record: name, size, digest, time, then what its writer measured."""
    return {"file": name, "bytes": len(data), "sha256": sha256(data),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **record}


def update_manifest(path: Path, meta: dict, run: Path, name: str, record: dict) -> None:
    """Add (or replace) `name`'s record in the manifest at `path`, keeping the other files' records."""
    from mineralnet.files import atomic_write_json

    exports = {}
    if path.is_file():
        try:
            exports = json.loads(path.read_text()).get("exports", {})
        except (OSError, ValueError, AttributeError):
            exports = {}
    exports[name] = record
    atomic_write_json(path, {**meta, "exported_from": str(run), "exports": exports})
