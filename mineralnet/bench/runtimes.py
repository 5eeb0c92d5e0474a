"""Latency and throughput benchmarks people can trust: ``mineralnet bench MODEL...``.

Every measurement warms up for a time (not a count), then runs until a duration has passed,
synchronising the device after each call, rotating among several input buffers so caches do not
flatter the numbers, and reports p50/p90/p99 latency, the mean, images/s and the number of runs.
Each result carries the environment (CPU, GPU, versions), the FLOPs per image counted with
`torch.utils.flop_counter`, and the GFLOP/s achieved. Runtimes that cannot run here are rows
with status "skipped" and the reason, never silently dropped.

    models --open_model--> BenchModel --RUNTIMES[name].build--> Prepared(fn, inputs, sync)
           --measure--> stats --result_row--> rows --> report (JSON) --render_markdown--> Markdown

Models: a run directory (PyTorch runtimes), an .onnx file (ONNX Runtime) or a TensorRT .engine.
`--train-step` measures training images/s instead: our `train_one_epoch` under Accelerate against
a bare timm-style loop on the same model, batch and precision, interleaved in one process.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from mineralnet import __version__
from mineralnet.errors import MineralNetError

SCHEMA = "mineralnet-bench/1"
ROW_KEYS = ("model", "runtime", "precision", "device", "batch", "image_size", "status", "reason", "runs",
            "latency_ms", "throughput_img_s", "gflop_per_image", "gflops", "fraction_of_peak", "group",
            "baseline", "first_call_ms")
LATENCY_KEYS = ("mean", "p50", "p90", "p99", "min", "max")
# A 1-minute load average above this many times the CPU count means other work competed for the cores
# (a benchmark's own threads already make the load about equal to the CPU count).
OVERSUBSCRIBED = 1.5


# ============================================================================ timing harness
def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (linear interpolation), min, max of latencies in ms."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": float(a.min()), "max": float(a.max())}


def measure(fn: Callable, inputs: Sequence, *, warmup_s: float = 1.0, duration_s: float = 3.0,
            min_runs: int = 5, max_runs: int = 1_000_000, sync: Optional[Callable[[], None]] = None,
            clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time `fn(x)` for x rotating over `inputs`.

    Warm-up: at least one call and until `warmup_s` seconds have passed. Then timed calls until
    `duration_s` seconds of timed calls AND `min_runs` calls (or `max_runs`). `sync()` runs after
    each call, inside the timed interval (device synchronisation for asynchronous runtimes).

    Returns {"runs", "warmup_runs", "first_call_ms", "samples_ms", "latency_ms": percentiles}.
    """
    if not inputs:
        raise ValueError("measure() needs at least one input")
    n_in = len(inputs)
    sync = sync or (lambda: None)
    start = clock()
    fn(inputs[0])
    sync()
    first_ms = (clock() - start) * 1e3
    warm = 1
    while clock() - start < warmup_s:
        fn(inputs[warm % n_in])
        sync()
        warm += 1
    samples, timed = [], 0.0
    i = warm
    while (timed < duration_s or len(samples) < min_runs) and len(samples) < max_runs:
        x = inputs[i % n_in]
        t0 = clock()
        fn(x)
        sync()
        dt = clock() - t0
        samples.append(dt * 1e3)
        timed += dt
        i += 1
    return {"runs": len(samples), "warmup_runs": warm, "first_call_ms": first_ms, "samples_ms": samples,
            "latency_ms": percentiles(samples)}


def result_row(*, model: str, runtime: str, precision: str, device: str, batch: int, image_size: int,
               stats: Optional[dict] = None, status: str = "ok", reason: Optional[str] = None,
               gflop_per_image: Optional[float] = None, peak_gflops: Optional[float] = None,
               group: Optional[str] = None, baseline: bool = False, **extra) -> dict:
    """One result row (the JSON schema's `rows[]`); throughput and GFLOP/s come from the mean latency."""
    row: dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update(model=model, runtime=runtime, precision=precision, device=device, batch=int(batch),
               image_size=int(image_size), status=status, reason=reason, gflop_per_image=gflop_per_image,
               group=group, baseline=bool(baseline))
    if stats is not None and status == "ok":
        lat = {k: round(float(stats["latency_ms"][k]), 4) for k in LATENCY_KEYS}
        row.update(runs=int(stats["runs"]), latency_ms=lat,
                   first_call_ms=round(float(stats.get("first_call_ms", float("nan"))), 2))
        row["throughput_img_s"] = batch * 1e3 / lat["mean"]
        if gflop_per_image:
            row["gflops"] = gflop_per_image * row["throughput_img_s"]
            if peak_gflops:
                row["fraction_of_peak"] = row["gflops"] / peak_gflops
    row.update(extra)
    return row


def skipped_row(reason: str, **kw) -> dict:
    return result_row(status="skipped", reason=reason, **kw)


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}".rstrip(": ")


# ============================================================================ environment and cost model
def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (l.partition(":") for l in out.splitlines()) if v}


def cpu_info() -> dict:
    """CPU model, vendor/family/model numbers, physical cores, clock and SIMD flags."""
    info = _lscpu()
    flags = set(info.get("Flags", "").split())
    if not flags and Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
    def num(key, cast=int):
        try:
            return cast(float(info[key]))
        except (KeyError, ValueError):
            return None
    cores = (num("Core(s) per socket") or 0) * (num("Socket(s)") or 1) or os.cpu_count()
    mhz = num("CPU max MHz", float)
    mhz_source = "lscpu CPU max MHz"
    if not mhz and Path("/proc/cpuinfo").exists():
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
        mhz, mhz_source = (float(m.group(1)), "/proc/cpuinfo cpu MHz (nominal; boost not visible)") if m else (None, "")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return {"model": info.get("Model name") or platform.processor() or platform.machine(),
            "vendor": info.get("Vendor ID"), "family": num("CPU family"), "model_number": num("Model"),
            "physical_cores": cores, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "mhz": mhz, "mhz_source": mhz_source, "simd": simd, "hypervisor": info.get("Hypervisor vendor")}


