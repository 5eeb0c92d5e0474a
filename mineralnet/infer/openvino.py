"""OpenVINO at run time: reading an IR (with MineralNet's metadata in rt_info) or an .onnx file through
OpenVINO's ONNX reader, compiling it with a precision hint, and the runner `Predictor` and the benchmarks
use. Conversion, NNCF quantization and saving are mineralnet/export/ir.py.
"""
from __future__ import annotations

import ctypes
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mineralnet.errors import MineralNetError, fixed_batch_error

RT_INFO_KEY = "mineralnet"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # runtime hint -> OpenVINO's name
INSTALL = "pip install 'mineralnet[openvino]'"


def openvino_missing() -> str | None:
    """Why OpenVINO cannot be used here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return f"the openvino package is not installed ({INSTALL})"
    return None


def _ov():
    missing = openvino_missing()
    if missing:
        raise MineralNetError(f"OpenVINO IR export and inference need OpenVINO: {missing}")
    import openvino

    return openvino


# OpenVINO's CPU plugin gives the thread that loads it an alternate signal stack of its own (room for AMX state)
# and frees it when the plugin goes, from whichever thread drops the last Core, without giving the loading thread
# its old stack back. The next signal with a Python handler (those run on the alternate stack), e.g. torch's
# DataLoader SIGCHLD handler when any subprocess exits, then cannot be delivered and the kernel kills the
# process with SIGSEGV, long after OpenVINO was used. So every call that may load the plugin puts the caller's
# alternate stack back as it was (Python's faulthandler stack, sized for this CPU's state, or none at all).
class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_SS_ONSTACK = 1


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
        return libc
    except (OSError, AttributeError):  # no sigaltstack (not Linux/glibc): nothing to guard
        return None


def signal_stack() -> tuple[int, int, int] | None:
    """This thread's alternate signal stack as (address, flags, size), or None where it cannot be read."""
    libc = _libc()
    now = _StackT()
    if libc is None or libc.sigaltstack(None, ctypes.byref(now)) != 0:
        return None
    return int(now.ss_sp or 0), int(now.ss_flags), int(now.ss_size)


def set_signal_stack(stack: tuple[int, int, int] | None) -> None:
    """Make `stack` (from `signal_stack()`) this thread's alternate signal stack again."""
    libc = _libc()
    if stack is None or libc is None or signal_stack() == stack:
        return
    sp, flags, size = stack
    libc.sigaltstack(ctypes.byref(_StackT(sp or None, flags & ~_SS_ONSTACK, size)), None)


@contextmanager
def keep_signal_stack():
    """Run the body (which may load OpenVINO's CPU plugin) and give this thread its signal stack back."""
    before = signal_stack()
    try:
        yield
    finally:
        set_signal_stack(before)


def bin_path(xml_path) -> Path:
    return Path(xml_path).with_suffix(".bin")


def read_metadata(model, where: str) -> dict:
    """The model meta dict (classes, mean, std, ...) from an ov.Model's rt_info."""
    from mineralnet.infer.metadata import parse_metadata

    if not model.has_rt_info([RT_INFO_KEY]):
        raise MineralNetError(f"OpenVINO IR {where!r} carries no MineralNet metadata (rt_info `{RT_INFO_KEY}`): "
                              f"it was not written by mineralnet-export; export it with "
                              f"`mineralnet-export RUN --openvino`")
    keys = model.get_rt_info()[RT_INFO_KEY]
    return parse_metadata({k: model.get_rt_info([RT_INFO_KEY, k]).astype(str) for k in keys})


# ----------------------------------------------------------------------------- metadata
def set_metadata(model, props: dict[str, str]) -> None:
    """Store `props` (str -> JSON str, as in the ONNX metadata_props) in the IR's rt_info."""
    for key, value in props.items():
        model.set_rt_info(value, [RT_INFO_KEY, key])


# ----------------------------------------------------------------------------- conversion
def convert(onnx_path, props: dict[str, str]):
    """ONNX file -> ov.Model with `props` in its rt_info."""
    ov = _ov()
    try:
        model = ov.convert_model(os.fspath(onnx_path))
    except Exception as e:
        raise MineralNetError(f"OpenVINO cannot convert {os.fspath(onnx_path)!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); report it with the "
                              f"OpenVINO version ({ov.__version__})") from None
    set_metadata(model, props)
    return model


