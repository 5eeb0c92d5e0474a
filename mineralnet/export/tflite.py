"""LiteRT (TFLite) export for Android and small boards (the runner is mineralnet/infer/litert.py).

    mineralnet-export RUN --tflite                                   # model.tflite (fp32)
    mineralnet-export RUN --tflite --fp16                            # + model.fp16.tflite
    mineralnet-export RUN --tflite --int8                            # + model.int8.tflite (float tail and I/O)
    mineralnet-export RUN --tflite --int8 --tflite-int8 full         # full integer (int8 input/outputs)

Converter: `litert_torch.convert` (PyTorch -> LiteRT directly, through torch.export; no TensorFlow).
fp16 stores the weights as float16 (ai-edge-quantizer FLOAT_CASTING; the CPU computes in fp32, a GPU
delegate in fp16). int8 (ai-edge-quantizer, static: int8 weights per channel, int8 activations whose
ranges are measured on the quantization photos through the evaluation preprocessing) comes in two recipes
(`--tflite-int8`):
- float-tail (default): the convolutions, depthwise convolutions and residual adds in int8; the fusion tail
  (global pooling, concat, the linear layer, the novelty score) and the input/outputs in float. The same
  rule as model.int8.onnx (quantize/recipe.py): rounding the logits to 8 bits costs the near-ties, and the
  tail is a negligible share of the MACs.
- full: every supported op, int8 input and outputs with their scale/zero point in the file
  (`static_wi8_ai8`): what NPUs and the Edge TPU-class accelerators need.

Every file is checked in the LiteRT interpreter (ai-edge-litert, XNNPACK on this CPU) before it is
written, through export/gates.py: fp32/fp16 against PyTorch with the ONNX parity tolerances, int8
through the int8 gate (agreement with PyTorch fp32, accuracy with --val-data).
The metadata (mineralnet.export.phone) is a TFLite `Model.metadata` entry named "mineralnet" and the
sidecar `model[.fp16|.int8].tflite.json`.
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path
import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.export import phone
from mineralnet.infer.litert import LiteRTRunner, _name, _version

NAMES = {"fp32": "model.tflite", "fp16": "model.fp16.tflite", "int8": "model.int8.tflite"}


# ----------------------------------------------------------------------------- metadata
def embed_metadata(data: bytes, meta: dict) -> bytes:
    """The .tflite flatbuffer with `meta` (JSON) as the Model.metadata entry METADATA_KEY (replacing one)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    for b in model.buffers or []:
        # litert-torch stores the weights after the flatbuffer (Buffer.offset/size into the file); repacking
        # drops that tail, so bring them inside (models under 2 GB may hold them inline)
        if getattr(b, "offset", 0) > 1:
            b.data = np.frombuffer(data, np.uint8, count=b.size, offset=b.offset)
            b.offset, b.size = 0, 0
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = phone.METADATA_KEY, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if _name(m.name) != phone.METADATA_KEY] + [entry]
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def convert_fp32(ctx, batch: int) -> bytes:
    """PyTorch ExportHead -> fp32 .tflite bytes (litert-torch), no metadata yet."""
    import copy

    import torch

    from mineralnet.export import onnx as xonnx

    s = int(ctx.meta["image_size"])
    head = xonnx.ExportHead(copy.deepcopy(ctx.model).float().eval().cpu(), ctx.options.outputs,
                            novelty=ctx.novelty).eval()
    import litert_torch

    with tempfile.TemporaryDirectory(prefix="mineralnet-tflite-") as tmp, _quiet():
        try:
            model = litert_torch.convert(head, (torch.zeros(batch, 3, s, s),))
        except Exception as e:
            raise MineralNetError(f"litert-torch could not convert {ctx.model.config()} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); report it with the "
                                  f"litert-torch version") from None
        out = Path(tmp) / "model.tflite"
        model.export(str(out))
        return out.read_bytes()


