"""OpenVINO IR files for export: NNCF int8 quantization (of the ONNX graph; export/openvino.py converts the
result to the IR) and saving. Converting and reading an IR, compiling it and running it are
mineralnet/infer/openvino.py; the export row and its gates are export/openvino.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.infer.openvino import _ov, keep_signal_stack

IR_NAMES = {"fp32": "model.xml", "int8": "model.int8.xml"}
INT8_METHODS = ("qdq", "nncf")
NEEDS_NNCF = ('--openvino-int8 nncf needs NNCF: pip install -e ".[openvino]" (or pip install nncf); or use the '
              'default --openvino-int8 qdq with --int8')


def quantize_nncf(fp32_onnx, photos: np.ndarray, batch: int | None, *, reduce_range: bool | None = None) -> bytes:
    """NNCF post-training int8 quantization of the fp32 ONNX model on preprocessed (N, 3, S, S) images; returns
    the QDQ ONNX bytes that `export/openvino.py` converts to the int8 IR.

    NNCF's `performance` preset (symmetric int8 weights per channel; activations symmetric, unsigned where
    they cannot be negative; quantizers on the inputs of the weighted ops, which OpenVINO fuses into its int8
    kernels), the MinMax ranges NNCF picks per layer and its fast bias correction. As in model.int8.onnx, the
    global pooling and everything after it (fusion, head, softmax, novelty) stay float (`quantize.graph.tail_nodes`,
    by exact node names), and the weights get 7 bits (NNCF's overflow fix on every layer) where the CPU lacks
    VNNI (`reduce_range`, default: this CPU, the rule of the QDQ recipe), since its u8 x s8 products can saturate.
    NNCF runs on the ONNX graph (after ONNX Runtime's quantization pre-processing) rather than on the IR:
    measured on three minet7 students it gave 0.2-1.9 dB more logit SQNR on the ranking photos than NNCF on the
    converted IR (docs/RESULTS.md, "NNCF for the int8 model"). `batch` is the model's fixed batch (None: dynamic).
    """
    import onnx

    from mineralnet.quantize import graph as g
    from mineralnet.quantize import recipe as rc

    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    if reduce_range is None:
        reduce_range = rc.default_recipe().reduce_range
    proto = onnx.load_from_string(rc.preprocess(fp32_onnx))
    name = proto.graph.input[0].name
    items = [{name: x} for x in nncf_items(photos, batch)]
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE if reduce_range else OverflowFix.DISABLE)
    with keep_signal_stack():
        quantized = nncf.quantize(proto, nncf.Dataset(items), subset_size=len(items), fast_bias_correction=True,
                                  ignored_scope=nncf.IgnoredScope(names=g.tail_nodes(proto)),
                                  advanced_parameters=advanced)
    return quantized.SerializeToString()


def import_nncf():
    """The nncf module, quiet: its per-node INFO lines (every ignored node, one per line) and the CUDA notice
    torch prints when NNCF imports torch's cpp_extension are left out of the export log; its progress bars
    and warnings stay."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
    except ImportError:
        raise MineralNetError(NEEDS_NNCF) from None
    nncf.set_log_level(logging.WARNING)
    return nncf


def nncf_items(photos: np.ndarray, batch: int | None) -> list[np.ndarray]:
    """The photos as NNCF dataset items: batches of the model's fixed batch (the last one padded by repeating
    its last photo), or single photos for a dynamic batch."""
    step = batch or 1
    items = []
    for start in range(0, len(photos), step):
        x = photos[start:start + step]
        if batch and len(x) < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])
        items.append(np.ascontiguousarray(x, dtype=np.float32))
    return items


def save_ir(model, folder, name: str) -> Path:
    """Write `model` as folder/name (.xml) + .bin with fp32 weights; returns the .xml path."""
    ov = _ov()
    xml = Path(folder) / name
    ov.save_model(model, os.fspath(xml), compress_to_fp16=False)
    return xml
