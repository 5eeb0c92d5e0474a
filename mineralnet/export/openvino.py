"""OpenVINO IR export (fp32, int8) and the OpenVINO runtime used by `Predictor` and the benchmarks.

    mineralnet-export RUN --openvino                            # model.xml + model.bin (fp32)
    mineralnet-export RUN --openvino --int8 --calib-data DIR    # + model.int8.xml + model.int8.bin

The IR is converted from the parity-gated ONNX file, never from PyTorch directly, so every format
of one export computes the same graph. int8 comes either from the int8 QDQ ONNX (`qdq`, the
default: OpenVINO turns its Q/DQ pairs into FakeQuantize and runs them with its own int8 kernels),
or from NNCF post-training quantization of the fp32 IR on the same calibration photos (`nncf`).
bench/RESULTS.md ("OpenVINO on this CPU") has the measurement behind the default.

The metadata of the ONNX file (classes, preprocessing, precision, ...) is carried in the IR's
rt_info under `mineralnet`, as the same JSON strings, so `read_metadata` gives `Predictor` the same
dict as the ONNX metadata_props. Weights are stored as fp32 (OpenVINO's `save_model` would halve
them to fp16 by default, which the parity gate would then measure, not the conversion).

Runtime precision: OpenVINO runs an fp32 IR in bf16 by default on CPUs with bf16 hardware. Here
the hint is explicit: `fp32` (exact; the default everywhere in MineralNet) or `bf16`/`fp16`
(faster where the CPU has it, not parity-gated: the benchmark reports its accuracy).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mineralnet.errors import MineralNetError

IR_NAMES = {"fp32": "model.xml", "int8": "model.int8.xml"}
RT_INFO_KEY = "mineralnet"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # runtime hint -> OpenVINO's name
INT8_METHODS = ("qdq", "nncf")
INSTALL = "pip install 'mineralnet[openvino]'"


def openvino_missing() -> str | None:
    """Why OpenVINO cannot be used here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return f"the openvino package is not installed ({INSTALL})"
    return None


def _ov():
    missing = openvino_missing()
    if missing:
        raise MineralNetError(f"OpenVINO IR export and inference need OpenVINO: {missing}")
    import openvino

    return openvino


def bin_path(xml_path) -> Path:
    return Path(xml_path).with_suffix(".bin")


# ----------------------------------------------------------------------------- metadata
def set_metadata(model, props: dict[str, str]) -> None:
    """Store `props` (str -> JSON str, as in the ONNX metadata_props) in the IR's rt_info."""
    for key, value in props.items():
        model.set_rt_info(value, [RT_INFO_KEY, key])


def read_metadata(model, where: str) -> dict:
    """The model meta dict (classes, mean, std, ...) from an ov.Model's rt_info."""
    from mineralnet.export.onnx import parse_metadata

    if not model.has_rt_info([RT_INFO_KEY]):
        raise MineralNetError(f"OpenVINO IR {where!r} carries no MineralNet metadata (rt_info `{RT_INFO_KEY}`): "
                              f"it was not written by mineralnet-export; export it with "
                              f"`mineralnet-export RUN --openvino`")
    keys = model.get_rt_info()[RT_INFO_KEY]
    return parse_metadata({k: model.get_rt_info([RT_INFO_KEY, k]).astype(str) for k in keys})


# ----------------------------------------------------------------------------- conversion
def convert(onnx_path, props: dict[str, str]):
    """ONNX file -> ov.Model with `props` in its rt_info."""
    ov = _ov()
    try:
        model = ov.convert_model(os.fspath(onnx_path))
    except Exception as e:
        raise MineralNetError(f"OpenVINO cannot convert {os.fspath(onnx_path)!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); report it with the "
                              f"OpenVINO version ({ov.__version__})") from None
    set_metadata(model, props)
    return model


def quantize_nncf(model, calib_images: np.ndarray, batch: int | None):
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
    for start in range(0, len(calib_images), step):
        x = calib_images[start:start + step]
        if batch and len(x) < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])
        items.append(np.ascontiguousarray(x, dtype=np.float32))
    rt = {k: model.get_rt_info([RT_INFO_KEY, k]).astype(str) for k in model.get_rt_info()[RT_INFO_KEY]}
    quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), fast_bias_correction=True)
    set_metadata(quantized, rt)
    return quantized


def save_ir(model, folder, name: str) -> Path:
    """Write `model` as folder/name (.xml) + .bin with fp32 weights; returns the .xml path."""
    ov = _ov()
    xml = Path(folder) / name
    ov.save_model(model, os.fspath(xml), compress_to_fp16=False)
    return xml


