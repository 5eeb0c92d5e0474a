"""LiteRT (.tflite) at run time: the metadata inside a file written by mineralnet-export, and `LiteRTRunner`."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.infer import phone


def _name(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_metadata(data: bytes) -> dict | None:
    """The METADATA_KEY entry of a .tflite flatbuffer, parsed, or None."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if _name(entry.Name()) == phone.METADATA_KEY:
            raw = model.Buffers(entry.Buffer()).DataAsNumpy()
            with contextlib.suppress(ValueError, TypeError):
                return json.loads(bytes(raw).decode())
    return None


# ----------------------------------------------------------------------------- runner
class LiteRTRunner:
    """A .tflite from mineralnet-export in the LiteRT interpreter: float32 images in, float32 outputs out
    (an int8 model's input is quantized and its outputs dequantized with the scales stored in the file)."""

    def __init__(self, path, threads: int | None = None):
        phone.require("ai_edge_litert")
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(os.path.expanduser(os.fspath(path)))
        data = self.path.read_bytes()
        try:
            inner = read_metadata(data)
        except Exception as e:
            raise MineralNetError(f"{str(self.path)!r} is not a readable .tflite file ({type(e).__name__}); export "
                                  f"it again with `mineralnet-export RUN --tflite`") from None
        self.meta = phone.check_meta(inner or phone.read_sidecar(self.path), self.path)
        self.interpreter = Interpreter(model_content=data, num_threads=threads)
        sig = self.interpreter.get_signature_list()
        key = next(iter(sig))
        self.runner = self.interpreter.get_signature_runner(key)
        (self.input_name, self.input), = self.runner.get_input_details().items()
        details = self.runner.get_output_details()
        # litert-torch names the signature outputs output_0..output_k in the order of the exported head,
        # which is meta["outputs"]
        order = sorted(details, key=lambda n: int(n.rsplit("_", 1)[-1]) if n.rsplit("_", 1)[-1].isdigit() else n)
        if len(order) != len(self.meta["outputs"]):
            raise MineralNetError(f"{str(self.path)!r} has {len(order)} outputs but its metadata names "
                                  f"{self.meta['outputs']}; export it again with mineralnet-export")
        self._outputs = [(name, details[name]) for name in order]
        self.batch = int(self.input["shape"][0])
        self.label = f"LiteRT {_version()} (XNNPACK)"

    def _call(self, x: np.ndarray) -> list:
        if np.issubdtype(self.input["dtype"], np.integer):
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(self.input["dtype"])
        result = self.runner(**{self.input_name: x})
        values = []
        for name, d in self._outputs:
            v = result[name]
            if np.issubdtype(d["dtype"], np.integer):
                scale, zero = d["quantization"]
                v = (v.astype(np.float32) - zero) * np.float32(scale)
            values.append(v)
        return values

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = phone.run_fixed(self._call, images, self.batch, self.meta["outputs"])
        if "novelty" in out:
            out["novelty"] = out["novelty"].reshape(-1)
        return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return version("ai-edge-litert")
    return "?"


# ----------------------------------------------------------------------------- export
