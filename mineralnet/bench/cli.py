"""The `mineralnet bench` command."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from mineralnet.errors import MineralNetError
from mineralnet.bench.environment import _loadavg, cpu_peak_gflops, environment
from mineralnet.bench.runtimes import RUNTIMES, _torch_device
from mineralnet.bench.inference import run_inference
from mineralnet.bench.accuracy import PhotoSet, score_rows
from mineralnet.bench.train_step import TRAIN_LOOPS, run_train_step
from mineralnet.bench.report import compare_reports, load_report, make_report, render_markdown

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
        "TensorRT .engine, an OpenVINO IR (.xml; --runtimes openvino also runs .onnx files in OpenVINO), a "
        "LiteRT .tflite, an ExecuTorch .pte, or an ensemble folder (`mineralnet ensemble`: one row that runs every "
        "member on decoded photos, each with its own preprocessing, fp32; its latency is the whole ensemble's). "
        "Runtimes that cannot run here are listed as skipped with the reason. With --data, every row also "
        "gets its accuracy on the same labelled photos and its agreement with the PyTorch fp32 model.")
    parser.add_argument("models", nargs="*", metavar="MODEL", help="run directory, .onnx, .xml IR, .engine, .tflite, .pte or "
                                                                   "ensemble folder")
    parser.add_argument("--runtimes", default=None,
                        help=f"comma list of {', '.join(RUNTIMES)} (default: all that fit each model); with "
                             f"--train-step: {', '.join(TRAIN_LOOPS)}")
    parser.add_argument("--precision", default=None,
                        help="comma list for PyTorch rows: fp32, bf16, fp16 (default fp32,bf16 on CPU, "
                             "fp32,fp16,bf16 on CUDA); ONNX files and engines carry their own; OpenVINO rows "
                             "run the file with each as its inference precision hint (bf16 on an int8 file: "
                             "int8+bf16)")
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
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="labelled photos (one sub-folder per mineral): add Top1, mean class accuracy and "
                             "the top-1 agreement with the run's PyTorch fp32 model to every row")
    parser.add_argument("--split", default=None, choices=("val", "train"),
                        help="with --data: score only this part of the run's split file (split.json of the run "
                             "directory, or of the run whose export/ holds the file), e.g. val = held out; for an "
                             "ensemble, val = the photos every member held out")
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
    if args.split and not args.data:
        raise MineralNetError("--split needs --data DIR (the folder the run was trained on)")
    photos = PhotoSet(args.data, args.split) if args.data else None
    if photos is not None and args.train_step:
        raise MineralNetError("--data scores inference rows; drop it with --train-step")
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
        if photos is not None:
            log(f"scoring every row on the labelled photos of {args.data}"
                + (f" ({args.split} split)" if args.split else ""))
            score_rows(rows, photos, device=_torch_device(args.device), log=log)
            settings.update(data=args.data, split=args.split)
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
                    peak_gflops=None, title=None, json=None, markdown=None, data=None, split=None)
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
