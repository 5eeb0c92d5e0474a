"""Training throughput on this machine -> bench/results/train.{md} (+ train_step.json, ddp.json).

    python bench/train_throughput.py [--image-size 128] [--batch-size 32] [--duration 10] [--no-ddp]

1. Our training step (`mineralnet.train.train_one_epoch` under Accelerate, a synthetic in-memory
   loader) against a bare timm-style loop (autocast, forward, loss, zero_grad, backward, step) on the
   same ResNet-50 FusionNet, batch and precision, interleaved epoch by epoch in one process; fp32 vs
   bf16, NCHW vs channels_last. Both loops use the paper's weighted top-k loss, so the difference is
   the loop's own overhead. Target: at most 5%.
2. 1 vs 2 CPU processes (bench/ddp_scaling.py).
Every measurement is a `mineralnet bench RUN --train-step` command; this script chains them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from mineralnet import bench

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_scaling  # noqa: E402  (the sibling script, for its measure/render functions)


def overhead_notes(report: dict) -> str:
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    lines = ["#### Loop overhead (target: our step at most 5% slower than the bare loop)", "",
             "| precision | memory format | ours img/s | bare img/s | ours / bare step time (p50) | ours / bare (mean) | |",
             "|---|---|---|---|---|---|---|"]
    for ours in (r for r in rows if r["runtime"].startswith("mineralnet")):
        bare = next((r for r in rows if r["group"] == ours["group"] and r["runtime"].startswith("bare")), None)
        if not bare:
            continue
        p50 = ours["latency_ms"]["p50"] / bare["latency_ms"]["p50"]
        mean = ours["latency_ms"]["mean"] / bare["latency_ms"]["mean"]
        lines.append(f"| {ours['precision']} | {'channels_last' if ours['runtime'].endswith('-cl') else 'NCHW'} | "
                     f"{ours['throughput_img_s']:.1f} | {bare['throughput_img_s']:.1f} | {p50:.3f} | {mean:.3f} | "
                     f"{'met' if p50 <= 1.05 else 'NOT met'} |")
    base = next((r for r in rows if r["runtime"] == "bare" and r["precision"] == "fp32"), None)
    if base:
        lines += ["", "Precision and memory format, as images/s relative to the bare fp32 NCHW loop: " + ", ".join(
            f"{r['runtime']} {r['precision']} {r['throughput_img_s'] / base['throughput_img_s']:.2f}x" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--ddp-duration", type=float, default=10)
    p.add_argument("--no-ddp", action="store_true",
                   help="skip the 1 vs 2 process measurement (train.md then shows the last one, from ddp.json)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--render", action="store_true", help="only rewrite train.md from train_step.json and ddp.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        ddp = bench.load_report(str(out / "ddp.json")) if (out / "ddp.json").is_file() else None
        write_markdown(bench.load_report(str(out / "train_step.json")), ddp, out)
        return 0
    with tempfile.TemporaryDirectory(prefix="mineralnet-train-bench-") as tmp:
        run = bench.make_random_run(Path(tmp) / "resnet50-s24", image_size=args.image_size)
        js = out / "train_step.json"
        cmd = [sys.executable, "-m", "mineralnet.cli", "bench", str(run), "--train-step",
               "--runtimes", "mineralnet,bare,mineralnet-cl,bare-cl", "--precision", args.precision,
               "--batch-sizes", str(args.batch_size), "--image-size", str(args.image_size),
               "--warmup", str(args.warmup), "--duration", str(args.duration), "--json", str(js)]
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True)
        report = bench.load_report(str(js))
        report["command"] = report["command"].replace(str(run), "RUN").split(" --json ")[0]
        js.write_text(json.dumps(report, indent=1) + "\n")
        ddp = None
        if not args.no_ddp:
            ddp = ddp_scaling.measure_ddp(run, Path(tmp), image_size=args.image_size, batch=args.batch_size,
                                          precision=args.precision.split(",")[-1], warmup=args.warmup,
                                          duration=args.ddp_duration)
            (out / "ddp.json").write_text(json.dumps(ddp, indent=1) + "\n")
        elif (out / "ddp.json").is_file():  # keep the last 1 vs 2 process measurement in train.md
            ddp = bench.load_report(str(out / "ddp.json"))
    write_markdown(report, ddp, out)
    return 0


def write_markdown(report: dict, ddp: dict | None, out: Path) -> None:
    s = report["settings"]
    size = report["rows"][0]["image_size"] if report["rows"] else "?"
    batch = s["batch_sizes"][0] if s.get("batch_sizes") else "?"
    md = ["## Training throughput (CPU)", "",
          f"Regenerate: `python bench/train_throughput.py` (part of `bash bench/run_all.sh`). Model: ResNet-50 FusionNet "
          f"(stages 2,4; 7 classes; random weights) at {size} px, global batch {batch}, "
          f"SGD momentum 0.9, weighted top-k loss (k=0.5, alpha=0.2), synthetic in-memory batches (no decoding: "
          f"the data pipeline is measured in its own section). One step = the wall time between consecutive "
          f"batches requested by the loop. RUN is a random-weight run from `mineralnet.bench.make_random_run`.", "",
          bench.render_markdown(report, "Our train step vs a bare timm-style loop (interleaved in one process)"),
          overhead_notes(report)]
    if ddp is not None:
        md.append(ddp_scaling.render(ddp))
    (out / "train.md").write_text("\n".join(md))
    print(f"wrote {out / 'train.md'}")


if __name__ == "__main__":
    sys.exit(main())
