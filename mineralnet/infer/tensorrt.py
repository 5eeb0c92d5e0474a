"""TensorRT engines at run time: the batch profile an engine was built for, its `<engine>.json` sidecar,
the check that it was built by this TensorRT for this GPU family (with the command that rebuilds it), and
`TRTRunner`. Building engines is mineralnet/export/tensorrt.py.
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.infer.metadata import major_of

INPUT_NAME = "images"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_MIB = 4096
TRT_MAJORS = (10, 11)
DEFAULT_MAJOR = 10  # when TensorRT is not installed here: what JetPack 6 and most servers have
# The ONNX file each engine precision is built from (strong typing: the graph carries the precision).
ENGINE_SOURCES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an exported model accepts: static (min = opt = max) or a dynamic range.

    `opt` is the batch TensorRT tunes its kernels for; any batch in [min, max] runs.
    """

    min: int = 1
    opt: int = 1
    max: int = 1
    dynamic: bool = False

    @classmethod
    def static(cls, batch: int) -> "BatchProfile":
        return cls(batch, batch, batch, False).validated()

    @classmethod
    def range(cls, min_batch: int = 1, opt_batch: int | None = None, max_batch: int = 32) -> "BatchProfile":
        opt = opt_batch if opt_batch is not None else min(max(8, min_batch), max_batch)
        return cls(min_batch, opt, max_batch, True).validated()

    def validated(self) -> "BatchProfile":
        if self.min < 1 or not (self.min <= self.opt <= self.max):
            flags = (f"--min-batch {self.min} --opt-batch {self.opt} --max-batch {self.max}" if self.dynamic
                     else f"--batch {self.min}")
            raise MineralNetError(f"{flags}: batch sizes must satisfy 1 <= min <= opt <= max")
        return self

    def shapes(self, image_size: int) -> dict[str, list[int]]:
        """{"min"|"opt"|"max": [B, 3, S, S]}: the optimisation profile of the input."""
        s = int(image_size)
        return {k: [b, 3, s, s] for k, b in (("min", self.min), ("opt", self.opt), ("max", self.max))}

    def to_dict(self) -> dict:
        return asdict(self)


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def tensorrt_version() -> str | None:
    """`tensorrt.__version__` of the installed TensorRT, read at run time; None when it cannot be imported."""
    try:
        import tensorrt as trt
    except Exception:  # not installed, or a broken install (tensorrt_missing says which)
        return None
    return str(trt.__version__)


def target_major(major: int | None = None) -> int:
    """The TensorRT major a command is written for: `major`, else the installed one, else 10."""
    major = major if major is not None else (major_of(tensorrt_version()) or DEFAULT_MAJOR)
    if major not in TRT_MAJORS:
        raise MineralNetError(f"TensorRT {major}.x: MineralNet builds strongly typed engines for TensorRT "
                              f"{' and '.join(map(str, TRT_MAJORS))}; install one of those (pip install 'mineralnet[trt]')")
    return major


def trtexec_command(onnx_path, engine_path, *, precision: str, profile: BatchProfile, image_size: int,
                    workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache=None, major: int | None = None) -> str:
    """The trtexec command that builds the same engine as `build_engine`, for TensorRT `major`.

    No precision flag on either major (the ONNX file fixes the precision: see ENGINE_SOURCES).
    TensorRT 10 needs --stronglyTyped for that; TensorRT 11 is always strongly typed and its
    trtexec has no --fp16/--int8/--best/--calib any more.
    """
    if precision not in ENGINE_PRECISIONS:
        raise MineralNetError(f"engine precision {precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)}")
    major = target_major(major)
    args = ["trtexec", f"--onnx={os.fspath(onnx_path)}", f"--saveEngine={os.fspath(engine_path)}"]
    if major == 10:
        args.append("--stronglyTyped")
    if profile.dynamic:
        shapes = profile.shapes(image_size)
        args += [f"--{k}Shapes={INPUT_NAME}:{_dims(shapes[k])}" for k in ("min", "opt", "max")]
    args.append(f"--memPoolSize=workspace:{int(workspace_mib)}M")
    if timing_cache:
        args.append(f"--timingCacheFile={os.fspath(timing_cache)}")
    return " ".join(shlex.quote(a) for a in args)


def tensorrt_missing() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here, else what is missing (one phrase)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"TensorRT is not installed ({e}; pip install 'mineralnet[trt]' on a machine with an NVIDIA GPU)"
    except Exception as e:  # a broken install: missing libnvinfer, CUDA driver mismatch, ...
        return f"TensorRT cannot be imported ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def _tensorrt():
    missing = tensorrt_missing()
    if missing:
        raise MineralNetError(f"{missing}; TensorRT engines are built and run on the NVIDIA device")
    import tensorrt as trt

    return trt


def device_info() -> dict:
    """TensorRT version (`trt.__version__`, read now), GPU name and compute capability of this machine."""
    import torch

    trt = _tensorrt()
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"tensorrt_version": str(trt.__version__), "gpu": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}", "cuda": torch.version.cuda}


def sidecar_path(engine_path) -> Path:
    return Path(os.fspath(engine_path) + ".json")


def read_sidecar(engine_path) -> dict:
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise MineralNetError(f"engine {os.fspath(engine_path)!r} has no {side.name} beside it (class names, "
                              f"preprocessing, build device); copy it with the engine or rebuild with "
                              f"`mineralnet-export RUN --trt`")
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise MineralNetError(f"{str(side)!r} is not valid JSON ({e}); rebuild the engine") from None