def cpu_peak_gflops(cpu: dict) -> tuple[Optional[float], str]:
    """This CPU's fp32 peak: cores x GHz x FMA units x (lanes x 2 flop per FMA); and how it was derived.

    AVX-512: 16 fp32 lanes, 32 flop/cycle per 512-bit FMA unit. AMD Zen 4 (family 25 with AVX-512)
    executes a 512-bit FMA on its two 256-bit pipes: 1 unit-equivalent; Intel server cores and
    Zen 5 have 2. AVX2 + FMA: 2 units of 8 lanes (32 flop/cycle).
    """
    simd, ghz = set(cpu.get("simd") or ()), (cpu.get("mhz") or 0) / 1e3
    cores = cpu.get("physical_cores") or 0
    if not ghz or not cores:
        return None, "clock or core count unknown: pass --peak-gflops"
    vendor, fam = cpu.get("vendor") or "", cpu.get("family")
    if "avx512f" in simd:
        lanes = 16
        units, why = (1, "AMD Zen 4 runs 512-bit FMAs on two 256-bit pipes") if (
            "AMD" in vendor and fam == 25) else (2, "2 AVX-512 FMA units assumed (Intel server core / Zen 5)")
    elif "avx2" in simd and "fma" in simd:
        lanes, units, why = 8, 2, "2 AVX2 FMA units"
    else:
        return None, "no AVX2/AVX-512 FMA flags: pass --peak-gflops"
    per_cycle = units * lanes * 2
    peak = cores * ghz * per_cycle
    return peak, (f"{cores} cores x {ghz:.2f} GHz ({cpu.get('mhz_source')}) x {units} FMA unit(s) x "
                  f"{lanes * 2} flop/cycle ({lanes} fp32 lanes x 2 flop per FMA; {why}) = {peak:.0f} GFLOP/s")


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # any import failure means "not usable here"
        return None
    return getattr(mod, "__version__", "unknown")


def gpu_info() -> Optional[dict]:
    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(i)
    driver = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        driver = out[0] if out else None
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(), "driver": driver, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def environment() -> dict:
    """What the numbers depend on: CPU, threads, GPU, driver/CUDA and package versions."""
    ort_providers = None
    with contextlib.suppress(Exception):
        import onnxruntime as ort
        ort_providers = ort.get_available_providers()
    return {
        "cpu": cpu_info(), "torch_threads": torch.get_num_threads(), "gpu": gpu_info(),
        "os": platform.platform(), "python": platform.python_version(),
        "versions": {"mineralnet": __version__, "torch": torch.__version__, "timm": _version("timm"),
                     "accelerate": _version("accelerate"), "onnx": _version("onnx"),
                     "onnxruntime": _version("onnxruntime"), "tensorrt": _version("tensorrt"),
                     "numpy": np.__version__},
        "onnxruntime_providers": ort_providers,
        "load_average": _loadavg(),
    }


def _loadavg() -> Optional[list[float]]:
    """1/5/15-minute load averages: other work on the machine is the largest error source on CPUs."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def count_flops(model: torch.nn.Module, image_size: int, *, batch: int = 1, train: bool = False,
                device: str | torch.device = "cpu") -> int:
    """FLOPs (2 per multiply-add, as `torch.utils.flop_counter` counts them) of one forward (plus
    backward when `train`) pass at `batch`, divided by `batch`: FLOPs per image."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        if train:
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() // batch


def _arch_flops(meta: dict, image_size: int, train: bool = False) -> int:
    """FLOPs per image of the FusionNet that `meta` describes, built on the meta device (no memory)."""
    from mineralnet.model import FusionNet

    with torch.device("meta"):
        model = FusionNet(meta["backbone"], meta["stages"], meta["num_classes"], pretrained=False)
    model.train(train)
    return count_flops(model, image_size, batch=2 if train else 1, train=train, device="meta")


def make_random_run(run_dir, backbone: str = "resnet50", stages=(2, 4), num_classes: int = 7,
                    image_size: int = 224, seed: int = 0) -> Path:
    """A run directory holding a randomly initialised FusionNet: speed does not depend on the weights,
    so benchmarks need no training (nor pretrained downloads)."""
    from mineralnet.model import FusionNet
    from mineralnet.runs import model_meta, save_model

    torch.manual_seed(seed)
    model = FusionNet(backbone, stages, num_classes, pretrained=False)
    meta = model_meta(model, classes=[f"class_{i}" for i in range(num_classes)], image_size=image_size,
                      mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], resize=round(image_size / 0.875),
                      extra={"note": "random weights, for benchmarking only"})
    save_model(run_dir, model, meta)
    return Path(run_dir)


