"""Latency and throughput benchmarks people can trust: ``mineralnet bench MODEL...``.

Every measurement warms up for a time (not a count), then runs until a duration has passed,
synchronising the device after each call, rotating among several input buffers so caches do not
flatter the numbers, and reports p50/p90/p99 latency, the mean, images/s and the number of runs.
Each result carries the environment (CPU, GPU, versions), the FLOPs per image counted with
`torch.utils.flop_counter`, and the GFLOP/s achieved. Runtimes that cannot run here are rows
with status "skipped" and the reason, never silently dropped.

    models --open_model--> BenchModel --RUNTIMES[name].build--> Prepared(fn, inputs, sync)
           --measure--> stats --result_row--> rows --> report (JSON) --render_markdown--> Markdown

Models: a run directory (PyTorch runtimes), an .onnx file (ONNX Runtime; OpenVINO when --runtimes names
it), an OpenVINO IR .xml (one row per inference precision hint), a TensorRT .engine, a LiteRT .tflite
(LiteRT interpreter) or an ExecuTorch .pte (ExecuTorch's runtime), the last two as the phone runners.
`--train-step` measures training images/s instead: our `train_one_epoch` under Accelerate against
a bare timm-style loop on the same model, batch and precision, interleaved in one process.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from mineralnet.errors import MineralNetError, fixed_batch_error
from mineralnet.bench.harness import _short_error
from mineralnet.bench.environment import _arch_flops, _version
from mineralnet.infer.backends import KINDS, model_kind
from mineralnet.infer.ensemble import is_ensemble, read_ensemble
from mineralnet.infer.ort import ort_session
from mineralnet.infer.tensorrt import TRTRunner
from mineralnet.model import FusionNet
from mineralnet.artifact import META_FILE, load_model, model_meta, read_meta, run_of, save_model

def make_random_run(run_dir, backbone: str = "resnet50", stages=(2, 4), num_classes: int = 7,
                    image_size: int = 224, seed: int = 0) -> Path:
    """A run directory holding a randomly initialised FusionNet: speed does not depend on the weights,
    so benchmarks need no training (nor pretrained downloads)."""

    torch.manual_seed(seed)
    model = FusionNet(backbone, stages, num_classes, pretrained=False)
    meta = model_meta(model, classes=[f"class_{i}" for i in range(num_classes)], image_size=image_size,
                      mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], resize=round(image_size / 0.875),
                      extra={"note": "random weights, for benchmarking only"})
    save_model(run_dir, model, meta)
    return Path(run_dir)


# ============================================================================ models to benchmark
@dataclass
class BenchModel:
    path: str
    kind: str                       # the model's row in mineralnet.infer.BACKENDS: pytorch, onnx, openvino, ...
    name: str
    meta: Optional[dict]            # model.json contents, when known
    image_size: int
    file_precision: Optional[str]   # precision baked into an ONNX file / engine
    gflop_per_image: Optional[float] = None
    _cache: dict = field(default_factory=dict, repr=False)


def _onnx_meta_and_precision(path: Path) -> tuple[Optional[dict], str, Optional[int]]:
    """(MineralNet metadata or None, "fp32" | "fp16" | "int8", static input side or None) of an ONNX file."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise MineralNetError(f"{str(path)!r} is not a readable ONNX file ({_short_error(e)}); export it again "
                              f"with `mineralnet-export RUN --onnx`") from None
    props = {}
    for prop in m.metadata_props:  # `mineralnet-export` stores each model.json field as JSON text
        with contextlib.suppress(ValueError):
            props[prop.key] = json.loads(prop.value)
    meta = props if "backbone" in props and "stages" in props and "num_classes" in props else None
    ops = {n.op_type for n in m.graph.node}
    if props.get("precision") in ("fp32", "fp16", "int8"):
        precision = props["precision"]
    elif ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
              "MatMulInteger", "DynamicQuantizeLinear"}:
        precision = "int8"
    elif any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer):
        precision = "fp16"
    else:
        precision = "fp32"
    side = None
    with contextlib.suppress(Exception):
        dims = m.graph.input[0].type.tensor_type.shape.dim
        side = int(dims[-1].dim_value) or None
    return meta, precision, side


