"""Latency and throughput benchmarks people can trust: ``mineralnet bench MODEL...``.

    harness.py      warm-up, timed runs, percentiles, interleaving, result rows
    environment.py  CPU/GPU, versions, load, FLOPs, peak GFLOP/s
    runtimes.py     open a model (run dir, ONNX, OpenVINO IR, engine) and build it for a runtime and precision
    inference.py    run_inference: runtimes x precisions x batch sizes
    accuracy.py     --data: Top1, mean class accuracy and agreement with PyTorch fp32 per row
    train_step.py   run_train_step: our training step against a bare loop
    report.py       JSON report, Markdown, comparison of two reports
    cli.py          the `mineralnet bench` command
"""
from mineralnet.bench.harness import (LATENCY_KEYS, OVERSUBSCRIBED, ROW_KEYS, SCHEMA, measure, measure_interleaved,
                                      percentiles, result_row, skipped_row)
from mineralnet.bench.environment import (_version, count_flops, cpu_info, cpu_peak_gflops, environment, gpu_info,
                                          matmul_gflops)
from mineralnet.bench.runtimes import RUNTIMES, BenchModel, Runtime, Skip, make_random_run, open_model
from mineralnet.bench.inference import run_inference
from mineralnet.bench.accuracy import PhotoSet, score_rows
from mineralnet.bench.train_step import run_train_step
from mineralnet.bench.report import compare_reports, load_report, machine_line, make_report, render_markdown

__all__ = ["BenchModel", "PhotoSet", "score_rows", "LATENCY_KEYS", "OVERSUBSCRIBED", "ROW_KEYS", "RUNTIMES", "Runtime", "SCHEMA", "Skip",
           "compare_reports", "count_flops", "cpu_info", "cpu_peak_gflops", "environment", "gpu_info",
           "load_report", "machine_line", "make_random_run", "make_report", "matmul_gflops", "measure",
           "measure_interleaved", "open_model", "percentiles", "render_markdown", "result_row", "run_inference",
           "run_train_step", "skipped_row", "_version"]
