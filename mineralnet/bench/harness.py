"""The timing harness: warm up for a time, run for a duration, synchronise, rotate inputs, and report
percentiles; rows, interleaving of variants, and error rows."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch


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