def _ir_meta_and_precision(path: Path) -> tuple[Optional[dict], str]:
    """(metadata, "fp32" | "int8") of an OpenVINO IR: from its rt_info when OpenVINO is installed (else from
    model.json beside it and the file name; the openvino runtime then reports itself skipped)."""
    from mineralnet.infer.openvino import _ov, openvino_missing, read_ir, read_metadata

    meta = None
    if openvino_missing() is None:
        with contextlib.suppress(MineralNetError):
            meta = read_metadata(read_ir(_ov().Core(), path), str(path))
    meta = meta or _sidecar_meta(path)
    precision = (meta or {}).get("precision") or ("int8" if ".int8." in path.name.lower() else "fp32")
    return meta, precision


def _sidecar_meta(path: Path) -> Optional[dict]:
    run = run_of(path)  # the export manifest beside the file, else the run's own model.json
    for cand in (Path(str(path) + ".json"), path.with_suffix(".json"), path.parent / META_FILE,
                 *([run / META_FILE] if run else [])):
        if cand.is_file():
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads(cand.read_text())
                if isinstance(meta, dict) and "backbone" in meta:
                    return meta
    return None


def _phone_meta(path: Path) -> Optional[dict]:
    """Metadata of a .tflite/.pte: its sidecar (readable without the runtime), else model.json nearby."""
    from mineralnet.infer.phone import read_sidecar

    with contextlib.suppress(MineralNetError):
        meta = read_sidecar(path)
        if meta:
            return meta
    return _sidecar_meta(path)


def open_model(path: str, image_size: Optional[int] = None, *, train: bool = False) -> BenchModel:
    """Describe a model file for benchmarking: its kind, metadata, input size and FLOPs per image."""
    p = Path(path)
    if not p.exists():
        raise MineralNetError(f"model {path!r} does not exist; pass {KINDS}")
    name = p.name if p.suffix else p.resolve().name
    if is_ensemble(p):
        return _open_ensemble(p, name, image_size, train)
    row = model_kind(p)
    kind = row.name if row is not None and row.open is not None else None
    side = None
    if kind == "pytorch":
        meta, file_precision = read_meta(p), None
    elif kind == "onnx":
        meta, file_precision, side = _onnx_meta_and_precision(p)
        meta = meta or _sidecar_meta(p)
    elif kind == "openvino":
        meta, file_precision = _ir_meta_and_precision(p)
    elif kind in ("litert", "executorch", "tensorrt"):
        meta = _sidecar_meta(p) if kind == "tensorrt" else _phone_meta(p)
        file_precision = (meta or {}).get("precision") or next(
            (t for t in ("int8", "fp16") if f".{t}." in p.name.lower()), "fp32")
    else:
        raise MineralNetError(f"{path!r} is not a model `mineralnet bench` measures; pass {KINDS}")
    if train and kind != "pytorch":
        raise MineralNetError(f"--train-step needs a run directory (PyTorch model), not {path!r}")
    size = int(image_size or side or (meta or {}).get("image_size") or 224)
    gflop = None
    if meta is not None:
        with contextlib.suppress(Exception):  # FLOPs are a nice-to-have; an odd architecture must not stop the bench
            gflop = _arch_flops(meta, size, train=train) / 1e9
    return BenchModel(str(p), kind, name, meta, size, file_precision, gflop)


def _open_ensemble(path: Path, name: str, image_size: Optional[int], train: bool) -> BenchModel:
    """An ensemble folder (`mineralnet ensemble`): one row that runs every member on photos, each through its own
    preprocessing; its FLOPs per photo are the sum of the members' at their own sizes."""
    if train:
        raise MineralNetError(f"--train-step measures one run directory; {str(path)!r} is an ensemble: pass one of "
                              f"its members")
    if image_size:
        raise MineralNetError(f"--image-size {image_size}: each member of the ensemble {str(path)!r} runs at its own "
                              f"size; drop --image-size")
    metas = [read_meta(m["resolved"]) for m in read_ensemble(path)["members"]]
    gflop = None
    with contextlib.suppress(Exception):  # as for a run: FLOPs must not stop the bench
        gflop = sum(_arch_flops(m, int(m["image_size"])) for m in metas) / 1e9
    meta = {"classes": metas[0]["classes"], "members": metas, "image_size": max(int(m["image_size"]) for m in metas),
            "photo_side": max(int(m.get("resize") or m["image_size"]) for m in metas)}
    return BenchModel(str(path), "ensemble", name, meta, meta["image_size"], None, gflop)