def matmul_gflops(n: int = 2048, seconds: float = 2.0, dtype=torch.float32) -> float:
    """Achieved GFLOP/s of an n x n x n matrix multiply: what this machine's BLAS really reaches."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    stats = measure(lambda _: torch.mm(a, b), [0], warmup_s=0.3, duration_s=seconds, min_runs=3)
    return 2 * n ** 3 / (stats["latency_ms"]["p50"] * 1e-3) / 1e9


# ============================================================================ models to benchmark
@dataclass
class BenchModel:
    path: str
    kind: str                       # "torch" | "onnx" | "engine"
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


def _sidecar_meta(path: Path) -> Optional[dict]:
    for cand in (Path(str(path) + ".json"), path.with_suffix(".json"), path.parent / "model.json", path.parent.parent / "model.json"):
        if cand.is_file():
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads(cand.read_text())
                if isinstance(meta, dict) and "backbone" in meta:
                    return meta
    return None


def open_model(path: str, image_size: Optional[int] = None, *, train: bool = False) -> BenchModel:
    """Describe a model file for benchmarking: its kind, metadata, input size and FLOPs per image."""
    p = Path(path)
    if not p.exists():
        raise MineralNetError(f"model {path!r} does not exist; pass a run directory, an .onnx file or a "
                              f"TensorRT .engine")
    name = p.name if p.suffix else p.resolve().name
    if p.is_dir() or p.suffix in (".safetensors", ".json"):
        from mineralnet.runs import read_meta
        meta = read_meta(p)
        kind, file_precision, side = "torch", None, None
    elif p.suffix == ".onnx":
        meta, file_precision, side = _onnx_meta_and_precision(p)
        meta = meta or _sidecar_meta(p)
        kind = "onnx"
    elif p.suffix in (".engine", ".plan", ".trt"):
        meta, kind, side = _sidecar_meta(p), "engine", None
        file_precision = (meta or {}).get("precision") or next(
            (t for t in ("int8", "fp16") if f".{t}." in p.name.lower()), "fp32")
    else:
        raise MineralNetError(f"{path!r} is not a run directory, .onnx file or TensorRT .engine; "
                              f"`mineralnet bench` measures those")
    if train and kind != "torch":
        raise MineralNetError(f"--train-step needs a run directory (PyTorch model), not {path!r}")
    size = int(image_size or side or (meta or {}).get("image_size") or 224)
    gflop = None
    if meta is not None:
        with contextlib.suppress(Exception):  # FLOPs are a nice-to-have; an odd architecture must not stop the bench
            gflop = _arch_flops(meta, size, train=train) / 1e9
    return BenchModel(str(p), kind, name, meta, size, file_precision, gflop)


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
        from mineralnet.runs import load_model

        _check_torch_precision(precision, device)
        if variant == "compile":
            import importlib
            try:
                importlib.import_module("torch._inductor")  # fails early where inductor cannot work
            except Exception as e:
                raise Skip(f"torch.compile unavailable: {_short_error(e)}") from None
            torch._dynamo.reset()  # a fresh cache per row set: no recompile limit carried over
        model, _ = load_model(bm.path, map_location=device)
        model = model.to(device)  # load_model maps the weights; the module must follow (as predict.py does)
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
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install onnxruntime)") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:  # idle pool threads would spin on the cores that the next runtime needs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(bm.path, sess_options=opts, providers=providers), ort


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

        def make_host(batch: int, n: int):
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
    try:
        from mineralnet.export.tensorrt import TRTRunner
    except ImportError as e:
        raise Skip(f"mineralnet.export.tensorrt.TRTRunner is unavailable ({_short_error(e)})") from None
    runner = TRTRunner(bm.path)
    call = runner.infer  # CUDA tensor in, CUDA tensors out: no host copies in the timing

    def make(batch: int, n: int):
        g = torch.Generator().manual_seed(batch)
        return [torch.randn(batch, 3, bm.image_size, bm.image_size, generator=g).cuda() for _ in range(n)]
    return Prepared(call, make, torch.cuda.synchronize, "cuda", "TensorRT")


@dataclass(frozen=True)
class Runtime:
    name: str
    label: str
    kind: str          # model kind it runs: torch | onnx | engine
    build: Callable
    takes_threads: bool = False


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("torch", "PyTorch eager", "torch", _build_torch("eager")),
    Runtime("torch-cl", "PyTorch eager channels_last", "torch", _build_torch("channels_last")),
    Runtime("torch-compile", "torch.compile (inductor)", "torch", _build_torch("compile")),
    Runtime("ort-cpu", "ONNX Runtime CPU EP", "onnx", _build_ort("cpu"), takes_threads=True),
    Runtime("ort-cuda", "ONNX Runtime CUDA EP", "onnx", _build_ort("cuda"), takes_threads=True),
    Runtime("ort-trt", "ONNX Runtime TensorRT EP", "onnx", _build_ort("trt"), takes_threads=True),
    Runtime("tensorrt", "TensorRT engine", "engine", _build_tensorrt),
)}
TRAIN_LOOPS = ("mineralnet", "mineralnet-cl", "bare", "bare-cl")


def _row_precisions(bm: BenchModel, precisions: Sequence[str]) -> list[str]:
    # PyTorch rows take --precision; an ONNX file or engine has its precision baked in.
    return list(precisions) if bm.kind == "torch" else [bm.file_precision or "fp32"]


# ============================================================================ inference benchmark
def run_inference(model_paths: Sequence[str], *, runtimes: Optional[Sequence[str]] = None,
                  precisions: Optional[Sequence[str]] = None, batch_sizes: Sequence[int] = (1, 8, 32),
                  image_size: Optional[int] = None, warmup_s: float = 1.0, duration_s: float = 3.0,
                  min_runs: int = 5, buffers: int = 4, threads: Optional[int] = None, device: str = "auto",
                  peak_gflops: Optional[float] = None, interleave: bool = True,
                  log: Callable[[str], None] = print) -> list[dict]:
    """Every (model, runtime, precision, batch) row; runtimes that cannot run here become skipped rows.

    With `interleave` (default) all runtimes of one batch size are timed in round-robin rounds, one
    call each per round, so a change in machine load hits them alike and their ratios stay fair;
    otherwise each row is timed on its own, one after the other.
    """
    dev = _torch_device(device)
    precisions = list(precisions or (["fp32", "bf16", "fp16"] if dev == "cuda" else ["fp32", "bf16"]))
    names = list(runtimes or RUNTIMES)
    unknown = [r for r in names if r not in RUNTIMES]
    if unknown:
        raise MineralNetError(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    models = [open_model(p, image_size) for p in model_paths]
    fixed: dict[tuple, dict] = {}   # (entry index, batch) -> skipped/error row
    entries = []                    # (common row fields, Prepared or None)
    for bm in models:
        chosen = [RUNTIMES[n] for n in names if RUNTIMES[n].kind == bm.kind]
        if not chosen:
            raise MineralNetError(f"none of --runtimes {','.join(names)} runs {bm.path!r} (a {bm.kind} model); "
                                  f"use {', '.join(n for n, r in RUNTIMES.items() if r.kind == bm.kind)}")
        for rt in chosen:
            for prec in _row_precisions(bm, precisions):
                common = dict(model=bm.name, runtime=rt.name, precision=prec, image_size=bm.image_size,
                              gflop_per_image=bm.gflop_per_image, peak_gflops=peak_gflops)
                prepared, status, reason = None, None, None
                try:
                    # Interleaved, ONNX Runtime's idle threads must not spin: they would steal the cores
                    # from the runtime timed next (measured here: PyTorch eager 1.4x slower at batch 1).
                    prepared = (rt.build(bm, prec, dev, threads, spinning=not interleave) if rt.takes_threads
                                else rt.build(bm, prec, dev))
                except Skip as e:
                    status, reason = "skipped", str(e)
                except MineralNetError:
                    raise
                except Exception as e:
                    status, reason = "error", _short_error(e)
                if prepared is None:
                    log(f"  {bm.name} {rt.name} {prec}: {status}: {reason}")
                    gpu_only = rt.name in ("ort-cuda", "ort-trt", "tensorrt")
                    for b in batch_sizes:
                        fixed[(len(entries), b)] = result_row(batch=b, device="cuda" if gpu_only else dev,
                                                              status=status, reason=reason, **common)
                entries.append((common, prepared))
    live = [i for i, (_, p) in enumerate(entries) if p is not None]
    rows_by: dict[tuple, dict] = dict(fixed)
    for b in batch_sizes:
        if interleave and len(live) > 1:
            variants = {}
            for i in live:
                try:
                    variants[i] = (entries[i][1].fn, entries[i][1].make_inputs(b, buffers), entries[i][1].sync)
                except Exception as e:  # e.g. out of memory for the inputs
                    rows_by[(i, b)] = _error_row(entries[i], b, e, log)
            results = measure_interleaved(variants, warmup_s=warmup_s, duration_s=duration_s, min_runs=min_runs)
        else:
            results = {}
            for i in live:
                try:
                    p = entries[i][1]
                    results[i] = measure(p.fn, p.make_inputs(b, buffers), warmup_s=warmup_s, duration_s=duration_s,
                                         min_runs=min_runs, sync=p.sync)
                except Exception as e:
                    results[i] = e
                gc.collect()
        load = _loadavg()
        for i, res in results.items():
            common, p = entries[i]
            if isinstance(res, BaseException):
                rows_by[(i, b)] = _error_row(entries[i], b, res, log)
                continue
            row = result_row(batch=b, device=p.device, stats=res, provider=p.provider,
                             load_1min=load[0] if load else None, **common)
            log(f"  {common['model']} {common['runtime']} {common['precision']} batch {b}: p50 "
                f"{row['latency_ms']['p50']:.2f} ms, {row['throughput_img_s']:.1f} img/s ({row['runs']} runs)")
            rows_by[(i, b)] = row
        variants = results = None
        gc.collect()
    rows = [rows_by[(i, b)] for i in range(len(entries)) for b in batch_sizes]
    for r in rows:  # ratios are against PyTorch eager fp32 at the same batch
        r["group"] = f"batch {r['batch']}"
        r["baseline"] = r["runtime"] == "torch" and r["precision"] == "fp32"
    return rows


def _error_row(entry, batch: int, e: BaseException, log) -> dict:
    common, p = entry
    log(f"  {common['model']} {common['runtime']} {common['precision']} batch {batch}: error: {_short_error(e)}")
    return result_row(batch=batch, device=p.device, status="error", reason=_short_error(e), **common)


def measure_interleaved(variants: dict, *, warmup_s: float = 1.0, duration_s: float = 3.0, min_runs: int = 5,
                        clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time several variants {key: (fn, inputs, sync)} in round-robin rounds, one timed call of each per
    round (the order rotates each round). Warm-up: one call each, then rounds until `warmup_s` x the
    number of variants. Timed rounds continue until every variant has `min_runs` calls and the timed
    calls add up to `duration_s` x the number of variants, so the wall time matches timing them one
    after the other. Returns {key: stats as from `measure`, or the exception that variant raised}.
    """
    out: dict = {}
    first: dict = {}
    for k, (fn, inputs, sync) in variants.items():
        try:
            t0 = clock()
            fn(inputs[0])
            (sync or (lambda: None))()
            first[k] = (clock() - t0) * 1e3
        except Exception as e:  # this variant cannot run at this batch; the others go on
            out[k] = e
    live = [k for k in variants if k not in out]
    samples = {k: [] for k in live}
    warm = {k: 1 for k in live}

    def call(k, i, timed):
        fn, inputs, sync = variants[k]
        t0 = clock()
        fn(inputs[i % len(inputs)])
        if sync is not None:
            sync()
        dt = clock() - t0
        if timed:
            samples[k].append(dt * 1e3)
        return dt

    start = clock()
    while live and clock() - start < warmup_s * len(live):
        for k in list(live):
            try:
                call(k, warm[k], False)
                warm[k] += 1
            except Exception as e:
                out[k] = e
                live.remove(k)
    total, rnd = 0.0, 0
    while live and (rnd < min_runs or total < duration_s * len(live)):
        shift = rnd % len(live)
        for k in live[shift:] + live[:shift]:
            try:
                total += call(k, warm[k] + rnd, True)
            except Exception as e:
                out[k] = e
                live.remove(k)
        rnd += 1
    for k in live:
        out[k] = {"runs": len(samples[k]), "warmup_runs": warm[k], "first_call_ms": first[k],
                  "samples_ms": samples[k], "latency_ms": percentiles(samples[k])}
    return {k: out[k] for k in variants}


