"""Training img/s under `accelerate launch` vs plain `python`, same preset and photos -> Markdown + JSON.

    python bench/launch_threads.py [--data ../shared/data/minet7] [--epochs 3] [--repeats 2] [--work DIR]

Runs, interleaved (A B A B ...), `accelerate launch launch/train.py --config cpu --data DATA --epochs 3` and
`python launch/train.py --config cpu --data DATA --epochs 3`, each into its own run folder, and reads the
training images/s from each run's metrics.jsonl (images of all epochs / training seconds of all epochs; no
start-up, validation or calibration). Before `--threads` (default auto), `accelerate launch` left every
process OMP_NUM_THREADS=1; the header line of each run says the threads it got.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MINET7 = ROOT.parent / "shared" / "data" / "minet7"


def commands(data: str, epochs: int, extra: list[str]) -> dict[str, list[str]]:
    train = [str(ROOT / "launch" / "train.py"), "--config", "cpu", "--data", data, "--epochs", str(epochs), *extra]
    return {"accelerate launch": [sys.executable, "-m", "accelerate.commands.launch", *train],
            "python": [sys.executable, *train]}


def train_rate(run: Path) -> dict:
    """{img_s, images, seconds} over all epochs of a run's metrics.jsonl."""
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    seconds = sum(l["seconds"] for l in lines)
    images = sum(l["img_per_s"] * l["seconds"] for l in lines)
    return {"img_s": images / seconds, "images": round(images), "seconds": seconds, "epochs": len(lines)}


def run_once(label: str, cmd: list[str], out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user's shell would have it
    t0 = time.perf_counter()
    p = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{label} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    header = next((l for l in p.stdout.splitlines() if l.startswith("training ")), "")
    m = re.search(r"(\d+) thread\(s\) per process \((.*?)\), global batch", header)
    row = dict(train_rate(out), label=label, wall_s=wall,
               threads=int(m.group(1)) if m else None, why=m.group(2) if m else None)
    print(f"{label:>18}: {row['img_s']:.1f} img/s, {row['threads']} thread(s) ({row['why']}), "
          f"{wall:.0f} s wall", flush=True)
    return row


def cpu_line() -> str:
    txt = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in txt.splitlines() if l.startswith("Model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in txt.splitlines() if l.startswith("Flags")), [])
    have = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f") if f in flags]
    return f"{model}, {len(os.sched_getaffinity(0))} cores available, flags: {' '.join(have) or 'none of amx/avx512'}"


def markdown(rows: list[dict], cmds: dict, data_shown: str, epochs: int) -> str:
    md = ["| repeat | launcher | threads per process | train img/s | train s | wall s |",
          "|---:|---|---|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['repeat']} | {r['label']} | {r['threads']} ({r['why']}) | {r['img_s']:.1f} | "
                  f"{r['seconds']:.1f} | {r['wall_s']:.0f} |")
    mean = {k: sum(r["img_s"] for r in rows if r["label"] == k) / max(1, sum(r["label"] == k for r in rows))
            for k in cmds}
    md += ["", f"Ratio accelerate launch / python (mean train img/s over repeats): "
               f"**{mean['accelerate launch'] / mean['python']:.2f}x** "
               f"({mean['accelerate launch']:.1f} vs {mean['python']:.1f} img/s).", "",
           "Commands (interleaved, each into a fresh run folder):", "",
           f"    accelerate launch launch/train.py --config cpu --data {data_shown} --epochs {epochs}",
           f"    python launch/train.py --config cpu --data {data_shown} --epochs {epochs}", "",
           f"CPU: {cpu_line()}."]
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(MINET7), help="labelled photos (default ../shared/data/minet7 beside "
                                                      "the checkout)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for the run folders (default: a new temporary one)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--train-args", default="", help="extra training flags, e.g. '--max-train-minutes 1'")
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data} is not a folder; pass the photos (one sub-folder per mineral)")
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="mineralnet-launch-threads-"))
    work.mkdir(parents=True, exist_ok=True)
    cmds = commands(args.data, args.epochs, shlex.split(args.train_args))
    rows = []
    for rep in range(1, args.repeats + 1):
        order = list(cmds) if rep % 2 else list(cmds)[::-1]  # alternate who goes first
        for label in order:
            out = work / f"{label.split()[0]}-{rep}"
            rows.append(dict(run_once(label, cmds[label], out), repeat=rep))
    shown = "../shared/data/minet7" if Path(args.data).resolve().parts[-3:] == MINET7.parts[-3:] else args.data
    md = markdown(rows, cmds, shown, args.epochs)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "markdown": md}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