# ----------------------------------------------------------------------------- runtime
def compile_ir(model_or_path, *, precision: str = "fp32", threads: int | None = None,
               latency: bool = True):
    """An ov.CompiledModel on the CPU with an explicit inference precision hint.

    Args:
        precision: fp32 (exact), bf16 or fp16 (faster where the CPU has the instructions).
        threads: inference threads (default: OpenVINO's, all physical cores).
        latency: one stream, for the per-call latency of synchronous requests (the benchmark's and
            `Predictor`'s way of calling); False lets OpenVINO pick streams for throughput.
    """
    ov = _ov()
    if precision not in PRECISION_HINTS:
        raise MineralNetError(f"OpenVINO precision {precision!r}: choose one of {', '.join(PRECISION_HINTS)}")
    core = ov.Core()
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = read_ir(core, model_or_path)
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
              "PERFORMANCE_HINT": "LATENCY" if latency else "THROUGHPUT"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        with keep_signal_stack():
            return core.compile_model(model, "CPU", config)
    except Exception as e:
        raise MineralNetError(f"OpenVINO cannot compile the model for the CPU with precision {precision} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                              f"try --precision fp32") from None


def read_model_file(core, path):
    """An ov.Model from an IR (.xml + .bin) or, with OpenVINO's ONNX reader, from an .onnx file: the ONNX
    file's metadata_props go into rt_info as `convert` does, so both read alike in `IRRunner`."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.suffix.lower() != ".onnx":
        return read_ir(core, p)
    import onnx

    try:
        props = {m.key: m.value for m in onnx.load(os.fspath(p), load_external_data=False).metadata_props}
    except Exception as e:
        raise MineralNetError(f"{str(p)!r} is not a readable ONNX file ({type(e).__name__}); export it again "
                              f"with `mineralnet-export RUN --onnx`") from None
    return convert(p, props)


def read_ir(core, path):
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file() or not bin_path(p).is_file():
        raise MineralNetError(f"OpenVINO IR {str(p)!r} needs both the .xml and its {bin_path(p).name} beside it; "
                              f"copy both files, or export again with `mineralnet-export RUN --openvino`")
    try:
        return core.read_model(os.fspath(p))
    except Exception as e:
        raise MineralNetError(f"OpenVINO cannot read {str(p)!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); the file is damaged or from "
                              f"a newer OpenVINO: export it again with `mineralnet-export RUN --openvino`") from None


class IRRunner:
    """An OpenVINO IR on the CPU: images (N, 3, S, S) float32 -> {output name: (N, ...)}.

    A fixed-batch IR gets its last chunk padded by repeating the last image, as ONNX files are.
    """

    def __init__(self, model_or_path, *, precision: str = "fp32", threads: int | None = None):
        model = model_or_path
        if isinstance(model_or_path, (str, os.PathLike)):
            model = read_model_file(_ov().Core(), model_or_path)
        where = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else "the IR"
        self.meta = read_metadata(model, where)  # rt_info: the compiled model does not keep it
        self.compiled = compile_ir(model, precision=precision, threads=threads)
        self.request = self.compiled.create_infer_request()
        self.input = self.compiled.input(0)
        shape = self.input.get_partial_shape()
        self.batch = shape[0].get_length() if shape[0].is_static else None
        self.names = [o.get_any_name() for o in self.compiled.outputs]
        self.precision = precision

    def infer(self, x: np.ndarray):
        """One request on a batch the model accepts; the results stay in OpenVINO's buffers."""
        return self.request.infer({self.input: x})

    def run(self, images: np.ndarray, batch: int | None = None) -> dict[str, np.ndarray]:
        step = self.batch or batch or 16
        chunks: dict[str, list] = {n: [] for n in self.names}
        for start in range(0, len(images), step):
            x = np.ascontiguousarray(images[start:start + step], dtype=np.float32)
            n = len(x)
            if self.batch and n < self.batch:
                x = np.concatenate([x, np.repeat(x[-1:], self.batch - n, axis=0)])
            result = self.infer(x)
            for name, out in zip(self.names, self.compiled.outputs):
                chunks[name].append(np.array(result[out][:n], dtype=np.float32))
        return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in chunks.items()}


@dataclass
class TimingRuntime:
    """What a benchmark needs to time an IR: `fn(x)` runs one batch, `make_inputs(batch, n)` gives inputs.
    `effective` is the inference precision OpenVINO reports after compiling (fp32, bf16 or fp16)."""

    fn: Callable
    make_inputs: Callable
    precision: str
    label: str
    effective: str | None = None


_EFFECTIVE = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def timing_runtime(path, precision: str = "fp32", threads: int | None = None) -> TimingRuntime:
    """A compiled IR (fp32 or int8 file; or an .onnx file through OpenVINO's ONNX reader) and its
    synchronous infer call, for the benchmark tables. Needs no MineralNet metadata.

    `precision` is the runtime hint for the layers that are not int8: fp32, bf16 or fp16. A
    fixed-batch model accepts only its own batch (make_inputs raises for another one).
    """
    compiled = compile_ir(read_model_file(_ov().Core(), path), precision=precision, threads=threads)
    request, inp = compiled.create_infer_request(), compiled.input(0)
    shape = inp.get_partial_shape()
    fixed = shape[0].get_length() if shape[0].is_static else None
    size = int(shape[-1].get_length())
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    effective = _EFFECTIVE.get(hint.get_type_name(), hint.get_type_name()) if hasattr(hint, "get_type_name") else None

    def make_inputs(batch: int, n: int) -> list[np.ndarray]:
        if fixed and batch != fixed:
            raise fixed_batch_error(path, fixed, batch)
        rng = np.random.default_rng(batch)
        return [rng.standard_normal((batch, 3, size, size)).astype(np.float32) for _ in range(n)]

    return TimingRuntime(lambda x: request.infer({inp: x}), make_inputs, precision,
                         f"OpenVINO CPU ({precision} hint)", effective)
