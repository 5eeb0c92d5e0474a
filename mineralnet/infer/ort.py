"""ONNX Runtime: a session for an .onnx file written by mineralnet-export, and running images through it."""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from mineralnet.errors import MineralNetError


def ort_session(path_or_bytes, *, providers: Sequence[str] | None = None, threads: int | None = None,
                optimization: str = "auto", spinning: bool = True):
    """An onnxruntime.InferenceSession on CPU (or the given providers), with a clear error.

    optimization "auto" follows the file's own metadata: the int8 model exported for TensorRT says
    `"onnxruntime_optimization": "disable"` (ONNX Runtime's optimiser miscomputes its fp16 Q/DQ graph),
    everything else runs fully optimised. `spinning=False` stops idle pool threads from spinning on the
    cores (benchmarks that interleave runtimes need that).
    """
    first = "all" if optimization == "auto" else optimization
    session = _ort_session(path_or_bytes, providers, threads, first, spinning)
    if optimization == "auto":
        quant = json.loads(session.get_modelmeta().custom_metadata_map.get("quantization", "{}") or "{}")
        wanted = quant.get("onnxruntime_optimization", "all")
        if wanted != "all":
            session = _ort_session(path_or_bytes, providers, threads, wanted, spinning)
    return session


def _ort_session(path_or_bytes, providers, threads, optimization: str, spinning: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: no optimizer chatter on stderr
    data = os.fspath(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) else path_or_bytes
    try:
        return ort.InferenceSession(data, opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:
        where = repr(data) if isinstance(data, str) else "the exported model"
        raise MineralNetError(f"ONNX Runtime cannot load {where} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); the file is damaged or not an ONNX model: "
                              f"re-export it with `mineralnet-export RUN`") from None


def session_batch(session) -> int | None:
    """The fixed batch size of the session's input, or None when it is dynamic."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def run_session(session, images: np.ndarray, batch: int | None = None) -> dict[str, np.ndarray]:
    """Run all of `images` (N, 3, S, S) through `session` in chunks of its batch size.

    A fixed-batch model gets the last chunk padded by repeating its last image (the padding rows
    are dropped from the result). Returns {output name: (N, ...) array}.
    """
    fixed = session_batch(session)
    step = fixed or batch or 16
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(images), step):
        x = np.ascontiguousarray(images[start:start + step], dtype=np.float32)
        n = len(x)
        if fixed and n < fixed:
            x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
        for key, value in zip(names, session.run(names, {name: x})):
            chunks[key].append(value[:n])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in chunks.items()}
