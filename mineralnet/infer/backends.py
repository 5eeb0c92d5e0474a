"""Every runtime behind one interface, and the one table that says which runtime opens which model file.

A backend has `kind` (a name in BACKENDS), `meta` (the model's metadata: classes, image_size, resize, mean,
std, outputs, ..., and for a calibrated export its public calibration) and
`run(x (N, 3, S, S) float32) -> {output name: (N, ...) array}`.

    open_backend("runs/exp1")                     # PyTorch
    open_backend("runs/exp1/export/model.onnx")   # ONNX Runtime
    model_kind("runs/exp1/export/model.engine")   # "tensorrt"
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from mineralnet.errors import MineralNetError


class Backend(Protocol):
    kind: str
    meta: dict

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]: ...


class TorchBackend:
    """A run directory or .safetensors file, in PyTorch (CUDA when available)."""

    kind = "pytorch"

    def __init__(self, path, device: str | None = None):
        import torch

        from mineralnet.artifact import load_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.meta = load_model(path, map_location="cpu")
        self.model.to(self.device)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        from mineralnet.infer.loop import predict_array

        return predict_array(self.model, x, batch=32, device=self.device)


class OnnxBackend:
    """An .onnx file written by mineralnet-export, in ONNX Runtime."""

    kind = "onnx"

    def __init__(self, path, providers: Sequence[str] | None = None, threads: int | None = None):
        from mineralnet.infer.metadata import parse_metadata
        from mineralnet.infer.ort import ort_session

        if providers is None:
            import onnxruntime as ort

            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort_session(path, providers=providers, threads=threads)
        self.meta = parse_metadata(self.session.get_modelmeta().custom_metadata_map)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        from mineralnet.infer.ort import run_session

        return run_session(self.session, x)


class TensorRTBackend:
    """A TensorRT engine (plain plan file) with its `<engine>.json` sidecar."""

    kind = "tensorrt"

    def __init__(self, path):
        from mineralnet.infer.tensorrt import TRTRunner

        self.runner = TRTRunner(path)
        self.meta = self.runner.meta

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(x)


class OpenVinoBackend:
    """An OpenVINO IR (.xml + .bin) written by mineralnet-export, on the CPU.

    `precision` is OpenVINO's inference precision hint: fp32 (the default: the numbers the export
    gates checked), or bf16/fp16 where the CPU has those instructions.
    """

    kind = "openvino"

    def __init__(self, path, precision: str | None = None, threads: int | None = None):
        from mineralnet.infer.openvino import IRRunner

        self.runner = IRRunner(path, precision=precision or "fp32", threads=threads)
        self.meta = self.runner.meta

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(x)


class LiteRTBackend:
    """A .tflite file written by mineralnet-export, in the LiteRT interpreter (ai-edge-litert)."""

    kind = "litert"

    def __init__(self, path, threads: int | None = None):
        from mineralnet.infer.litert import LiteRTRunner

        self.runner = LiteRTRunner(path, threads=threads)
        self.meta = self.runner.meta

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(x)


class ExecuTorchBackend:
    """A .pte file written by mineralnet-export, in ExecuTorch's Python runtime (XNNPACK)."""

    kind = "executorch"

    def __init__(self, path):
        from mineralnet.infer.executorch import ExecuTorchRunner

        self.runner = ExecuTorchRunner(path)
        self.meta = self.runner.meta

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(x)


@dataclass(frozen=True)
class ModelKind:
    """One row of the table: a kind of model file, the suffixes that name it and how to open it."""

    name: str
    suffixes: tuple[str, ...]
    what: str  # for messages: "an .onnx file from mineralnet-export"
    open: Callable | None  # (path, options dict) -> backend; None: cannot run on this machine (why: `refusal`)
    refusal: str = ""


def _open_torch(p, o):
    return TorchBackend(p, device=o["device"])


def _open_onnx(p, o):
    return OnnxBackend(p, providers=o["providers"], threads=o["threads"])


def _open_openvino(p, o):
    return OpenVinoBackend(p, precision=o["precision"], threads=o["threads"])


# The one answer to "what kind of model file is this" (predict, the app, bench, label issues use it).
BACKENDS: tuple[ModelKind, ...] = (
    ModelKind("pytorch", (".safetensors", ".json"), "a run directory", _open_torch),
    ModelKind("onnx", (".onnx",), "an .onnx file from mineralnet-export", _open_onnx),
    ModelKind("tensorrt", (".engine", ".plan", ".trt"), "a TensorRT engine (.engine/.plan/.trt)",
              lambda p, o: TensorRTBackend(p)),
    ModelKind("openvino", (".xml",), "an OpenVINO IR (.xml + .bin)", _open_openvino),
    ModelKind("litert", (".tflite",), "a LiteRT .tflite", lambda p, o: LiteRTBackend(p, threads=o["threads"])),
    ModelKind("executorch", (".pte",), "an ExecuTorch .pte", lambda p, o: ExecuTorchBackend(p)),
    ModelKind("coreml", (".mlpackage", ".mlmodel"), "a Core ML model", None,
              "Core ML models run only on macOS/iOS (coremltools predict); on this machine use the .onnx, "
              ".tflite or .pte of the same export"),
)
_RUNNABLE = [k.what for k in BACKENDS if k.open is not None]
KINDS = ", ".join(_RUNNABLE[:-1]) + " or " + _RUNNABLE[-1]  # for messages: what may be passed


def model_kind(path) -> ModelKind | None:
    """The table row for `path` by its suffix (a Core ML .mlpackage is a folder too); another folder is a run
    directory; None for an unknown suffix."""
    p = Path(os.path.expanduser(os.fspath(path)))
    suffix = p.suffix.lower()
    row = next((k for k in BACKENDS if suffix in k.suffixes), None)
    return row if row is not None or not p.is_dir() else BACKENDS[0]


def open_backend(path, *, device: str | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None, precision: str | None = None, runtime: str | None = None):
    """The backend for a run directory / .safetensors / model.json, an .onnx file, an engine, an IR, a .tflite
    or a .pte. `runtime="openvino"` runs an .onnx file in OpenVINO (its ONNX reader) instead of ONNX Runtime."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise MineralNetError(f"model {str(p)!r} does not exist; pass {KINDS}")
    kind = model_kind(p)
    if runtime is not None and (runtime != "openvino" or kind is None or kind.name not in ("onnx", "openvino")):
        raise MineralNetError(f"runtime {runtime!r} for {str(p)!r}: only 'openvino' can be chosen, for an .onnx "
                              f"file or an IR (.xml)")
    if kind is None:
        raise MineralNetError(f"model {str(p)!r}: unknown kind; pass {KINDS}")
    if precision is not None and kind.name != "openvino" and runtime is None:
        raise MineralNetError(f"--precision {precision} is OpenVINO's runtime hint; {str(p)!r} is not an "
                              f"OpenVINO IR (.xml): drop --precision, or pass the IR")
    if kind.open is None:
        raise MineralNetError(f"model {str(p)!r}: {kind.refusal}")
    options = {"device": device, "providers": providers, "threads": threads, "precision": precision}
    return (_open_openvino if runtime == "openvino" else kind.open)(p, options)
