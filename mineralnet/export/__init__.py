"""Export a trained run to ONNX (fp32 / fp16 / int8 QDQ), TensorRT, OpenVINO and Triton, each file
verified before it is written.

    from mineralnet.export import export, ExportOptions
    export("runs/exp1", ["int8"], ExportOptions(quant_data="photos/train"))

Modules: `formats` (the table of formats and `export()`, a loop over it), `context` (ExportContext and
ExportOptions: what every format's `write(ctx)` gets), `gates` (parity, int8 agreement and accuracy:
one implementation for every format), `metadata` (everything written into and beside the files),
one module per format (`onnx`, `int8`, `tensorrt`, `openvino` + `ir`, `triton`), `cli`
(`mineralnet-export`). onnx, onnxruntime, openvino and tensorrt are imported where they are used.
"""
from mineralnet.export.context import Artifact, ExportOptions
from mineralnet.export.formats import FORMATS, export
from mineralnet.infer.tensorrt import BatchProfile

__all__ = ["FORMATS", "Artifact", "BatchProfile", "ExportOptions", "export"]
