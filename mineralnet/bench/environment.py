"""What a benchmark ran on: CPU and GPU model and flags, versions, load, FLOPs and peak GFLOP/s."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mineralnet import __version__
from mineralnet.bench.harness import measure
from mineralnet.model import FusionNet

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

    with torch.device("meta"):
        model = FusionNet(meta["backbone"], meta["stages"], meta["num_classes"], pretrained=False)
    model.train(train)
    return count_flops(model, image_size, batch=2 if train else 1, train=train, device="meta")


def matmul_gflops(n: int = 2048, seconds: float = 2.0, dtype=torch.float32) -> float:
    """Achieved GFLOP/s of an n x n x n matrix multiply: what this machine's BLAS really reaches."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    stats = measure(lambda _: torch.mm(a, b), [0], warmup_s=0.3, duration_s=seconds, min_runs=3)
    return 2 * n ** 3 / (stats["latency_ms"]["p50"] * 1e-3) / 1e9
