"""ExecuTorch export (XNNPACK, fp32 and int8) for Android/iOS apps and boards (the runner is
mineralnet/infer/executorch.py).

    mineralnet-export RUN --executorch                               # model.pte (fp32, XNNPACK)
    mineralnet-export RUN --executorch --int8 --calib-data DIR       # + model.int8.pte

fp32: torch.export -> `to_edge_transform_and_lower` with the XNNPACK partitioner -> .pte. int8: PT2E
static quantization with ExecuTorch's XNNPACKQuantizer (symmetric int8, weights per channel), ranges
measured on the quantization photos (--calib-data) through the evaluation preprocessing, then lowered
the same way (float input and outputs; the quantize/dequantize at the edges run inside the program).

Each .pte is checked in ExecuTorch's Python runtime before it is written, through export/gates.py
(fp32 with the ONNX parity tolerance, int8 through the int8 gate). Its metadata
(mineralnet.export.phone) is a constant method `mineralnet_metadata` returning the JSON text, and the
sidecar `model[.int8].pte.json`.
The Python runtime needs torch (ExecuTorch's pybindings take torch tensors); apps use the C++/Java/
Swift runtime and need neither.
"""
from __future__ import annotations

import copy
import json
import time
import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.export import phone
from mineralnet.infer.executorch import METADATA_METHOD, ExecuTorchRunner, _version

NAMES = {"fp32": "model.pte", "int8": "model.int8.pte"}


def _head(ctx):
    from mineralnet.export import onnx as xonnx

    return xonnx.ExportHead(copy.deepcopy(ctx.model).float().eval().cpu(), ctx.options.outputs,
                            novelty=ctx.novelty).eval()


def to_pte(head, example, meta: dict, photos: np.ndarray | None = None) -> bytes:
    """ExportHead -> .pte bytes lowered to XNNPACK; int8 (PT2E, ranges measured on the quantization `photos`)
    when `photos` are given."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        if photos is not None:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                                  get_symmetric_quantization_config)
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(torch.export.export(head, (example,)).module(), quantizer)
            batch = example.shape[0]
            for start in range(0, len(photos) - batch + 1, batch):
                prepared(torch.from_numpy(np.ascontiguousarray(photos[start:start + batch], np.float32)))
            head = convert_pt2e(prepared)
        program = torch.export.export(head, (example,))
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           constant_methods={METADATA_METHOD: json.dumps(meta)})
        return bytes(edge.to_executorch().buffer)


def check(options, run=None) -> None:
    """The table row's check: executorch installed and a fixed batch."""
    phone.check_format("executorch", options)


def write(ctx) -> list:
    """The table row: model.pte (fp32), and model.int8.pte when --int8 was asked (ctx.formats), each checked in
    ExecuTorch's runtime before it is written."""
    import torch

    check(ctx.options)
    batch = phone.fixed_batch(ctx)
    s = int(ctx.meta["image_size"])
    example = torch.zeros(batch, 3, s, s)
    artifacts = []
    for precision in phone.precisions(ctx, ("int8",)):
        meta = phone.metadata(ctx, fmt="executorch", precision=precision)
        record = {"format": "executorch", "precision": precision, "backend": "XNNPACK",
                  "outputs": list(ctx.options.outputs), "batch": ctx.batch_info(),
                  "input": {"name": "images", "shape": [batch, 3, s, s]}, "versions": {"executorch": _version()}}
        photos = None
        if precision == "int8":
            photos, skipped = ctx.quantization_photos()
            record["quantization"] = {"method": "PT2E XNNPACKQuantizer", "weights": "int8 symmetric per-channel",
                                      "activations": "int8", "io": "float32"}
            record["quantization_photos"] = {"source": ctx.quantization_source, "images": int(len(photos)),
                                             "skipped": skipped}
        t0 = time.perf_counter()
        try:
            data = to_pte(_head(ctx), example, meta, photos)
        except MineralNetError:
            raise
        except Exception as e:
            raise MineralNetError(f"ExecuTorch could not lower {ctx.model.config()} ({precision}; "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                                  f"report it with the executorch version") from None
        record["convert_seconds"] = round(time.perf_counter() - t0, 1)
        artifacts.append(phone.check_and_save(ctx, NAMES[precision], data, meta, record, runner=ExecuTorchRunner,
                                                label="ExecuTorch"))
    return artifacts
