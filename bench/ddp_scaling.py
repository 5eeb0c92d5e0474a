"""Training images/s with 1 vs 2 processes on this CPU -> bench/results/ddp.json (Markdown on stdout).

    python bench/ddp_scaling.py [--run RUN] [--image-size 128] [--batch-size 32] [--duration 10]

Three runs of `mineralnet bench RUN --train-step --runtimes mineralnet` (our train_one_epoch under
Accelerate, same global batch): 1 process x 1 thread, 1 process x 2 threads, and 2 processes x 1 thread
via `accelerate launch --multi_gpu --num_processes 2` (gloo DDP: make_accelerator builds
Accelerator(cpu=True) when there is no CUDA). The ratio column is each row's step time against
1 process x 2 threads.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from mineralnet import bench

HERE = Path(__file__).resolve().parent


def sh(cmd: list[str]) -> str:
    line = " ".join(shlex.quote(c) for c in cmd)
    print("+", line, flush=True)
    subprocess.run(cmd, check=True)
    return line


def measure_ddp(run: Path, work: Path, *, image_size: int, batch: int, precision: str, warmup: float,
                duration: float) -> dict:
    """Run the three configurations; returns one merged report (kind "train")."""
    common = ["bench", str(run), "--train-step", "--runtimes", "mineralnet", "--precision", precision,
              "--batch-sizes", str(batch), "--image-size", str(image_size), "--warmup", str(warmup),
              "--duration", str(duration)]
    py = [sys.executable, "-m", "mineralnet.cli"]
    configs = [
        ("1 process x 1 thread", py + common + ["--threads", "1"]),
        ("1 process x 2 threads", py + common + ["--threads", "2"]),
        ("2 processes x 1 thread (DDP)", [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                          "--num_processes", "2", "--num_machines", "1",
                                          "--num_cpu_threads_per_process", "1", "-m", "mineralnet.cli"] + common),
    ]
    rows, commands, first = [], [], None
    for label, cmd in configs:
        js = work / f"ddp-{len(rows)}.json"
        line = sh(cmd + ["--json", str(js)])
        commands.append(line.replace(sys.executable + " -m accelerate.commands.launch", "accelerate launch")
                        .replace(sys.executable + " -m mineralnet.cli", "mineralnet").replace(str(run), "RUN")
                        .replace(" --json " + str(js), ""))
        rep = bench.load_report(str(js))
        first = first or rep
        for r in rep["rows"]:
            r.update(runtime=f"mineralnet: {label}", group="ddp", baseline=label.startswith("1 process x 2"))
            rows.append(r)
    settings = dict(first["settings"], ratio_label="p50 step vs 1 x 2", commands=commands)
    report = bench.make_report(rows, kind="train", settings=settings, command=None, env=first["environment"])
    return report


def render(report: dict) -> str:
    md = bench.render_markdown(report, "Data-parallel scaling on this CPU: 1 vs 2 processes, same global batch")
    cmds = "\n".join(f"    {c}" for c in report["settings"].get("commands", []))
    rows = {r["runtime"]: r for r in report["rows"] if r["status"] == "ok"}
    notes = []
    one = next((r for k, r in rows.items() if "1 process x 1" in k), None)
    two = next((r for k, r in rows.items() if "2 processes" in k), None)
    both = next((r for k, r in rows.items() if "1 process x 2" in k), None)
    if one and two:
        notes.append(f"2 processes vs 1 process x 1 thread: {two['throughput_img_s'] / one['throughput_img_s']:.2f}x "
                     f"images/s (ideal 2x).")
    if both and two:
        notes.append(f"2 processes x 1 thread vs 1 process x 2 threads: "
                     f"{two['throughput_img_s'] / both['throughput_img_s']:.2f}x images/s.")
    return md + "\nCommands (RUN = a random-weight run from `mineralnet.bench.make_random_run`):\n\n" + cmds + \
        "\n\n" + " ".join(notes) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run directory (default: a random-weight ResNet-50 FusionNet)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--out", default=str(HERE / "results" / "ddp.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mineralnet-ddp-") as tmp:
        run = Path(args.run) if args.run else bench.make_random_run(Path(tmp) / "resnet50-s24", image_size=args.image_size)
        report = measure_ddp(run, Path(tmp), image_size=args.image_size, batch=args.batch_size,
                             precision=args.precision, warmup=args.warmup, duration=args.duration)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import json
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
