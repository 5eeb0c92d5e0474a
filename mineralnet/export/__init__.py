"""Export a trained run to ONNX (fp32 / fp16 / int8 QDQ) and TensorRT, each verified before it is written.

    from mineralnet.export import export, ExportOptions
    export("runs/exp1", ["int8"], ExportOptions(calib_data="photos/train"))

Modules: `onnx` (graph export, parity gate, quantization), `tensorrt` (profiles, engine build,
runner), `formats` (the table of formats and the pipeline), `cli` (`mineralnet-export`).
onnx, onnxruntime and tensorrt are imported inside the functions that use them.
"""
from mineralnet.export.formats import FORMATS, Artifact, ExportOptions, export
from mineralnet.export.tensorrt import BatchProfile

__all__ = ["FORMATS", "Artifact", "BatchProfile", "ExportOptions", "export"]
