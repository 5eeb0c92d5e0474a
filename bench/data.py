"""Decode + augment throughput of the training input pipeline, one worker (a plain loop in the
main process, one CPU thread), against the equivalent torchvision pipeline.

    python bench/data.py [--data DIR] [--image-size 224 128] [--n 300] [--repeats 5] [--json OUT]

ours         mineralnet.data.load_image + build_transforms(train=True)        (fused OpenCV warp)
albument.    mineralnet.data.load_image + build_transforms(..., backend="albumentations")
torchvision  PIL open + convert("RGB") + RandomResizedCrop + RandomRotation + RandomHorizontalFlip
             + ToTensor + Normalize
eval rows    build_transforms(train=False) vs Resize + CenterCrop + ToTensor + Normalize
decode rows  load_image alone vs PIL open + convert("RGB") alone

Every repeat runs every pipeline on the same files in turn; the table reports the median
images/s over repeats and the median of the per-repeat ratios to torchvision.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mineralnet import data as mdata

MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]


def pipelines(size: int):
    import torchvision
    import torchvision.transforms as T
    from PIL import Image

    ours = mdata.build_transforms(size, MEAN, STD, train=True)
    alb = mdata.build_transforms(size, MEAN, STD, train=True, backend="albumentations")
    tv = T.Compose([T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomRotation(30), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(MEAN, STD)])
    ours_eval = mdata.build_transforms(size, MEAN, STD, train=False)
    tv_eval = T.Compose([T.Resize(mdata.eval_resize(size)), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    return {
        "ours": lambda p: ours(mdata.load_image(p, min_size=ours.min_decode_size)),
        "albumentations": lambda p: alb(image=mdata.load_image(p))["image"],
        "torchvision": lambda p: tv(Image.open(p).convert("RGB")),
        "eval: ours": lambda p: ours_eval(mdata.load_image(p, min_size=ours_eval.min_decode_size)),
        "eval: torchvision": lambda p: tv_eval(Image.open(p).convert("RGB")),
        "decode: load_image": lambda p: mdata.load_image(p),
        "decode: PIL": lambda p: Image.open(p).convert("RGB"),
    }, torchvision.__version__


def reference(name: str) -> str:
    """The row a pipeline is compared with."""
    return {"decode": "decode: PIL", "eval": "eval: torchvision"}.get(name.split(":")[0], "torchvision")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "minet7"
    ap.add_argument("--data", default=str(default) if default.is_dir() else None,
                    help="photo folder (default: ../shared/data/minet7 if present, else the demo set)")
    ap.add_argument("--image-size", type=int, nargs="+", default=[224, 128])
    ap.add_argument("--n", type=int, default=300, help="photos per repeat (spread over the collection)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # one worker = one core, for both pipelines
    cv2.setNumThreads(1)
    root = args.data or str(mdata.make_demo_dataset())
    index = mdata.scan_dataset(root, verify=False)
    step = max(1, len(index.samples) // args.n)
    paths = [p for p, _ in index.samples[::step]][: args.n]
    env = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
           "data": root, "photos": len(paths), "repeats": args.repeats, "threads": 1}
    try:
        env["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    results = []
    for size in args.image_size:
        fns, env["torchvision"] = pipelines(size)
        for fn in fns.values():  # warm-up: page cache, lazy imports, allocator
            for p in paths[:20]:
                fn(p)
        rates = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for p in paths:
                    fn(p)
                rates[name].append(len(paths) / (time.perf_counter() - t0))
        for name, r in rates.items():
            ref = rates[reference(name)]
            results.append({"image_size": size, "pipeline": name, "img_per_s": statistics.median(r),
                            "img_per_s_all": [round(x, 1) for x in r], "vs": reference(name),
                            "ratio": statistics.median(a / b for a, b in zip(r, ref))})
    print(f"# data pipeline, 1 worker: {env['cpu']}; torch {env['torch']}, torchvision {env['torchvision']}, "
          f"OpenCV {env['opencv']}; {len(paths)} photos from {root}, {args.repeats} repeats\n")
    print("| size | pipeline | images/s (median) | ratio (median of repeats) |")
    print("|---:|---|---:|---:|")
    for r in results:
        print(f"| {r['image_size']} | {r['pipeline']} | {r['img_per_s']:.0f} | {r['ratio']:.2f}x vs {r['vs']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
