"""OpenVINO IR files for export: NNCF int8 quantization and saving. Converting and reading an IR, compiling
it and running it are mineralnet/infer/openvino.py; the export row and its gates are export/openvino.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.infer.openvino import RT_INFO_KEY, _ov, keep_signal_stack, set_metadata

IR_NAMES = {"fp32": "model.xml", "int8": "model.int8.xml"}
INT8_METHODS = ("qdq", "nncf")


def quantize_nncf(model, photos: np.ndarray, batch: int | None):
    """NNCF post-training int8 quantization of an fp32 ov.Model on preprocessed (N, 3, S, S) images.

    Symmetric int8 weights and activations (NNCF's `performance` preset), the MinMax ranges NNCF
    picks per layer, and its fast bias correction. `batch` is the model's fixed batch (None: dynamic).
    """
    try:
        import nncf
    except ImportError:
        raise MineralNetError("--openvino-int8 nncf needs NNCF (pip install nncf); or use the default "
                              "--openvino-int8 qdq") from None
    step = batch or 1
    items = []
    for start in range(0, len(photos), step):
        x = photos[start:start + step]
        if batch and len(x) < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])
        items.append(np.ascontiguousarray(x, dtype=np.float32))
    rt = {k: model.get_rt_info([RT_INFO_KEY, k]).astype(str) for k in model.get_rt_info()[RT_INFO_KEY]}
    with keep_signal_stack():
        quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), fast_bias_correction=True)
    set_metadata(quantized, rt)
    return quantized


def save_ir(model, folder, name: str) -> Path:
    """Write `model` as folder/name (.xml) + .bin with fp32 weights; returns the .xml path."""
    ov = _ov()
    xml = Path(folder) / name
    ov.save_model(model, os.fspath(xml), compress_to_fp16=False)
    return xml
