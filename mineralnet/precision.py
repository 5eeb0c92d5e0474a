"""Training precision on the machine at hand: bf16 autocast only where the CPU computes bf16 natively.

PyTorch runs bf16 autocast on any x86 CPU, but without bf16 instructions (AVX512-BF16 or AMX-BF16) it
converts every operand in software: our resnet10t training step at 96 px, batch 32, took 9.6 s in bf16 against
0.51 s in fp32 on a 2-core AVX2-only AMD EPYC (19x slower; bench/RESULTS.md). The `cpu` and `demo` presets
ask for bf16 because it pays on the AVX-512 machines they were tuned on, so on a CPU without bf16 a run
trains in fp32 instead and says so. GPUs are left alone (Accelerate and autocast decide there).
"""
from __future__ import annotations

import platform
from typing import Iterable, Optional

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 /proc/cpuinfo flags
ARM_BF16_FLAGS = ("bf16",)                # aarch64 /proc/cpuinfo Features


def cpu_flags() -> Optional[set[str]]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def resolve_precision(requested: str, cuda: bool, flags: Optional[Iterable[str]],
                      machine: str = "") -> tuple[str, str]:
    """(precision to train in, note) for `requested` (fp32, bf16 or fp16). The note is empty unless the
    precision was changed. Unknown flags (None) keep the request: the check only acts on what it can see."""
    if requested != "bf16" or cuda or flags is None:
        return requested, ""
    flags = set(flags)
    machine = (machine or platform.machine()).lower()
    wanted = ARM_BF16_FLAGS if machine in ("aarch64", "arm64") else BF16_FLAGS
    if flags & set(wanted):
        return requested, ""
    return "fp32", (f"this CPU has no bf16 instructions ({' or '.join(wanted)}), where bf16 autocast runs 10-20x "
                    f"slower than fp32: training in fp32 instead")