@contextlib.contextmanager
def _quiet():
    """litert-torch and ai-edge-quantizer print progress lines on stdout: keep the export log readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def quantize_fp16(fp32: bytes) -> bytes:
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe_manager

    rm = recipe_manager.RecipeManager()
    rm.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                              algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    with _quiet():
        return bytes(quantizer.Quantizer(fp32, rm.get_quantization_recipe()).quantize().quantized_model)


INT8_RECIPES = ("float-tail", "full")
BACKBONE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD")  # what float-tail quantizes


def int8_recipe(mode: str):
    """The ai-edge-quantizer recipe of `--tflite-int8 mode` (see the module doc)."""
    from ai_edge_quantizer import qtyping, recipe, recipe_manager

    if mode not in INT8_RECIPES:
        raise MineralNetError(f"--tflite-int8 {mode!r}: choose one of {', '.join(INT8_RECIPES)}")
    if mode == "full":
        return recipe.static_wi8_ai8()
    rm = recipe_manager.RecipeManager()
    for op in BACKBONE_OPS:
        rm.add_static_config(regex=".*", operation_name=getattr(qtyping.TFLOperationName, op),
                             activation_num_bits=8, weight_num_bits=8)
    return rm.get_quantization_recipe()


def quantize_int8(fp32: bytes, photos: np.ndarray, batch: int, mode: str = "float-tail") -> bytes:
    """int8 by `--tflite-int8 mode` (int8 weights per channel, int8 activations), ranges measured on `photos`."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer

    sig = Interpreter(model_content=fp32).get_signature_list()
    key = next(iter(sig))
    name = sig[key]["inputs"][0]
    chunks = ([photos[i:i + batch] for i in range(0, len(photos) - batch + 1, batch)]
              or [np.repeat(photos[:1], batch, 0)])
    data = {key: [{name: np.ascontiguousarray(c, np.float32)} for c in chunks]}
    q = quantizer.Quantizer(fp32, int8_recipe(mode))
    with _quiet():
        result = q.calibrate(data)
        return bytes(q.quantize(result).quantized_model)


def check(options, run=None) -> None:
    """The table row's check: litert-torch, ai-edge-litert and ai-edge-quantizer installed, a fixed batch."""
    if options.tflite_int8 not in INT8_RECIPES:  # a typo is named before the packages are looked for
        raise MineralNetError(f"--tflite-int8 {options.tflite_int8!r}: choose one of {', '.join(INT8_RECIPES)}")
    phone.check_format("tflite", options)


def write(ctx) -> list:
    """The table row: model.tflite (fp32), and model.fp16.tflite / model.int8.tflite when --fp16 / --int8 were
    asked (ctx.formats), each made from the fp32 conversion and checked in LiteRT before it is written."""
    check(ctx.options)
    precisions = phone.precisions(ctx, ("fp16", "int8"))
    batch = phone.fixed_batch(ctx)
    t0 = time.perf_counter()
    fp32 = convert_fp32(ctx, batch)
    convert_s = time.perf_counter() - t0
    artifacts = []
    for precision in precisions:
        record = {"format": "tflite", "precision": precision, "outputs": list(ctx.options.outputs),
                  "batch": ctx.batch_info(), "input": {"name": "images", "shape": [batch, 3, ctx.meta["image_size"],
                                                                                    ctx.meta["image_size"]]},
                  "versions": {"litert_torch": _dist("litert-torch"), "ai_edge_litert": _version()},
                  "convert_seconds": round(convert_s, 1)}
        if precision == "fp32":
            data = fp32
        elif precision == "fp16":
            data = quantize_fp16(fp32)
            record["quantization"] = {"weights": "float16", "compute": "fp32 on CPU (fp16 on a GPU delegate)"}
        else:
            photos, skipped = ctx.quantization_photos()
            mode = ctx.options.tflite_int8
            data = quantize_int8(fp32, photos, batch, mode)
            record["quantization"] = (
                {"recipe": "full (ai-edge-quantizer static_wi8_ai8)", "weights": "int8 per-channel",
                 "activations": "int8", "io": "int8 (scale/zero point in the file)"} if mode == "full" else
                {"recipe": "float-tail (ai-edge-quantizer static int8 for " + ", ".join(BACKBONE_OPS) + ")",
                 "weights": "int8 per-channel", "activations": "int8 in the backbone",
                 "float": "pooling, concat, linear, novelty", "io": "float32"})
            record["quantization_photos"] = {"source": ctx.quantization_source, "images": int(len(photos)),
                                             "skipped": skipped}
        meta = phone.metadata(ctx, fmt="litert", precision=precision)
        data = embed_metadata(data, meta)
        artifacts.append(phone.check_and_save(ctx, NAMES[precision], data, meta, record, runner=LiteRTRunner,
                                                label="LiteRT"))
    return artifacts


def _dist(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return version(name)
    return "?"
