"""Input capacity of ONE CPU core (loader + augmentation, no model): the worker pipeline against the
device-side pipeline (--augment-on device), photos cached in RAM as training caches them.

    python bench/loader_capacity.py [--data ../shared/data/minet7] [--image-size 224] [--n 600] [--batch 64]
                                    [--repeats 5] [--json OUT]

workers           PhotoDataset(cache) + TrainTransform: fused OpenCV warp + normalise per photo, collated float32
device: loader    CanvasDataset(cache): letterboxed uint8 canvases + (seed, h, w), collated: what the loader
                  process does when augmentation runs on the training device
device: augment   DeviceAugment on this CPU (one thread) over those batches: the cost the step pays when
                  the "device" is the CPU
device: both      loader + augment in one loop on one core

One thread everywhere (torch and OpenCV), workers=0 (the loop runs in this process). Each repeat runs the
rows in turn; the table gives the median over repeats. Decoding and caching happen once, before timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader

from mineralnet import data as mdata
from mineralnet.sizes import eval_resize
from mineralnet.bench.environment import environment

MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]


def _timed(fn, n_images: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - t0)


def measure(samples, size: int, batch: int, repeats: int) -> dict:
    side = round(eval_resize(size) * 1.25)  # build_loaders' cache side for this image size
    t0 = time.perf_counter()
    workers_ds = mdata.PhotoDataset(samples, mdata.build_transforms(size, MEAN, STD, train=True), cache_side=side)
    canvas_ds = mdata.CanvasDataset(samples, side)
    cache_s = time.perf_counter() - t0
    aug = mdata.DeviceAugment(size, MEAN, STD)
    n = (len(samples) // batch) * batch
    loader_w = DataLoader(workers_ds, batch_size=batch, drop_last=True)
    loader_d = DataLoader(canvas_ds, batch_size=batch, drop_last=True)
    raw = list(loader_d)

    def both():
        for x, _ in loader_d:
            aug(x)

    rows = {"workers": loader_w, "device: loader": loader_d}
    runs = {k: [] for k in ("workers", "device: loader", "device: augment", "device: both")}
    for _ in range(repeats):
        for name, loader in rows.items():
            runs[name].append(_timed(lambda: [None for _ in loader], n))
        runs["device: augment"].append(_timed(lambda: [aug(x) for x, _ in raw], n))
        runs["device: both"].append(_timed(both, n))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"image_size": size, "canvas_side": side, "images": n, "batch": batch, "cache_seconds": cache_s,
            "img_per_s": med, "runs": runs, "augment_ms_per_image": 1000.0 / med["device: augment"]}


def markdown(r: dict) -> str:
    lines = [f"Input capacity of one core at {r['image_size']} px (canvas {r['canvas_side']} px, batch {r['batch']}, "
             f"{r['images']} photos cached, median of {len(r['runs']['workers'])} repeats)", "",
             "| pipeline (one core, no model) | img/s | ms / image | x workers |", "|---|---:|---:|---:|"]
    base = r["img_per_s"]["workers"]
    for name, v in r["img_per_s"].items():
        lines.append(f"| {name} | {v:,.0f} | {1000 / v:.3f} | {v / base:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "minet7"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n", type=int, default=600, help="photos to cache (the first N of the scan)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    samples = mdata.scan_dataset(args.data).samples[: args.n]
    r = measure(samples, args.image_size, args.batch, args.repeats)
    r.update(environment=environment(), opencv=cv2.__version__, command=" ".join(sys.argv))
    cpu = r["environment"]["cpu"]
    print(markdown(r))
    print(f"\nCPU: {cpu['model']}; SIMD: {' '.join(cpu['simd'])}; torch {torch.__version__}, OpenCV {cv2.__version__}, "
          f"1 thread; load average {r['environment']['load_average']}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