# ============================================================================ training-step benchmark
class TimedLoader:
    """Wraps a loader and records a timestamp (after device sync) each time a batch is requested and
    when it is exhausted: consecutive differences are the wall time of each training step."""

    def __init__(self, loader, sync: Optional[Callable] = None):
        self.loader, self.sync, self.stamps = loader, sync or (lambda: None), []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.stamps = []
        for batch in self.loader:
            self.sync()
            self.stamps.append(time.perf_counter())
            yield batch
        self.sync()
        self.stamps.append(time.perf_counter())

    def step_times_ms(self) -> list[float]:
        return list(np.diff(self.stamps) * 1e3)


def _train_variant(loop: str, meta: dict, state: dict, precision: str, batch: int, size: int, steps: int):
    """Build one training loop variant -> (run_epoch() -> [step ms], accelerator or None)."""
    from torch.utils.data import DataLoader, TensorDataset

    from mineralnet.config import load_config
    from mineralnet.losses import build_loss
    from mineralnet.model import FusionNet
    from mineralnet.train import LRControl, Progress, TrainParts, build_optimizer, make_accelerator, train_one_epoch

    channels_last = loop.endswith("-cl")
    ours = loop.startswith("mineralnet")
    cfg = load_config(None, backbone=meta["backbone"], stages=meta["stages"], precision=precision,
                      batch_size=batch, image_size=size, channels_last=channels_last, epochs=1, loss="wtopk",
                      optimizer="sgd", lr=1e-3, momentum=0.9, scheduler="none")
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(batch * steps, 3, size, size, generator=g)
    ys = torch.randint(0, meta["num_classes"], (batch * steps,), generator=g)
    model = FusionNet(meta["backbone"], meta["stages"], meta["num_classes"], pretrained=False)
    model.load_state_dict(state)
    loss_fn = build_loss("wtopk", k=cfg.k, alpha=cfg.alpha, scope=cfg.loss_scope)
    loader = DataLoader(TensorDataset(xs, ys), batch_size=batch, shuffle=False, drop_last=True)
    if ours:
        accelerator = make_accelerator(cfg)
        device = accelerator.device
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, model.parameters())
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        timed = TimedLoader(loader, sync)
        progress = Progress()
        # the training loop's own parts; this benchmark needs no run directory, split, EMA or mixing
        parts = TrainParts(cfg, run=None, split=None, model=model, loss_fn=loss_fn, optimizer=optimizer,
                           train_loader=timed, val_loader=None, lr_control=LRControl(cfg, optimizer, len(loader)),
                           progress=progress, ema=None, mix=None)

        def run_epoch():
            progress.step_in_epoch = 0
            train_one_epoch(parts, accelerator)
            return timed.step_times_ms()
        return run_epoch, accelerator

    # The bare loop: what a timm-style script does per step, nothing else.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # as timm's NativeScaler
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timed = TimedLoader(loader, sync)

    def run_epoch():
        model.train()
        for x, y in timed:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device.type, precision):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return timed.step_times_ms()
    return run_epoch, None


