"""ONNX export of a FusionNet: fp32 / fp16 graphs, the parity gate, and int8 QDQ quantization.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), the default and the
maintained path since torch 2.9. Measured against the legacy TorchScript exporter on torch 2.14
(ResNet-50 F2+F4): the same numbers (max |logit diff| vs PyTorch 5.6e-8 for both) and the same
ONNX Runtime latency, but a clean graph (53 Conv + 49 Relu + 16 Add + 2 ReduceMean + Concat +
Gemm, BatchNorm folded) where the legacy one adds 59 Identity nodes and a DeprecationWarning. It
needs opset >= 18 (the down-conversion to 17 fails on ReduceMean), which ONNX Runtime >= 1.14 and
TensorRT 10 read. It is 3-6x slower to export (7-14 s vs 1-5 s), which does not matter.

`write_fp32` / `write_fp16` are the table rows of model.onnx and model.fp16.onnx (export/formats.py):
they build the graph, put the metadata in (export/metadata.py), and save it only after the parity
gate (export/gates.py) passes. int8 quantization of model.onnx lives in export/int8.py.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mineralnet.errors import MineralNetError
from mineralnet.infer.ort import ort_session, run_session

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probs", "embedding", "novelty")  # novelty: runs with a calibration
DEFAULT_OUTPUTS = ("logits", "probs")
MIN_OPSET = 18
DEFAULT_OPSET = 18

class ExportHead(nn.Module):
    """FusionNet -> the named outputs, in order: logits (B, C), probs (B, C), embedding (B, D),
    novelty (B,) (the run's calibrated detector, `novelty(fused, logits)`, computed in float32).

    With ``half=True`` the network runs in fp16 between a cast of the fp32 input and casts of the
    outputs back to fp32, so callers feed and read float32 whatever the precision; the softmax is
    taken in fp32.
    """

    def __init__(self, model: nn.Module, outputs: Sequence[str] = DEFAULT_OUTPUTS, half: bool = False,
                 novelty: nn.Module | None = None):
        super().__init__()
        self.model = model.half() if half else model
        self.novelty = novelty
        self.outputs = tuple(outputs)
        self.half = half

    def forward(self, images: torch.Tensor):
        x = images.half() if self.half else images
        fused = self.model.embed(x)  # (B, feature_dim)
        logits = self.model.forward_head(fused).float()  # (B, num_classes)
        values = {"logits": logits, "embedding": fused.float()}
        if "probs" in self.outputs:
            values["probs"] = torch.softmax(logits, dim=1)
        if "novelty" in self.outputs:
            values["novelty"] = self.novelty(fused.float(), logits)
        return tuple(values[name] for name in self.outputs)


def parse_outputs(text: str | Sequence[str]) -> tuple[str, ...]:
    """"logits,probs" -> ("logits", "probs"), in the canonical order, validated."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    bad = [n for n in names if n not in OUTPUT_NAMES]
    if bad or not names:
        raise MineralNetError(f"--outputs {','.join(names) or repr(text)}: choose a comma list of "
                              f"{', '.join(OUTPUT_NAMES)} (e.g. --outputs logits,probs)")
    return tuple(n for n in OUTPUT_NAMES if n in names)


def onnx_proto(model: nn.Module, *, image_size: int, outputs: Sequence[str] = DEFAULT_OUTPUTS,
               batch: int = 1, dynamic: bool = False, opset: int = DEFAULT_OPSET, half: bool = False,
               novelty: nn.Module | None = None):
    """Export `model` (a FusionNet) to an in-memory, self-contained onnx.ModelProto.

    The input is ``images`` (B, 3, S, S) float32, normalised RGB; B is the symbol ``batch`` when
    `dynamic`, else the fixed `batch`. Outputs are named as in `outputs`.
    """

    if opset < MIN_OPSET:
        raise MineralNetError(f"--opset {opset}: the torch.export-based exporter writes opset {MIN_OPSET} or "
                              f"newer (read by ONNX Runtime >= 1.14 and TensorRT >= 8.6); use --opset {MIN_OPSET}")
    model = copy.deepcopy(model).float().eval().cpu()  # .half() below must not touch the caller's model
    head = ExportHead(model, outputs, half=half, novelty=novelty).eval()
    example = torch.zeros(2 if dynamic else batch, 3, image_size, image_size)
    kwargs = {}
    if dynamic:
        kwargs["dynamic_shapes"] = {"images": {0: torch.export.Dim("batch")}}
    try:
        program = torch.onnx.export(head, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(outputs), opset_version=opset, external_data=False,
                                    verbose=False, **kwargs)
    except Exception as e:
        raise MineralNetError(f"torch.onnx.export failed for {model.config()} at opset {opset} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); try another --opset") from None
    proto = program.model_proto
    if dynamic:  # name the symbolic batch dimension "batch" on the input and every output
        for value in list(proto.graph.input) + list(proto.graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_value")
            dim.dim_param = "batch"
    return proto


def check_proto(proto) -> None:
    """onnx.checker full check (graph, types, shape inference) and self-containedness."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise MineralNetError(f"the exported ONNX graph fails onnx.checker ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); report this with the model config") from None
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise MineralNetError(f"ONNX weights {external[:3]} are stored outside the file; the exporter must "
                              f"embed them (model under 2 GB)")


def torch_fp16(ctx, images: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    """PyTorch running the graph model.fp16.onnx holds (ExportHead with half=True) on `images`: the fp16
    error the format itself costs, the parity gate's floor."""
    head = ExportHead(copy.deepcopy(ctx.model).float().eval().cpu(), ctx.options.outputs, half=True,
                      novelty=ctx.novelty).eval()
    with torch.no_grad():
        outs = [head(torch.from_numpy(np.ascontiguousarray(images[i:i + batch], dtype=np.float32)))
                for i in range(0, len(images), batch)]
    return {name: np.concatenate([o[k].numpy() for o in outs]) for k, name in enumerate(ctx.options.outputs)}


# ----------------------------------------------------------------------------- the table rows
def _write_float(ctx, precision: str) -> list:
    from mineralnet.export import gates, metadata

    o = ctx.options
    name = "model.onnx" if precision == "fp32" else "model.fp16.onnx"
    proto = onnx_proto(ctx.model, image_size=ctx.meta["image_size"], outputs=o.outputs, batch=o.profile.max,
                       dynamic=o.profile.dynamic, opset=o.opset, half=precision == "fp16", novelty=ctx.novelty)
    metadata.set_onnx_metadata(proto, metadata.onnx_props(ctx.meta, precision=precision, outputs=o.outputs,
                                                          batch=ctx.batch_info()))
    check_proto(proto)
    data = proto.SerializeToString()
    session = ort_session(data)
    hint = ("the ONNX graph does not reproduce the PyTorch model (try another --opset, or report it)"
            if precision == "fp32" else "fp16 rounding exceeds the tolerance on these images: check it on your "
            "own photos with --val-data DIR, or ship model.onnx (fp32)")
    report = gates.parity(ctx, lambda images: run_session(session, images), precision=precision,
                          what="parity gate", hint=hint,
                          floor_run=(lambda images: torch_fp16(ctx, images)) if precision == "fp16" else None)
    art = ctx.save(name, data, {"format": "onnx", "precision": precision, "opset": o.opset,
                                "input": {"name": INPUT_NAME, "shape": ctx.input_shape()},
                                "outputs": list(o.outputs), "batch": ctx.batch_info(),
                                "parity": report, "versions": metadata.versions()})
    ctx.files[precision] = art.path
    return [art]


def write_fp32(ctx) -> list:
    """model.onnx: the fp32 graph, parity-gated (max |logit diff| <= 1e-4, identical top-1)."""
    return _write_float(ctx, "fp32")


def write_fp16(ctx) -> list:
    """model.fp16.onnx: fp16 weights and compute, float32 input/outputs, fp16 parity tolerance."""
    return _write_float(ctx, "fp16")