# ----------------------------------------------------------------------------- runtime
def compile_ir(model_or_path, *, precision: str = "fp32", threads: int | None = None,
               latency: bool = True):
    """An ov.CompiledModel on the CPU with an explicit inference precision hint.

    Args:
        precision: fp32 (exact), bf16 or fp16 (faster where the CPU has the instructions).
        threads: inference threads (default: OpenVINO's, all physical cores).
        latency: one stream, for the per-call latency of synchronous requests (the benchmark's and
            `Predictor`'s way of calling); False lets OpenVINO pick streams for throughput.
    """
    ov = _ov()
    if precision not in PRECISION_HINTS:
        raise MineralNetError(f"OpenVINO precision {precision!r}: choose one of {', '.join(PRECISION_HINTS)}")
    core = ov.Core()
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = read_ir(core, model_or_path)
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
              "PERFORMANCE_HINT": "LATENCY" if latency else "THROUGHPUT"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        return core.compile_model(model, "CPU", config)
    except Exception as e:
        raise MineralNetError(f"OpenVINO cannot compile the model for the CPU with precision {precision} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                              f"try --precision fp32") from None


def read_ir(core, path):
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file() or not bin_path(p).is_file():
        raise MineralNetError(f"OpenVINO IR {str(p)!r} needs both the .xml and its {bin_path(p).name} beside it; "
                              f"copy both files, or export again with `mineralnet-export RUN --openvino`")
    try:
        return core.read_model(os.fspath(p))
    except Exception as e:
        raise MineralNetError(f"OpenVINO cannot read {str(p)!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); the file is damaged or from "
                              f"a newer OpenVINO: export it again with `mineralnet-export RUN --openvino`") from None


class IRRunner:
    """An OpenVINO IR on the CPU: images (N, 3, S, S) float32 -> {output name: (N, ...)}.

    A fixed-batch IR gets its last chunk padded by repeating the last image, as ONNX files are.
    """

    def __init__(self, model_or_path, *, precision: str = "fp32", threads: int | None = None):
        model = model_or_path
        if isinstance(model_or_path, (str, os.PathLike)):
            model = read_ir(_ov().Core(), model_or_path)
        where = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else "the IR"
        self.meta = read_metadata(model, where)  # rt_info: the compiled model does not keep it
        self.compiled = compile_ir(model, precision=precision, threads=threads)
        self.request = self.compiled.create_infer_request()
        self.input = self.compiled.input(0)
        shape = self.input.get_partial_shape()
        self.batch = shape[0].get_length() if shape[0].is_static else None
        self.names = [o.get_any_name() for o in self.compiled.outputs]
        self.precision = precision

    def infer(self, x: np.ndarray):
        """One request on a batch the model accepts; the results stay in OpenVINO's buffers."""
        return self.request.infer({self.input: x})

    def run(self, images: np.ndarray, batch: int | None = None) -> dict[str, np.ndarray]:
        step = self.batch or batch or 16
        chunks: dict[str, list] = {n: [] for n in self.names}
        for start in range(0, len(images), step):
            x = np.ascontiguousarray(images[start:start + step], dtype=np.float32)
            n = len(x)
            if self.batch and n < self.batch:
                x = np.concatenate([x, np.repeat(x[-1:], self.batch - n, axis=0)])
            result = self.infer(x)
            for name, out in zip(self.names, self.compiled.outputs):
                chunks[name].append(np.array(result[out][:n], dtype=np.float32))
        return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in chunks.items()}


@dataclass
class TimingRuntime:
    """What a benchmark needs to time an IR: `fn(x)` runs one batch, `make_inputs(batch, n)` gives inputs."""

    fn: Callable
    make_inputs: Callable
    precision: str
    label: str


def timing_runtime(path, precision: str = "fp32", threads: int | None = None) -> TimingRuntime:
    """A compiled IR (fp32 or int8 file) and its synchronous infer call, for the benchmark tables.

    `precision` is the runtime hint for the layers that are not int8: fp32, bf16 or fp16. A
    fixed-batch IR accepts only its own batch (make_inputs raises for another one).
    """
    runner = IRRunner(path, precision=precision, threads=threads)
    size = int(runner.input.get_partial_shape()[-1].get_length())

    def make_inputs(batch: int, n: int) -> list[np.ndarray]:
        if runner.batch and batch != runner.batch:
            raise MineralNetError(f"{os.fspath(path)!r} has a fixed batch of {runner.batch}, not {batch}; "
                                  f"export with --dynamic to time other batch sizes")
        rng = np.random.default_rng(batch)
        return [rng.standard_normal((batch, 3, size, size)).astype(np.float32) for _ in range(n)]

    return TimingRuntime(runner.infer, make_inputs, precision, f"OpenVINO CPU ({precision} hint)")