# ============================================================================ runtimes
@dataclass
class Prepared:
    fn: Callable            # fn(x) runs one batch
    make_inputs: Callable   # make_inputs(batch, n) -> list of inputs for fn
    sync: Optional[Callable] = None
    device: str = "cpu"
    provider: Optional[str] = None


class Skip(Exception):
    """A runtime cannot run here; the message is the reason shown in the results."""


def _torch_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MineralNetError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    return device


def _autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _check_torch_precision(precision: str, device: str) -> None:
    if precision not in ("fp32", "bf16", "fp16"):
        raise Skip(f"precision {precision!r} does not apply to PyTorch runtimes (fp32, bf16, fp16)")
    if precision == "fp16" and device != "cuda":
        raise Skip("fp16 autocast needs a CUDA GPU (on CPU use bf16)")
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise Skip("this GPU has no bf16 support (compute capability < 8.0); use fp16")


def _torch_inputs(device: str, size: int, channels_last: bool):
    def make(batch: int, n: int):
        g = torch.Generator().manual_seed(batch)
        xs = [torch.randn(batch, 3, size, size, generator=g).to(device) for _ in range(n)]
        return [x.contiguous(memory_format=torch.channels_last) if channels_last else x for x in xs]
    return make


def _build_torch(variant: str):
    def build(bm: BenchModel, precision: str, device: str) -> Prepared:

        _check_torch_precision(precision, device)
        if variant == "compile":
            import importlib
            try:
                importlib.import_module("torch._inductor")  # fails early where inductor cannot work
            except Exception as e:
                raise Skip(f"torch.compile unavailable: {_short_error(e)}") from None
            torch._dynamo.reset()  # a fresh cache per row set: no recompile limit carried over
        model, _ = load_model(bm.path, map_location=device)
        model = model.to(device)  # load_model maps the weights; the module must follow (as infer's TorchBackend does)
        channels_last = variant == "channels_last"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if variant == "compile":
            model = torch.compile(model, dynamic=False)
        ctx = lambda: _autocast(device, precision)  # noqa: E731

        def fn(x):
            with torch.inference_mode(), ctx():
                return model(x)
        sync = torch.cuda.synchronize if device == "cuda" else None
        return Prepared(fn, _torch_inputs(device, bm.image_size, channels_last), sync, device)
    return build