def rebuild_hint(sidecar: dict, engine_path, major: int | None) -> str:
    """How to rebuild the engine described by `sidecar` here: the mineralnet-export flags and trtexec."""
    profile = BatchProfile(**{k: sidecar["profile"][k] for k in ("min", "opt", "max", "dynamic")})
    precision = sidecar.get("precision", "fp32")
    engine = Path(os.fspath(engine_path))
    onnx_file = (sidecar.get("onnx") or {}).get("file") or ENGINE_SOURCES.get(precision, "model.onnx")
    flags = {"fp32": "", "fp16": " --fp16", "int8": " --int8 --calib-data DIR"}.get(precision, "")
    batch = (f" --dynamic --min-batch {profile.min} --opt-batch {profile.opt} --max-batch {profile.max}"
             if profile.dynamic else f" --batch {profile.max}")
    cmd = trtexec_command(engine.parent / onnx_file, engine, precision=precision, profile=profile,
                          image_size=int(sidecar["image_size"]),
                          workspace_mib=int(sidecar.get("workspace_mib", DEFAULT_WORKSPACE_MIB)),
                          major=major if major in TRT_MAJORS else None)
    return f"`mineralnet-export RUN --trt{flags}{batch}` or `{cmd}`"


def check_compatible(sidecar: dict, here: dict, engine_path) -> None:
    """Raise (one line) if the engine was built by another TensorRT version or for another GPU family.

    A plan runs only on the TensorRT version that built it and on GPUs of the same compute
    capability (unless built version- or hardware-compatible, which MineralNet does not do).
    """
    built, have = sidecar.get("tensorrt_version"), here["tensorrt_version"]
    if built != have:
        problem = (f"was built by TensorRT {built} and this machine has TensorRT {have}; an engine runs only "
                   f"on the TensorRT version that built it")
    elif sidecar.get("compute_capability") != here["compute_capability"]:
        problem = (f"was built for GPU {sidecar.get('gpu')} "
                   f"sm_{str(sidecar.get('compute_capability')).replace('.', '')} and this machine has "
                   f"{here['gpu']} sm_{here['compute_capability'].replace('.', '')}; an engine runs only on the "
                   f"GPU family that built it")
    else:
        return
    raise MineralNetError(f"engine {os.fspath(engine_path)!r} {problem}: rebuild it here with "
                          f"{rebuild_hint(sidecar, engine_path, major_of(have))}")


# ----------------------------------------------------------------------------- run
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
                 "UINT8": "uint8", "BOOL": "bool", "BF16": "bfloat16"}


class TRTRunner:
    """Deserialize a plan and run it with `execute_async_v3`; buffers are torch CUDA tensors.

    `run(np images) -> {output name: np array}` for predict; `infer(cuda tensor) -> {name: cuda
    tensor}` for benchmarks (no host copies). Batches larger than the engine's maximum are split.
    """

    def __init__(self, engine_path):
        import torch

        self.path = os.fspath(engine_path)
        if not os.path.isfile(self.path):
            raise MineralNetError(f"engine {self.path!r} does not exist; build it with `mineralnet-export RUN --trt`")
        self.meta = read_sidecar(self.path)
        trt = _tensorrt()
        check_compatible(self.meta, device_info(), self.path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(self.path, "rb") as f:
            self.engine = self._runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise MineralNetError(f"TensorRT cannot deserialize {self.path!r} (damaged, or built by another "
                                  f"TensorRT version); rebuild it with `mineralnet-export RUN --trt`")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs, self.dtypes = [], [], {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            kind = self.engine.get_tensor_mode(name)
            (self.inputs if kind == trt.TensorIOMode.INPUT else self.outputs).append(name)
            dtype_name = str(self.engine.get_tensor_dtype(name)).split(".")[-1]
            self.dtypes[name] = getattr(torch, _TORCH_DTYPES.get(dtype_name, "float32"))
        if self.inputs != [INPUT_NAME]:
            raise MineralNetError(f"engine {self.path!r} has inputs {self.inputs}, expected [{INPUT_NAME!r}]")
        shape = tuple(self.engine.get_tensor_shape(INPUT_NAME))
        if shape[0] == -1:
            lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        else:
            self.min_batch = self.max_batch = int(shape[0])
        self.fixed = self.min_batch == self.max_batch
        self.stream = torch.cuda.Stream()

    def infer(self, x):
        """x: (B, 3, S, S) CUDA tensor with B in [min_batch, max_batch] -> {name: CUDA tensor}."""
        import torch

        x = x.to(dtype=self.dtypes[INPUT_NAME]).contiguous()
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out[name] = torch.empty(shape, dtype=self.dtypes[name], device=x.device)
            self.context.set_tensor_address(name, out[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # x was written on the current stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise MineralNetError(f"TensorRT execution of {self.path!r} failed (see the TensorRT log)")
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        parts: dict[str, list] = {n: [] for n in self.outputs}
        for start in range(0, len(images), self.max_batch):
            chunk = images[start:start + self.max_batch]
            n = len(chunk)
            if n < self.min_batch:  # pad with copies of the last image
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.min_batch - n, axis=0)])
            x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).cuda()
            for name, value in self.infer(x).items():
                parts[name].append(value[:n].float().cpu().numpy())
        torch.cuda.synchronize()
        return {k: np.concatenate(v) for k, v in parts.items()}