# ----------------------------------------------------------------------------- the export format
def export_openvino(ctx, precisions: Sequence[str], method: str = "qdq") -> list:
    """model.xml (fp32, parity-gated like model.onnx) and, when int8 is asked, model.int8.xml
    (from model.int8.onnx, or NNCF on the calibration photos; gated on top-1 agreement)."""
    if method not in INT8_METHODS:
        raise MineralNetError(f"--openvino-int8 {method!r}: choose one of {', '.join(INT8_METHODS)}")
    _ov()
    return [_export_ir(ctx, p, method) for p in precisions]


def _export_ir(ctx, precision: str, method: str):
    from mineralnet.export import onnx as xonnx

    o = ctx.options
    source = ctx.files["int8" if precision == "int8" and method == "qdq" else "fp32"]
    props = xonnx.metadata_props(ctx.meta, precision=precision, outputs=o.outputs, batch=ctx.batch_info())
    model = convert(source, props)
    record = {"format": "openvino", "precision": precision, "source": Path(source).name,
              "outputs": list(o.outputs), "batch": ctx.batch_info()}
    if precision == "int8" and method == "nncf":
        calib = ctx.calibration_images()
        model = quantize_nncf(model, calib, None if o.profile.dynamic else o.profile.max)
        record["quantization"] = {"method": "nncf", "preset": "performance (symmetric int8)",
                                  "calib_images": int(len(calib))}
    elif precision == "int8":
        record["quantization"] = {"method": "qdq", "from": Path(source).name}
    with tempfile.TemporaryDirectory(prefix="mineralnet-ov-") as tmp:
        xml = save_ir(model, tmp, IR_NAMES[precision])
        runner = IRRunner(xml, precision="fp32")
        images, src = ctx.check_images()
        got = runner.run(images)
        if precision == "fp32":
            record["parity"] = _parity(ctx, got, images, src)
        else:
            agreement = _agreement(ctx, xml, got, images, src)
            accuracy = agreement.pop("accuracy", None)
            record["int8"] = {"agreement": agreement, **({"accuracy": accuracy} if accuracy else {})}
        xml_bytes, bin_bytes = xml.read_bytes(), bin_path(xml).read_bytes()
    from mineralnet.runs import atomic_write_bytes

    ir_bin = bin_path(ctx.path(IR_NAMES[precision]))
    atomic_write_bytes(ir_bin, bin_bytes)  # weights first: an .xml without its .bin cannot load
    record.update(weights={"file": ir_bin.name, "bytes": len(bin_bytes)}, openvino=_ov().__version__)
    art = ctx.write(IR_NAMES[precision], xml_bytes, record)
    art.record["bytes"] += len(bin_bytes)  # the log line gives the size of the pair
    return art


def _parity(ctx, got: dict, images: np.ndarray, source: str) -> dict:
    from mineralnet.export import onnx as xonnx

    reference = xonnx.torch_outputs(ctx.model, images, ctx.options.outputs)
    report = xonnx.compare(reference, got, precision="fp32", source=source)
    if not report.passed:
        raise MineralNetError(f"OpenVINO parity gate FAILED, nothing written: {report.summary()}; the IR does "
                              f"not reproduce the PyTorch model (report it with the OpenVINO version)")
    return report.to_dict()


def _agreement(ctx, xml: Path, got: dict, images: np.ndarray, source: str) -> dict:
    """Top-1 agreement of the int8 IR with PyTorch fp32 (on --val-data when given, with both accuracies)."""
    from mineralnet.export import onnx as xonnx

    o = ctx.options
    if o.val_data:
        from mineralnet.predict import Predictor, score_photos

        fp32 = score_photos(Predictor(ctx.run, device="cpu"), o.val_data)
        int8 = score_photos(Predictor(xml), o.val_data, reference=fp32["preds"])
        result = {"top1": int8["agreement"], "images": int8["images"], "source": "--val-data photos",
                  "accuracy": {"fp32": fp32["top1"], "int8": int8["top1"], "images": int8["images"]}}
    else:
        reference = xonnx.torch_outputs(ctx.model, images, o.outputs)
        key = "logits" if "logits" in reference else next(iter(reference))
        result = {"top1": xonnx.agreement(reference[key], got[key]), "images": len(images), "source": source}
    if not result["top1"] >= o.min_agreement:
        raise MineralNetError(f"OpenVINO int8 gate FAILED, nothing written: top-1 agreement with fp32 is "
                              f"{result['top1']:.1%} on {result['images']} {result['source']} (minimum "
                              f"{o.min_agreement:.0%}); calibrate on more representative photos (--calib-data, "
                              f"--calib-size) or try the other --openvino-int8 method")
    return result