def _ort_session(bm: BenchModel, providers: list, threads: Optional[int], spinning: bool = True):
    """The toolkit's own ONNX Runtime session (it follows the file's optimisation metadata); a file ONNX
    Runtime cannot load becomes an error row, not the end of the benchmark."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install onnxruntime)") from None
    try:
        return ort_session(bm.path, providers=providers, threads=threads, spinning=spinning), ort
    except MineralNetError as e:
        raise RuntimeError(str(e)) from None


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _build_ort(which: str):
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                "trt": "TensorrtExecutionProvider"}[which]

    def build(bm: BenchModel, precision: str, device: str, threads: Optional[int] = None,
              spinning: bool = True) -> Prepared:
        with contextlib.suppress(ImportError):
            import onnxruntime as ort
            if provider not in ort.get_available_providers():
                extra = "onnxruntime-gpu (pip install 'mineralnet[gpu]')" if which != "cpu" else "onnxruntime"
                raise Skip(f"onnxruntime {ort.__version__} has no {provider} (available: "
                           f"{', '.join(ort.get_available_providers())}); install {extra} on a CUDA machine")
        if which != "cpu" and not torch.cuda.is_available():
            raise Skip(f"{provider} needs a CUDA GPU; none is visible")
        if which == "trt":
            cache = Path(bm.path).with_suffix(".ort-trt-cache")
            cache.mkdir(exist_ok=True)
            # Strongly typed: no precision flags (trt_fp16_enable is weak typing, gone in TensorRT 11); the
            # precision comes from the ONNX file given (fp16 model, or the QDQ int8 model). With TensorRT 11
            # this provider needs onnxruntime-gpu 1.27+.
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
            providers = [(provider, options), "CUDAExecutionProvider", "CPUExecutionProvider"]
        elif which == "cuda":
            providers = [provider, "CPUExecutionProvider"]
        else:
            providers = [provider]
        sess, ort = _ort_session(bm, providers, threads, spinning)
        if sess.get_providers()[0] != provider:  # ORT falls back silently when a provider fails to load
            raise Skip(f"onnxruntime could not start {provider} (session runs on {sess.get_providers()[0]}); "
                       f"check the CUDA/cuDNN/TensorRT libraries that onnxruntime-gpu needs")
        inp = sess.get_inputs()[0]
        dtype = _NP_TYPES.get(inp.type, np.float32)
        out_name = sess.get_outputs()[0].name

        fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None

        def make_host(batch: int, n: int):
            if fixed and batch != fixed:  # one line, as the OpenVINO and TensorRT rows say it
                raise fixed_batch_error(bm.path, fixed, batch)
            rng = np.random.default_rng(batch)
            return [rng.standard_normal((batch, 3, bm.image_size, bm.image_size)).astype(dtype) for _ in range(n)]

        if which == "cpu":
            return Prepared(lambda x: sess.run([out_name], {inp.name: x}), make_host, None, "cpu", provider)

        # GPU: inputs live on the device and outputs stay there, so the timing is the engine's, not PCIe's.
        def make_bound(batch: int, n: int):
            bindings = []
            for x in make_host(batch, n):
                b = sess.io_binding()
                b.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
                b.bind_output(out_name, "cuda")
                bindings.append(b)
            return bindings
        return Prepared(lambda b: sess.run_with_iobinding(b), make_bound, None, "cuda", provider)
    return build


def _build_tensorrt(bm: BenchModel, precision: str, device: str) -> Prepared:
    if not torch.cuda.is_available():
        raise Skip("TensorRT needs a CUDA GPU; none is visible")
    if _version("tensorrt") is None:
        raise Skip("the tensorrt package is not installed (pip install 'mineralnet[trt]' on a CUDA machine)")
    runner = TRTRunner(bm.path)
    call = runner.infer  # CUDA tensor in, CUDA tensors out: no host copies in the timing

    def make(batch: int, n: int):
        g = torch.Generator().manual_seed(batch)
        return [torch.randn(batch, 3, bm.image_size, bm.image_size, generator=g).cuda() for _ in range(n)]
    return Prepared(call, make, torch.cuda.synchronize, "cuda", "TensorRT")


# OpenVINO's inference precision hint of a row: the file's own precision runs with the exact fp32 hint; a
# bf16/fp16 hint is its own row, labelled "bf16" (fp32 file) or "int8+bf16" (int8 file: the layers left in float).
OPENVINO_HINTS = ("fp32", "bf16", "fp16")


def openvino_label(file_precision: str, hint: str) -> str:
    return file_precision if hint == "fp32" else (hint if file_precision == "fp32" else f"{file_precision}+{hint}")


def openvino_hint(file_precision: str, label: str) -> str:
    return "fp32" if label == file_precision else label.split("+")[-1]


def _build_openvino(bm: BenchModel, precision: str, device: str, threads: Optional[int] = None,
                    spinning: bool = True) -> Prepared:
    """An IR (or an .onnx file, read by OpenVINO) compiled for the CPU with the row's precision hint."""
    from mineralnet.infer.openvino import INSTALL, openvino_missing, timing_runtime

    missing = openvino_missing()
    if missing:
        raise Skip(f"{missing}; {INSTALL}")
    hint = openvino_hint(bm.file_precision or "fp32", precision)
    rt = timing_runtime(bm.path, precision=hint, threads=threads)
    if rt.effective is not None and rt.effective != hint:  # OpenVINO falls back silently where the CPU lacks it
        raise Skip(f"OpenVINO runs the {hint} hint as {rt.effective} on this CPU (no {hint} instructions)")
    return Prepared(rt.fn, rt.make_inputs, None, "cpu", rt.label)


