"""`mineralnet bench MODEL...`: inference latency and throughput over runtimes, precisions and batch sizes."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable, Optional, Sequence


from mineralnet.errors import MineralNetError
from mineralnet.bench.harness import _error_row, _short_error, measure, measure_interleaved, result_row
from mineralnet.bench.environment import _loadavg
from mineralnet.bench.runtimes import RUNTIMES, Skip, _row_precisions, _torch_device, open_model, openvino_hint

# ============================================================================ inference benchmark
def _prepare_entries(models, names, precisions, batch_sizes, dev, threads, peak_gflops, interleave, log,
                     explicit: bool = False):
    """Build every (model, runtime, precision) -> (entries: [(common row fields, Prepared or None)],
    fixed: {(entry index, batch): skipped/error row} for those that cannot run here)."""
    fixed: dict[tuple, dict] = {}   # (entry index, batch) -> skipped/error row
    entries = []                    # (common row fields, Prepared or None)
    for bm in models:
        # a runtime also runs other kinds when --runtimes names it (OpenVINO on an .onnx file)
        chosen = [RUNTIMES[n] for n in names
                  if RUNTIMES[n].kind == bm.kind or (explicit and bm.kind in RUNTIMES[n].also)]
        if not chosen:
            raise MineralNetError(f"none of --runtimes {','.join(names)} runs {bm.path!r} (a {bm.kind} model); "
                                  f"use {', '.join(n for n, r in RUNTIMES.items() if r.kind == bm.kind)}")
        for rt in chosen:
            for prec in _row_precisions(bm, precisions, rt.name):
                common = dict(model=bm.name, runtime=rt.name, precision=prec, image_size=bm.image_size,
                              gflop_per_image=bm.gflop_per_image, peak_gflops=peak_gflops, path=bm.path)
                if rt.name == "openvino":  # the row's precision is a label; the hint is what OpenVINO is given
                    common["hint"] = openvino_hint(bm.file_precision or "fp32", prec)
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
    return entries, fixed


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
    shared = {m.name for m in models if sum(o.name == m.name for o in models) > 1}
    for bm in models:  # two files of one name (export/model.int8.xml, export-nncf/model.int8.xml): add the folder
        if bm.name in shared and Path(bm.path).suffix:
            bm.name = f"{Path(bm.path).parent.name}/{Path(bm.path).name}"
    entries, fixed = _prepare_entries(models, names, precisions, batch_sizes, dev, threads, peak_gflops,
                                      interleave, log, explicit=runtimes is not None)
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
