"""Everything GPU-related in one unattended command (< 10 minutes on one GPU) -> bench/results/gpu.{json,md}.

    python bench/gpu_suite.py [--calib-data DIR] [--with-compile] [--with-ort-trt]

On a CUDA machine, for ResNet-50 FusionNet (stages 2,4; 7 classes; random weights) at 224 px:
1. training images/s: our train step vs the bare loop, bf16 and fp16, NCHW and channels_last,
   batch 64/128/256 (`mineralnet bench RUN --train-step ...`);
2. export: ONNX fp32, fp16 and int8 (`mineralnet-export RUN --dynamic --max-batch 256 --fp16 --int8`),
   plus TensorRT fp16 and int8 engines (`--trt`) when TensorRT is installed;
3. inference over batch 1..256: PyTorch eager / channels_last in fp32, bf16, fp16, ONNX Runtime CUDA EP
   on the fp32 and fp16 files, and the TensorRT engines (`mineralnet bench ...`);
4. TensorRT (`tensorrt_step`): strongly typed fp32/fp16/int8 engines, their build time, p50 latency at
   batch 1 and 32, and their logits against ONNX Runtime (CPU, fp32 file) on real photos
   -> bench/results/gpu_tensorrt.{json,md}.
Without a GPU it runs its CPU-safe parts (run creation, fp32 ONNX export, runtime checks) and writes
every GPU row as skipped with its reason; it never overwrites results measured on a GPU.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mineralnet import bench

HERE = Path(__file__).resolve().parent
MINET7 = HERE.parent.parent / "shared" / "data" / "minet7"
TRAIN_BATCHES = "64,128,256"
INFER_BATCHES = "1,8,32,128,256"


def sh(cmd: list[str], log: list[str], run: Path) -> bool:
    line = " ".join(shlex.quote(c) for c in cmd)
    print("+", line, flush=True)
    shown = line.replace(sys.executable + " -m mineralnet.cli", "mineralnet").replace(str(run), "RUN")
    log.append(shown.replace(str(run.parent), "TMP").split(" --json ")[0])
    return subprocess.run(cmd).returncode == 0


def calib_folder(arg: str | None, work: Path) -> Path:
    if arg:
        return Path(arg)
    if MINET7.is_dir():
        return MINET7
    import numpy as np
    from PIL import Image

    out = work / "calib" / "photos"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(out / f"{i}.jpg")
    return out.parent


def planned_skips(reason: str, gflop: float | None) -> list[dict]:
    """The GPU rows this suite would measure, as skipped rows with `reason`."""
    rows = []
    for prec in ("bf16", "fp16"):
        for b in map(int, TRAIN_BATCHES.split(",")):
            for loop in ("mineralnet", "bare", "mineralnet-cl", "bare-cl"):
                rows.append(bench.skipped_row(reason, model="resnet50-s24", runtime=f"train {loop}", precision=prec,
                                              device="cuda", batch=b, image_size=224, gflop_per_image=gflop))
    for rt in ("torch", "torch-cl"):
        for prec in ("fp32", "bf16", "fp16"):
            for b in map(int, INFER_BATCHES.split(",")):
                rows.append(bench.skipped_row(reason, model="resnet50-s24", runtime=rt, precision=prec,
                                              device="cuda", batch=b, image_size=224, gflop_per_image=gflop))
    return rows


def _photos(calib: Path, n: int = 64) -> list[str]:
    from mineralnet.export.formats import _spread, list_images

    return _spread(list_images(calib), n)


def tensorrt_step(run: Path, calib: Path, out: Path, log: list[str]) -> dict:
    """Build (or reuse) the fp32/fp16/int8 engines of `run`, time them, check them against ONNX Runtime.

    Self-contained: uses engines already in RUN/export (the suite's export builds them with --trt),
    else exports them itself with a batch profile of 1..32. Writes OUT/gpu_tensorrt.{json,md}.
    Every number is a measurement on this machine; without TensorRT and a GPU it records why not.
    """
    from mineralnet.export import onnx as xonnx
    from mineralnet.export import tensorrt as xtrt
    from mineralnet.export.formats import ENGINE_NAMES
    from mineralnet.predict import Preprocessor

    t0 = time.perf_counter()
    result = {"tensorrt_version": xtrt.tensorrt_version(), "engines": [], "photos": str(calib)}
    missing = xtrt.tensorrt_missing()
    if missing:
        result["skipped"] = missing
    else:
        ex = run / "export"
        if not all((ex / ENGINE_NAMES[p]).is_file() for p in ("fp16", "int8")):
            sh(["mineralnet-export", str(run), "--fp16", "--int8", "--trt", "--calib-data", str(calib),
                "--calib-size", "64", "--dynamic", "--opt-batch", "8", "--max-batch", "32"], log, run)
        paths = _photos(calib)
        meta = json.loads((run / "model.json").read_text())
        images = Preprocessor(meta).batch(paths)  # (N, 3, S, S) float32
        ref = xonnx.run_session(xonnx.ort_session(ex / "model.onnx"), images)["logits"]
        for precision in xtrt.ENGINE_PRECISIONS:
            engine = ex / ENGINE_NAMES[precision]
            if engine.is_file():
                result["engines"].append(_time_engine(engine, precision, images, ref))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_tensorrt.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["## TensorRT engines (strongly typed)", ""]
    if "skipped" in result:
        md.append(f"Not measured: {result['skipped']}.")
    else:
        md += [f"TensorRT {result['tensorrt_version']}; logits vs ONNX Runtime CPU (model.onnx) on "
               f"{len(images)} photos from `{calib.name}`.", "",
               "| precision | build s | p50 ms b=1 | p50 ms b=32 | max abs logit diff | top-1 agreement |",
               "|---|---:|---:|---:|---:|---:|"]
        md += [f"| {e['precision']} | {e['build_seconds']} | {e['p50_ms'].get('1', '-')} | {e['p50_ms'].get('32', '-')} "
               f"| {e['max_abs_logit_diff']:.3g} | {e['top1_agreement']:.1%} |" for e in result["engines"]]
    (out / "gpu_tensorrt.md").write_text("\n".join(md) + "\n")
    return result


def _time_engine(engine: Path, precision: str, images, ref) -> dict:
    """p50 latency (CUDA events) at batch 1 and 32, and logits vs the ONNX Runtime reference."""
    import numpy as np

    from mineralnet.export import tensorrt as xtrt

    runner = xtrt.TRTRunner(engine)
    got = runner.run(images)["logits"]
    side = xtrt.read_sidecar(engine)
    row = {"precision": precision, "build_seconds": side.get("build_seconds"), "p50_ms": {},
           "max_abs_logit_diff": float(np.abs(got - ref).max()),
           "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}
    for batch in (1, 32):
        if not runner.min_batch <= batch <= runner.max_batch:
            continue
        x = torch.from_numpy(np.repeat(images[:1], batch, axis=0)).cuda()
        for _ in range(10):  # warm-up
            runner.infer(x)
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.infer(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        row["p50_ms"][str(batch)] = round(float(np.median(times)), 3)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-data", default=None, help="int8 calibration photos (default: minet7 if present, "
                                                      "else synthetic)")
    p.add_argument("--with-compile", action="store_true", help="also torch.compile rows (slow to compile)")
    p.add_argument("--with-ort-trt", action="store_true",
                   help="also ONNX Runtime's TensorRT EP (builds an engine per batch size: slow)")
    p.add_argument("--duration", type=float, default=1.5, help="timed seconds per inference row")
    p.add_argument("--train-duration", type=float, default=3.0, help="timed seconds per training row")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    existing = out / "gpu.json"
    if not gpu and existing.is_file():
        with_gpu = json.loads(existing.read_text()).get("environment", {}).get("gpu")
        if with_gpu:
            print(f"no GPU here; keeping {existing} measured on {with_gpu.get('name')}")
            return 0
    t_start = time.perf_counter()
    py = [sys.executable, "-m", "mineralnet.cli"]
    commands, rows, env = [], [], None
    with tempfile.TemporaryDirectory(prefix="mineralnet-gpu-suite-") as tmp:
        work = Path(tmp)
        run = bench.make_random_run(work / "resnet50-s24", image_size=224)
        gflop = bench.open_model(str(run)).gflop_per_image
        have_trt = bench._version("tensorrt") is not None
        if gpu:
            js = work / "train.json"
            if sh(py + ["bench", str(run), "--train-step", "--runtimes", "mineralnet,bare,mineralnet-cl,bare-cl",
                        "--precision", "bf16,fp16", "--batch-sizes", TRAIN_BATCHES, "--warmup", "2",
                        "--duration", str(args.train_duration), "--json", str(js)], commands, run):
                rep = bench.load_report(str(js))
                env = rep["environment"]
                rows += [dict(r, runtime=f"train {r['runtime']}") for r in rep["rows"]]
        export = ["mineralnet-export", str(run), "--dynamic", "--max-batch", "256"]
        if gpu:
            export += ["--fp16", "--int8", "--calib-data", str(calib_folder(args.calib_data, work)), "--calib-size", "64"]
            if have_trt:
                export += ["--trt", "--opt-batch", "32"]
        sh(export, commands, run)
        ex = run / "export"
        models = [str(f) for f in (ex / "model.onnx", ex / "model.fp16.onnx") if f.is_file()]
        engines = sorted(str(f) for f in ex.glob("*.engine"))
        if not engines:  # placeholder files (TMP/*.engine) let the bench state why TensorRT cannot run here
            (work / "model.fp16.engine").write_bytes(b"")
            (work / "model.int8.engine").write_bytes(b"")
            engines = [str(work / "model.fp16.engine"), str(work / "model.int8.engine")]
        runtimes = ["ort-cuda", "tensorrt"] + (["ort-trt"] if args.with_ort_trt else [])
        if gpu:
            runtimes += ["torch", "torch-cl"] + (["torch-compile"] if args.with_compile else [])
            models = [str(run)] + models
        js = work / "infer.json"
        if sh(py + ["bench", *models, *engines, "--runtimes", ",".join(runtimes), "--precision",
                    "fp32,bf16,fp16", "--batch-sizes", INFER_BATCHES, "--warmup", "1",
                    "--duration", str(args.duration), "--json", str(js)], commands, run):
            rep = bench.load_report(str(js))
            env = env or rep["environment"]
            rows += rep["rows"]
        if not gpu:
            rows += planned_skips("torch sees no CUDA GPU on this machine; run `python bench/gpu_suite.py` on one",
                                  gflop)
        else:
            tensorrt_step(run, calib_folder(args.calib_data, work), out, commands)
    for r in rows:
        r["group"] = f"{r['precision']} batch {r['batch']}"
        r["baseline"] = r["runtime"] == "torch"
        if r["model"] == Path(str(run)).name:
            r["model"] = "resnet50-s24"
    seconds = time.perf_counter() - t_start
    report = bench.make_report(rows, kind="inference", env=env, command="python bench/gpu_suite.py",
                               settings={"warmup_s": 1, "duration_s": args.duration, "min_runs": 5, "buffers": 4,
                                         "ratio_label": "p50 vs torch eager (same precision)",
                                         "commands": commands, "suite_seconds": round(seconds, 1)})
    existing.write_text(json.dumps(report, indent=1) + "\n")
    md = ["## GPU suite", "",
          f"Regenerate on a CUDA machine: `python bench/gpu_suite.py` (took {seconds / 60:.1f} min here). "
          f"It ran these commands (RUN = a random-weight ResNet-50 FusionNet run at 224 px):", ""]
    md += [f"    {c}" for c in commands] + [""]
    if not gpu:
        md += ["**No GPU on the machine that wrote this file**: the suite ran its CPU-safe parts (run creation, "
               "fp32 ONNX export, runtime checks); every GPU row is listed below as skipped with its reason.", ""]
    md.append(bench.render_markdown(report, "GPU: training and inference of ResNet-50 FusionNet at 224 px"))
    (out / "gpu.md").write_text("\n".join(md))
    print(f"wrote {out / 'gpu.md'} and {existing} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