def _build_phone(which: str):
    """LiteRT interpreter (.tflite) or ExecuTorch's runtime (.pte) on the CPU, through the runner `Predictor`
    uses: float32 images in, float32 outputs out (int8 I/O (de)quantized as an app would)."""
    module = {"litert": "ai_edge_litert", "executorch": "executorch"}[which]

    def build(bm: BenchModel, precision: str, device: str, threads: Optional[int] = None,
              spinning: bool = True) -> Prepared:
        from mineralnet.infer.phone import missing

        reason = missing(module)
        if reason:
            raise Skip(reason)
        if which == "litert":
            from mineralnet.infer.litert import LiteRTRunner

            runner = LiteRTRunner(bm.path, threads=threads)
        else:
            from mineralnet.infer.executorch import ExecuTorchRunner

            runner = ExecuTorchRunner(bm.path)

        def make(batch: int, n: int):
            rng = np.random.default_rng(batch)
            return [rng.standard_normal((batch, 3, bm.image_size, bm.image_size)).astype(np.float32)
                    for _ in range(n)]
        return Prepared(runner.run, make, None, "cpu", runner.label)
    return build


def _build_ensemble(bm: BenchModel, precision: str, device: str) -> Prepared:
    """The whole ensemble on a batch of decoded photos: every member resizes and crops them itself, runs, and the
    calibrated probabilities are averaged (`Predictor(ENS).answers`). The photos are random pixels, 4:3, with the
    shorter side at the largest member's resize, so every member does the resize it would do on a real photo."""
    from mineralnet.infer import Predictor

    predictor = Predictor(bm.path, device=device)
    side = int(bm.meta["photo_side"])

    def make(batch: int, n: int):
        rng = np.random.default_rng(batch)
        return [[rng.integers(0, 256, (side, side * 4 // 3, 3), dtype=np.uint8) for _ in range(batch)]
                for _ in range(n)]
    sync = torch.cuda.synchronize if device == "cuda" else None
    return Prepared(predictor.answers, make, sync, device)


@dataclass(frozen=True)
class Runtime:
    name: str
    label: str
    kind: str          # model kind it runs: a row of mineralnet.infer.BACKENDS (pytorch, onnx, tensorrt, ...)
    build: Callable
    takes_threads: bool = False
    also: tuple = ()   # other model kinds it runs when --runtimes names it (OpenVINO reads .onnx files too)


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("torch", "PyTorch eager", "pytorch", _build_torch("eager")),
    Runtime("torch-cl", "PyTorch eager channels_last", "pytorch", _build_torch("channels_last")),
    Runtime("torch-compile", "torch.compile (inductor)", "pytorch", _build_torch("compile")),
    Runtime("ort-cpu", "ONNX Runtime CPU EP", "onnx", _build_ort("cpu"), takes_threads=True),
    Runtime("ort-cuda", "ONNX Runtime CUDA EP", "onnx", _build_ort("cuda"), takes_threads=True),
    Runtime("ort-trt", "ONNX Runtime TensorRT EP", "onnx", _build_ort("trt"), takes_threads=True),
    Runtime("openvino", "OpenVINO CPU", "openvino", _build_openvino, takes_threads=True, also=("onnx",)),
    Runtime("tensorrt", "TensorRT engine", "tensorrt", _build_tensorrt),
    Runtime("litert", "LiteRT interpreter (XNNPACK)", "litert", _build_phone("litert"), takes_threads=True),
    Runtime("executorch", "ExecuTorch (XNNPACK)", "executorch", _build_phone("executorch"), takes_threads=True),
    Runtime("ensemble", "ensemble of runs (PyTorch, each member's preprocessing)", "ensemble", _build_ensemble),
)}


def _row_precisions(bm: BenchModel, precisions: Sequence[str], runtime: str = "") -> list[str]:
    # PyTorch rows take --precision; an ONNX file or engine has its precision baked in; OpenVINO rows run the
    # file with each precision hint of --precision (fp32 = the file's own precision).
    if bm.kind == "pytorch":
        return list(precisions)
    if bm.kind == "ensemble":  # the members' calibrated probabilities, as `predict ENS` computes them
        return ["fp32"]
    file_precision = bm.file_precision or "fp32"
    if runtime == "openvino":
        hints = [p for p in precisions if p in OPENVINO_HINTS] or ["fp32"]
        return [openvino_label(file_precision, h) for h in dict.fromkeys(hints)]
    return [file_precision]
