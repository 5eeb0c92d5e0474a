"""The export table: one row per format, and `export()`, a loop over the rows asked for.

    export("runs/exp1", ["onnx", "int8"], ExportOptions(quant_data="photos/train"))

writes into RUN/export/ (or `out_dir`):

    model.onnx          fp32, parity-gated against PyTorch                          (export/onnx.py)
    model.fp16.onnx     fp16 inside, float32 in and out, parity-gated with the fp16 tolerance
    model.int8.onnx     static QDQ int8 on the quantization photos, gated on held-out photos, with its
                        report model.int8.report.* (export/int8.py -> mineralnet/quantize/);
                        with --trt the TensorRT flavour (int8 Q/DQ, float parts in fp16, opset 19)
    model[.fp16|.int8].engine (+ .engine.json)   strongly typed TensorRT plans from the file of
                        their precision, built on the NVIDIA device                (export/tensorrt.py)
    model[.int8].xml + .bin   OpenVINO IR from the ONNX files, gated like them    (export/openvino.py)
    model[.fp16|.int8].tflite LiteRT for Android/boards, checked in the LiteRT interpreter (export/tflite.py)
    model[.int8].pte    ExecuTorch XNNPACK, checked in ExecuTorch's runtime        (export/executorch.py)
    model.mlpackage     Core ML ML program (fp16), structurally checked            (export/coreml.py)
                        (each phone file carries its metadata inside and in a <file>.json sidecar,
                        export/phone.py)
    DIR/mineralnet_*/   a Triton model repository of the files above               (export/triton.py)
    model.json          the run's metadata plus one record per exported file      (export/metadata.py)

Every file is checked (export/gates.py) before it gets its final name: a failed gate leaves nothing behind.

Adding a format is one module and one row. The module has `write(ctx) -> list[Artifact]` (ctx: an
ExportContext, export/context.py: the loaded model, the check photos, the options, the output folder,
the files written by the rows above it) and, if the format cannot start without something, a
`check(options, run)` that raises before anything is written. The row names the CLI flag (`--NAME`, built
from this table by export/cli.py), the files and the help line. Rows run in table order, so a row may
start from the files of the rows above it (ctx.files: precision -> ONNX file).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from mineralnet.errors import MineralNetError
from mineralnet.export import coreml as xcoreml
from mineralnet.export import executorch as xet
from mineralnet.export import int8 as xint8
from mineralnet.export import onnx as xonnx
from mineralnet.export import openvino as xov
from mineralnet.export import tflite as xtflite
from mineralnet.export import tensorrt as xtrt
from mineralnet.export import triton as xtriton
from mineralnet.export.context import Artifact, ExportContext, ExportOptions, existing_images


@dataclass(frozen=True)
class Format:
    """One row of the format table: the flag that asks for it and the function that writes it."""

    name: str
    files: str
    help: str
    write: Callable[[ExportContext], list[Artifact]]
    check: Callable[..., None] | None = None  # check(options, run): raises before anything is written
    metavar: str | None = None  # the flag takes a value (e.g. --triton DIR) instead of being a switch


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", "model.onnx", "fp32 ONNX (always written: the other formats start from it)", xonnx.write_fp32),
    Format("fp16", "model.fp16.onnx", "fp16 ONNX for GPU runtimes; with --trt also an fp16 engine", xonnx.write_fp16),
    Format("int8", "model.int8.onnx", "int8 QDQ ONNX for edge CPUs, gated on held-out photos (--calib-data: the "
                                      "quantization photos, default the run's training photos); with --trt also an "
                                      "int8 engine", xint8.write, xint8.check),
    Format("trt", "model[.fp16|.int8].engine", "strongly typed TensorRT 10/11 engine(s) for the precisions asked, "
                                               "each from the ONNX file of its precision", xtrt.write),
    Format("openvino", "model[.int8].xml + .bin", "OpenVINO IR for CPUs (fp32; with --int8 also int8), gated like "
                                                  "the ONNX files", xov.write, xov.check),
    Format("tflite", "model[.fp16|.int8].tflite", "LiteRT for Android and small boards (fp32; with --fp16/--int8 "
                                                  "also those), checked in the LiteRT interpreter",
           xtflite.write, xtflite.check),
    Format("executorch", "model[.int8].pte", "ExecuTorch XNNPACK program (fp32; with --int8 also int8), checked in "
                                             "ExecuTorch's runtime", xet.write, xet.check),
    Format("coreml", "model.mlpackage", "Core ML ML program (fp16) for iOS/macOS; structural check only "
                                        "(predictions need macOS)", xcoreml.write, xcoreml.check),
    Format("triton", "DIR/mineralnet_*/", "Triton model repository: every ONNX file written and the TensorRT engines "
                                          "in the output folder, with config.pbtxt", xtriton.write, xtriton.check,
           metavar="DIR"),
)}


def asked(formats: Sequence[str], options: ExportOptions) -> list[str]:
    """The rows to run, in table order: always onnx (everything starts from it), triton when --triton DIR."""
    wanted = {"onnx", *formats, *(["triton"] if options.triton_dir else [])}
    unknown = sorted(wanted - set(FORMATS))
    if unknown:
        raise MineralNetError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return [name for name in FORMATS if name in wanted]


def export(run, formats: Sequence[str], options: ExportOptions | None = None,
           log: Callable[[str], None] | None = None) -> list[Artifact]:
    """Export the run at `run` to `formats` (keys of FORMATS); returns the written files.

    Every row's `check` runs before the model is loaded (a missing folder fails in seconds, not after
    the fp32 export); then each row asked writes its files, in table order.
    """
    options = options or ExportOptions()
    rows = asked(formats, options)
    for name in rows:
        if FORMATS[name].check:
            FORMATS[name].check(options, run)
    for flag, folder in (("--calib-data", options.quant_data), ("--val-data", options.val_data)):
        if folder:
            existing_images(folder, flag)
    ctx = ExportContext(run, options, rows)
    log = log or (lambda line: None)
    ctx.log = log
    for name in rows:
        for art in FORMATS[name].write(ctx):
            ctx.artifacts.append(art)
            log(art.line())
    return ctx.artifacts