def run_train_step(model_path: str, *, loops: Optional[Sequence[str]] = None,
                   precisions: Sequence[str] = ("fp32",), batch_sizes: Sequence[int] = (32,),
                   image_size: Optional[int] = None, warmup_s: float = 2.0, duration_s: float = 10.0,
                   min_runs: int = 5, steps_per_epoch: int = 3, peak_gflops: Optional[float] = None,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Training images/s of each loop variant; the variants of one (precision, batch) are interleaved
    epoch by epoch in this process so that load changes hit them alike. Works under `accelerate launch`
    (the `mineralnet` loops run DDP; bare loops are single-process only and are skipped there)."""
    loops = list(loops or TRAIN_LOOPS)
    bad = [l for l in loops if l not in TRAIN_LOOPS]
    if bad:
        raise MineralNetError(f"unknown training loop(s) {', '.join(bad)} for --train-step; choose from "
                              f"{', '.join(TRAIN_LOOPS)}")
    bm = open_model(model_path, image_size, train=True)
    from mineralnet.runs import load_model
    state = {k: v.clone() for k, v in load_model(bm.path)[0].state_dict().items()}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for prec in precisions:
        for b in batch_sizes:
            common = dict(model=bm.name, precision=prec, batch=b, image_size=bm.image_size,
                          gflop_per_image=bm.gflop_per_image, peak_gflops=peak_gflops, device=dev,
                          processes=world, threads=torch.get_num_threads())
            variants, accel = {}, None
            for loop in loops:  # ratios: each of our loops against the bare loop of the same memory format
                base = dict(common, runtime=loop, baseline=loop.startswith("bare"),
                            group=f"{prec} batch {b} {'channels_last' if loop.endswith('-cl') else 'nchw'}")
                try:
                    _check_torch_precision(prec, dev)
                    if loop.startswith("bare") and world > 1:
                        raise Skip("the bare loop is single-process; run it without accelerate launch")
                    fn, a = _train_variant(loop, bm.meta, state, prec, b, bm.image_size, steps_per_epoch)
                    variants[loop] = (fn, base)
                    accel = a or accel
                except Skip as e:
                    rows.append(skipped_row(str(e), **base))
                except MineralNetError as e:
                    rows.append(skipped_row(str(e), **base))
            rows += _interleave(variants, warmup_s, duration_s, min_runs, log)
            if accel is not None and world == 1:
                accel.free_memory()
            variants = None
            gc.collect()
    return rows


def _any_rank(flag: bool) -> bool:
    """True if `flag` is true on any process: every rank of a DDP run must run the same epochs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _interleave(variants: dict, warmup_s: float, duration_s: float, min_runs: int, log) -> list[dict]:
    """Run the variants' epochs in turn (ABAB...): warm-up by time, then until each has `duration_s`
    of timed steps and `min_runs` steps. The first step of each epoch is kept (it is a real step)."""
    samples = {k: [] for k in variants}
    first = {}
    t0 = time.perf_counter()
    while variants:  # warm-up: at least one epoch each
        for k, (fn, _) in variants.items():
            steps = fn()
            first.setdefault(k, steps[0] if steps else float("nan"))
        if not _any_rank(time.perf_counter() - t0 < warmup_s * len(variants)):
            break
    order, turn = list(variants), 0
    while variants and _any_rank(any(sum(samples[k]) < duration_s * 1e3 or len(samples[k]) < min_runs
                                     for k in variants)):
        for k in order[turn % len(order):] + order[:turn % len(order)]:  # rotate who goes first
            samples[k] += variants[k][0]()
        turn += 1
    rows = []
    for k, (_, base) in variants.items():
        stats = {"runs": len(samples[k]), "first_call_ms": first[k], "latency_ms": percentiles(samples[k])}
        row = result_row(stats=stats, **base)
        log(f"  train {k} {base['precision']} batch {base['batch']}: {row['throughput_img_s']:.1f} img/s, "
            f"p50 step {row['latency_ms']['p50']:.0f} ms ({row['runs']} steps)")
        rows.append(row)
    return rows


# ============================================================================ report, Markdown, compare
def make_report(rows: list[dict], *, kind: str, settings: dict, command: Optional[str] = None,
                env: Optional[dict] = None) -> dict:
    return {"schema": SCHEMA, "kind": kind,
            "created": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": command, "environment": env or environment(), "settings": settings, "rows": rows}


def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def machine_line(env: dict) -> str:
    cpu, gpu, v = env["cpu"], env.get("gpu"), env["versions"]
    parts = [f"CPU {cpu['model']} ({cpu['physical_cores']} cores, {', '.join(cpu.get('simd') or []) or 'no AVX'}), "
             f"{env['torch_threads']} torch threads"]
    parts.append(f"GPU {gpu['name']} (sm {gpu['capability']}, driver {gpu['driver']}, CUDA {gpu['cuda']})"
                 if gpu else "no GPU")
    parts.append(", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "tensorrt", "timm", "mineralnet") if v.get(k))
                 + ("" if v.get("tensorrt") else ", no TensorRT"))
    return "; ".join(parts)


def render_markdown(report: dict, title: Optional[str] = None) -> str:
    """Table of measured rows (with the ratio to each group's baseline) and a list of skipped ones."""
    rows, env, s = report["rows"], report["environment"], report.get("settings", {})
    train = report.get("kind") == "train"
    out = [f"### {title or ('Training throughput' if train else 'Inference latency and throughput')}", ""]
    out.append(f"- Date: {report['created']}")
    out.append(f"- Machine: {machine_line(env)}")
    if report.get("command"):
        out.append(f"- Command: `{report['command']}`")
    out.append(f"- Timing: warm-up {s.get('warmup_s')} s, then >= {s.get('duration_s')} s and >= "
               f"{s.get('min_runs')} timed runs per row, device-synchronised, inputs rotated over "
               f"{s.get('buffers', s.get('steps_per_epoch'))} buffers"
               + ("; the runtimes of one batch size interleaved in round-robin rounds (one call each per round; "
                  "ONNX Runtime's idle-thread spinning off so that it leaves the cores to the next runtime)"
                  if s.get("interleaved") else ""))
    if env.get("load_average"):
        after = s.get("load_average_after")
        worst = max([env["load_average"][0], (after or [0])[0]] +
                    [r.get("load_1min") or 0 for r in rows])
        out.append(f"- Load average (1/5/15 min) at start: {'/'.join(map(str, env['load_average']))}"
                   + (f", at end: {'/'.join(map(str, after))}" if after else "")
                   + f" on {env['cpu'].get('usable_cpus')} CPUs"
                   + (": **oversubscribed** (other processes held the cores; multi-threaded rows suffer most, "
                      "as their threads wait for each other at every parallel region)"
                      if worst > OVERSUBSCRIBED * (env["cpu"].get("usable_cpus") or 1) else ""))
    if s.get("peak_gflops"):
        out.append(f"- Peak: {s['peak_gflops']:.0f} GFLOP/s fp32 ({s.get('peak_source') or 'given with --peak-gflops'})")
    if any(r.get("load_1min") is not None for r in rows):
        out.append("- load: the 1-minute load average when the row's batch size finished (2 CPUs: above 2, other "
                   "processes were competing for the cores)")
    out.append("")
    baselines = {r["group"]: r for r in rows if r.get("baseline") and r["status"] == "ok"}
    unit = "step" if train else ""
    ratio_name = s.get("ratio_label") or ("p50 vs bare" if train else "p50 vs torch fp32")
    head = ["model", "runtime", "precision", "device", "batch"] + (["procs x threads"] if train else []) + \
           [f"p50 ms{' /' + unit if unit else ''}", "p90 ms", "p99 ms", "mean ms", "img/s", "runs", "GFLOP/s",
            "% of fp32 peak", ratio_name] + (["load"] if any(r.get("load_1min") is not None for r in rows) else [])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in rows:
        if r["status"] != "ok":
            continue
        lat, base = r["latency_ms"], baselines.get(r["group"])
        ratio = f"{lat['p50'] / base['latency_ms']['p50']:.2f}x" if base else "-"
        cells = [r["model"], r["runtime"], r["precision"], r["device"], str(r["batch"])]
        if train:
            cells.append(f"{r.get('processes', 1)} x {r.get('threads', '?')}")
        cells += [_fmt(lat["p50"]), _fmt(lat["p90"]), _fmt(lat["p99"]), _fmt(lat["mean"]),
                  _fmt(r["throughput_img_s"], ".1f"), str(r["runs"]), _fmt(r["gflops"], ".1f"),
                  _fmt(None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"], ".0f"), ratio]
        if head[-1] == "load":
            cells.append(_fmt(r.get("load_1min"), ".1f"))
        out.append("| " + " | ".join(cells) + " |")
    gflop = next((r["gflop_per_image"] for r in rows if r.get("gflop_per_image")), None)
    if gflop:
        out.append("")
        out.append(f"FLOPs per image ({'forward + backward' if train else 'forward'}, torch.utils.flop_counter, "
                   f"2 per multiply-add): {gflop:.2f} GFLOP. GFLOP/s = FLOPs per image x img/s (from the mean)."
                   + (" For int8 rows it is nominal GOP/s." if any(r["precision"] == "int8" for r in rows) else ""))
    others = [r for r in rows if r["status"] != "ok"]
    if others:
        out += ["", "Not measured:", ""]
        seen = set()
        for r in others:
            key = (r["model"], r["runtime"], r["precision"], r["status"], r["reason"])
            batches = [str(o["batch"]) for o in others if (o["model"], o["runtime"], o["precision"], o["status"],
                                                           o["reason"]) == key]
            if key in seen:
                continue
            seen.add(key)
            out.append(f"- {r['model']} / {r['runtime']} / {r['precision']} (batch {','.join(batches)}): "
                       f"{r['status']}: {r['reason']}")
    return "\n".join(out) + "\n"


def load_report(path: str) -> dict:
    try:
        rep = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MineralNetError(f"cannot read benchmark JSON {path!r} ({_short_error(e)}); pass files written by "
                              f"`mineralnet bench --json`") from None
    if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
        raise MineralNetError(f"{path!r} is not a MineralNet benchmark file (schema {SCHEMA}); pass files "
                              f"written by `mineralnet bench --json`")
    return rep


def _row_key(r: dict) -> tuple:
    return (r["model"], r["runtime"], r["precision"], r["batch"], r.get("processes", 1))


def compare_reports(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Markdown: rows present in both (matched by model, runtime, precision, batch), with B/A ratios of
    p50 latency and throughput; rows measured in only one are listed."""
    ra = {_row_key(r): r for r in a["rows"] if r["status"] == "ok"}
    rb = {_row_key(r): r for r in b["rows"] if r["status"] == "ok"}
    na, nb = names
    out = [f"A = {na}: {machine_line(a['environment'])}", f"B = {nb}: {machine_line(b['environment'])}", "",
           "| model | runtime | precision | batch | A p50 ms | B p50 ms | B/A latency | A img/s | B img/s | B/A img/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for k, x in ra.items():
        if k not in rb:
            continue
        y = rb[k]
        pa, pb = x["latency_ms"]["p50"], y["latency_ms"]["p50"]
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {pa:.2f} | {pb:.2f} | {pb / pa:.2f}x | "
                   f"{x['throughput_img_s']:.1f} | {y['throughput_img_s']:.1f} | "
                   f"{y['throughput_img_s'] / x['throughput_img_s']:.2f}x |")
    only = [("A", k) for k in ra if k not in rb] + [("B", k) for k in rb if k not in ra]
    if only:
        out += ["", "Measured in one file only: " + "; ".join(f"{w}: {'/'.join(map(str, k[:4]))}" for w, k in only)]
    return "\n".join(out) + "\n"


# ============================================================================ CLI
def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise MineralNetError(f"--batch-sizes {s!r} must be a comma list of integers, e.g. 1,8,32") from None
    if not out or min(out) < 1:
        raise MineralNetError(f"--batch-sizes {s!r} must list positive integers, e.g. 1,8,32")
    return out


def _str_list(s: Optional[str]) -> Optional[list[str]]:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def add_arguments(parser) -> None:
    parser.description = (
        "Latency percentiles and throughput of models across runtimes and batch sizes, with the environment "
        "and achieved GFLOP/s. MODEL is a run directory (PyTorch runtimes), an .onnx file (ONNX Runtime) or a "
        "TensorRT .engine. Runtimes that cannot run here are listed as skipped with the reason.")
    parser.add_argument("models", nargs="*", metavar="MODEL", help="run directory, .onnx file or .engine")
    parser.add_argument("--runtimes", default=None,
                        help=f"comma list of {', '.join(RUNTIMES)} (default: all that fit each model); with "
                             f"--train-step: {', '.join(TRAIN_LOOPS)}")
    parser.add_argument("--precision", default=None,
                        help="comma list for PyTorch rows: fp32, bf16, fp16 (default fp32,bf16 on CPU, "
                             "fp32,fp16,bf16 on CUDA); ONNX files and engines carry their own")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma list (default 1,8,32)")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: the model's)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per row (default 1)")
    parser.add_argument("--duration", type=float, default=3.0, help="timed seconds per row (default 3)")
    parser.add_argument("--min-runs", type=int, default=5, help="at least this many timed runs per row (default 5)")
    parser.add_argument("--buffers", type=int, default=4, help="input buffers rotated between runs (default 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="device of the PyTorch rows (default: cuda when present)")
    parser.add_argument("--peak-gflops", default=None, metavar="X|auto",
                        help="the machine's fp32 peak GFLOP/s for the %% of peak column; 'auto' derives the CPU's")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the full results as JSON")
    parser.add_argument("--markdown", default=None, metavar="OUT", help="write the results table as Markdown")
    parser.add_argument("--title", default=None, help="heading of the Markdown table")
    parser.add_argument("--sequential", action="store_true",
                        help="time each row on its own instead of interleaving the runtimes of a batch size "
                             "in round-robin rounds (the default, fairer on a machine with changing load)")
    parser.add_argument("--train-step", action="store_true",
                        help="measure training images/s (our train_one_epoch vs a bare timm-style loop) "
                             "instead of inference; default batch 32")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                        help="print B/A ratios row by row for two files written by --json")


def _peak(arg: Optional[str], env: dict) -> tuple[Optional[float], Optional[str]]:
    if arg is None:
        return None, None
    if arg == "auto":
        peak, how = cpu_peak_gflops(env["cpu"])
        if peak is None:
            raise MineralNetError(f"--peak-gflops auto: {how}")
        return peak, how
    try:
        v = float(arg)
    except ValueError:
        raise MineralNetError(f"--peak-gflops {arg!r} must be a number of GFLOP/s or 'auto'") from None
    if v <= 0:
        raise MineralNetError(f"--peak-gflops {arg!r} must be positive")
    return v, "given with --peak-gflops"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(args) -> int:
    if args.compare:
        a, b = (load_report(p) for p in args.compare)
        print(compare_reports(a, b, names=tuple(args.compare)), end="")
        return 0
    if not args.models:
        raise MineralNetError("give at least one MODEL (run directory, .onnx file or .engine), or --compare A.json B.json")
    if args.train_step and len(args.models) != 1:
        raise MineralNetError("--train-step measures one run directory at a time")
    if args.threads:
        if args.threads < 1:
            raise MineralNetError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    if args.duration <= 0 or args.warmup < 0 or args.min_runs < 1 or args.buffers < 1:
        raise MineralNetError("--duration must be > 0, --warmup >= 0, --min-runs and --buffers >= 1")
    env = environment()
    peak, peak_source = _peak(args.peak_gflops, env)
    batches = _int_list(args.batch_sizes if not (args.train_step and args.batch_sizes == "1,8,32") else "32")
    main = _is_main_process()
    log = print if main else (lambda *_: None)
    settings = dict(warmup_s=args.warmup, duration_s=args.duration, min_runs=args.min_runs,
                    batch_sizes=batches, threads=torch.get_num_threads(), peak_gflops=peak, peak_source=peak_source)
    if args.train_step:
        settings["steps_per_epoch"] = 3
        rows = run_train_step(args.models[0], loops=_str_list(args.runtimes),
                              precisions=_str_list(args.precision) or ["fp32"], batch_sizes=batches,
                              image_size=args.image_size, warmup_s=args.warmup, duration_s=args.duration,
                              min_runs=args.min_runs, peak_gflops=peak, log=log)
        kind = "train"
    else:
        settings["buffers"] = args.buffers
        settings["interleaved"] = not args.sequential
        rows = run_inference(args.models, runtimes=_str_list(args.runtimes), precisions=_str_list(args.precision),
                             batch_sizes=batches, image_size=args.image_size, warmup_s=args.warmup,
                             duration_s=args.duration, min_runs=args.min_runs, buffers=args.buffers,
                             threads=args.threads, device=args.device, peak_gflops=peak,
                             interleave=not args.sequential, log=log)
        kind = "inference"
    if not main:
        return 0
    settings["load_average_after"] = _loadavg()
    report = make_report(rows, kind=kind, settings=settings, command=_command_line(args), env=env)
    md = render_markdown(report, args.title)
    print()
    print(md, end="")
    if args.json:
        _write(args.json, json.dumps(report, indent=1) + "\n")
    if args.markdown:
        _write(args.markdown, md)
    return 0


def _command_line(args) -> str:
    """The `mineralnet bench` command that reproduces this run (flags that differ from the defaults)."""
    import shlex

    parts = ["mineralnet", "bench", *args.models]
    defaults = dict(train_step=False, sequential=False, runtimes=None, precision=None, batch_sizes="1,8,32", image_size=None,
                    warmup=1.0, duration=3.0, min_runs=5, buffers=4, threads=None, device="auto",
                    peak_gflops=None, title=None, json=None, markdown=None)
    for k, d in defaults.items():
        v = getattr(args, k, d)
        if v == d:
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag] if v is True else [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def _write(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    print(f"wrote {p}")
