"""What the phone formats (LiteRT .tflite, ExecuTorch .pte, Core ML .mlpackage) share.

- the metadata every phone file carries: the same fields as the ONNX metadata_props (class names,
  image_size, resize, mean/std, the preprocessing rule, outputs, precision, and for a calibrated run
  the temperature, "unknown" threshold and conformal scores), as one JSON object, embedded in the
  format's own metadata (TFLite Model.metadata, an ExecuTorch constant method, Core ML
  user_defined_metadata) and ALWAYS in a sidecar `<file>.json` beside it, so an app needs nothing else;
- the one-line message when a format's package is missing;
- the checks after export: fp32/fp16 parity with PyTorch (the ONNX tolerances of
  `mineralnet.export.onnx.compare`) and the int8 gate (top-1 agreement with PyTorch fp32, and with
  --val-data the accuracy drop; the same minimum and maximum as the int8 ONNX file).

The runners (`tflite.LiteRTRunner`, `executorch.ExecuTorchRunner`) give `Predictor` and the benchmarks
`{output name: (N, ...) float32}` like ONNX Runtime does.
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
SIDECAR_FORMAT = "mineralnet-phone-model/1"

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


def fixed_batch(ctx) -> int:
    """Phone formats are fixed-batch files (the apps feed one photo at a time)."""
    p = ctx.options.profile
    if p.dynamic:
        raise MineralNetError("--tflite, --executorch and --coreml write fixed-batch models; drop --dynamic "
                              "(and pass --batch N for a batch other than 1)")
    return int(p.max)


def metadata(ctx, *, fmt: str, precision: str) -> dict:
    """The JSON object every phone file carries (the ONNX metadata_props, parsed, plus the format)."""
    from mineralnet.export import onnx as xonnx

    props = xonnx.metadata_props(ctx.meta, precision=precision, outputs=ctx.options.outputs, batch=ctx.batch_info())
    return {"format": SIDECAR_FORMAT, "runtime": fmt, **{k: json.loads(v) for k, v in props.items()}}


def sidecar_path(path) -> Path:
    return Path(os.fspath(path) + ".json")


def write_sidecar(path, meta: dict, data_sha256: str | None = None) -> Path:
    """`<file>.json` beside the model (written before the model: a model without it still has its metadata
    inside, but the app contract is the pair)."""
    from mineralnet.runs import atomic_write_json

    side = sidecar_path(path)
    atomic_write_json(side, {**meta, "file": Path(path).name, **({"sha256": data_sha256} if data_sha256 else {})})
    return side


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


# ----------------------------------------------------------------------------- gates
def parity_gate(ctx, got: dict, images: np.ndarray, source: str, *, precision: str, label: str) -> dict:
    """fp32/fp16 outputs of the phone runtime against PyTorch, with the ONNX tolerances; raises one line."""
    from mineralnet.export import onnx as xonnx

    reference = xonnx.torch_outputs(ctx.model, images, ctx.options.outputs, novelty=ctx.novelty)
    report = xonnx.compare(reference, got, precision=precision, source=source)
    if not report.passed:
        raise MineralNetError(f"{label} parity gate FAILED, nothing written: {report.summary()}; the converted "
                              f"model does not reproduce the PyTorch model (report it with the package versions)")
    return report.to_dict()


def int8_gate(ctx, got: dict, images: np.ndarray, source: str, *, label: str, candidate: str) -> dict:
    """Top-1 agreement of an int8 phone model with PyTorch fp32 (on --val-data when given, with both
    accuracies and the --max-acc-drop limit); `candidate` is the checked file, for `Predictor`."""
    from mineralnet.export import onnx as xonnx
    from mineralnet.predict import Predictor, score_photos

    o = ctx.options
    if o.val_data:
        fp32 = score_photos(Predictor(ctx.run, device="cpu"), o.val_data)
        int8 = score_photos(Predictor(candidate), o.val_data, reference=fp32["preds"])
        result = {"agreement": {"top1": int8["agreement"], "images": int8["images"], "source": "--val-data photos"},
                  "accuracy": {"fp32": fp32["top1"], "int8": int8["top1"], "images": int8["images"]}}
    else:
        reference = xonnx.torch_outputs(ctx.model, images, o.outputs, novelty=ctx.novelty)
        key = "logits" if "logits" in reference else next(iter(reference))
        result = {"agreement": {"top1": xonnx.agreement(reference[key], got[key]), "images": len(images),
                                "source": source}}
    agree = result["agreement"]
    if not agree["top1"] >= o.min_agreement:
        raise MineralNetError(f"{label} int8 gate FAILED, nothing written: top-1 agreement with fp32 is "
                              f"{agree['top1']:.1%} on {agree['images']} {agree['source']} (minimum "
                              f"{o.min_agreement:.0%}); calibrate on more representative photos (--calib-data, "
                              f"--calib-size)")
    acc = result.get("accuracy")
    if acc and acc["fp32"] - acc["int8"] > o.max_acc_drop:
        raise MineralNetError(f"{label} int8 gate FAILED, nothing written: top-1 accuracy on {acc['images']} "
                              f"--val-data photos drops from {acc['fp32']:.1%} (fp32) to {acc['int8']:.1%} (int8), "
                              f"more than --max-acc-drop {100 * o.max_acc_drop:g} points; calibrate on more "
                              f"representative photos (--calib-data, --calib-size)")
    return result


def write_checked(ctx, name: str, data: bytes, meta: dict, record: dict):
    """Sidecar, then the checked model file (atomically, with its manifest record) -> Artifact."""
    import hashlib

    path = ctx.path(name)
    write_sidecar(path, meta, hashlib.sha256(data).hexdigest())
    return ctx.write(name, data, {**record, "sidecar": sidecar_path(path).name})


FORMAT_PACKAGES = {"tflite": ("litert_torch", "ai_edge_litert"), "executorch": ("executorch",),
                   "coreml": ("coremltools",)}


def preflight(formats: Sequence[str], options) -> None:
    """Before minutes of ONNX export: the packages of the phone formats asked, and a fixed batch."""
    asked = [f for f in formats if f in FORMAT_PACKAGES]
    for f in asked:
        require(*FORMAT_PACKAGES[f])
    if "tflite" in asked and ("fp16" in formats or "int8" in formats):
        require("ai_edge_quantizer")
    if asked and options.profile.dynamic:
        raise MineralNetError("--tflite, --executorch and --coreml write fixed-batch models; drop --dynamic "
                              "(and pass --batch N for a batch other than 1)")
