"""How the data path grows with the number of photos: index, re-index, split, launch to the first
training batch (first and second launch, 1 and 2 processes), loader img/s, peak RSS; and the
near-duplicate pair search alone on up to 1M hashes.

    python bench/data_scale.py --work DIR [--sizes 10000 50000 100000] [--pairs 100000 1000000]
                               [--look-alike 100000] [--real DIR] [--md OUT] [--json OUT]

Synthetic collections (10 classes of 160x120 JPEGs: random "specimens" on random backgrounds) are
written once under --work and reused. Every stage runs in a fresh Python process, so its wall time
includes the imports a user pays, and its peak RSS (ru_maxrss) is its own. `--look-alike N` writes N
photos of small specimens on one uniform grey backdrop (hashes within a few bits of each other: the
case where chained false matches used to swallow the split) and reports the training share of a
--val-split 0.1 split. --real DIR adds the stages on a real class-folder collection.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = 10


def write_collection(root: Path, n: int, *, look_alike: bool = False, seed: int = 0, start: int = 0) -> Path:
    """n JPEGs in CLASSES class folders (file i in class i % CLASSES); files already there are kept."""
    import cv2

    rng = np.random.default_rng(seed + start)
    for i in range(start, start + n):
        path = root / f"class{i % CLASSES:02d}" / f"{i:07d}.jpg"
        if path.exists():
            rng.random(8)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if look_alike:
            img = np.full((120, 160, 3), 200, np.uint8)
            c = rng.integers(0, 255, 3).tolist()
            x, y, r = int(rng.integers(60, 100)), int(rng.integers(45, 75)), int(rng.integers(6, 14))
            cv2.circle(img, (x, y), r, c, -1)
        else:
            small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
            img = cv2.resize(small, (160, 120), interpolation=cv2.INTER_CUBIC)
            cv2.circle(img, (int(rng.integers(20, 140)), int(rng.integers(20, 100))), int(rng.integers(10, 40)),
                       rng.integers(0, 255, 3).tolist(), -1)
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root


def child(code: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python; it prints one JSON line last. Adds wall time and the child's peak RSS."""
    prog = ("import json, resource, sys, time\nT0 = time.time()\n" + code +
            "\nOUT['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
            "print(json.dumps(OUT))\n")
    t = time.time()
    done = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise SystemExit(f"stage failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.time() - t
    return out


def index_stage(root: Path, index_file: Path) -> dict:
    return child(f"""
from mineralnet import data as mdata
t = time.time()
idx = mdata.scan_dataset({str(root)!r}, index_file={str(index_file)!r})
OUT = {{'stage_s': time.time() - t, 'photos': len(idx.samples)}}
""", {"TQDM_DISABLE": "1"})


def split_stage(root: Path, index_file: Path) -> dict:
    return child(f"""
from mineralnet import data as mdata
idx = mdata.scan_dataset({str(root)!r}, index_file={str(index_file)!r})
t = time.time()
dup = mdata.collection_groups(idx)
t_groups = time.time() - t
tr, va = mdata.stratified_split(idx.labels(), 0.1, groups=dup.ids)
OUT = {{'stage_s': time.time() - t, 'groups_s': t_groups, 'train_share': len(tr) / len(idx.samples),
        'merged': dup.merged, 'pairs': dup.pairs, 'oversized': [len(g) for g in dup.oversized][:5]}}
""")


FIRST_BATCH = """
import json, os, resource, time
from mineralnet.config import load_config
import importlib
F = importlib.import_module("mineralnet.train.fit")

def probe(parts, accelerator, stop=None, bar=None):
    it = iter(parts.train_loader)
    next(it)
    t1 = time.time()
    n, t = 0, time.time()
    for _ in range({steps}):
        n += len(next(it)[1])
    OUT = {{'first_batch_at': t1, 'loader_img_s': n * accelerator.num_processes / (time.time() - t),
            'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            'rank': accelerator.process_index}}
    print(json.dumps(OUT), flush=True)
    os._exit(0)

F.train_one_epoch = probe
cfg = load_config("base", data={data!r}, out={out!r}, backbone="resnet10t", image_size=64, batch_size=32,
                  workers=2, epochs=1, pretrained="false", cache_images=False, normalize="imagenet",
                  precision="fp32")
F.fit(cfg)
"""


def first_batch_stage(root: Path, out: Path, index_file: Path, *, processes: int = 1, steps: int = 30) -> dict:
    """Seconds from the command's start to the first training batch, loader img/s after it, peak RSS per
    process. The run reads the collection through `index_file` (MINERALNET_CACHE points beside it)."""
    shutil.rmtree(out, ignore_errors=True)
    code = FIRST_BATCH.format(steps=steps, data=str(root), out=str(out))
    env = {**os.environ, "MINERALNET_CACHE": str(index_file.parent / "cache"), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    script = out.parent / f"{out.name}.py"
    script.write_text(code)
    if processes == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(script)]
    t = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise SystemExit(f"first-batch stage failed:\n{done.stderr[-3000:]}")
    return {"first_batch_s": max(r["first_batch_at"] for r in rows) - t,
            "loader_img_s": rows[0]["loader_img_s"], "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "processes": processes}


def pair_search(n: int, seed: int = 0) -> dict:
    return child(f"""
import numpy as np
from mineralnet.data.duplicates import near_duplicate_pairs
rng = np.random.default_rng({seed})
h = rng.integers(0, 2, ({n}, 128)).astype(bool)
src = rng.choice({n}, 1000, replace=False)
copies = h[src].copy()
for row in copies:
    row[rng.choice(128, 16, replace=False)] ^= True
h = np.concatenate([h, copies])
t = time.time()
pairs = near_duplicate_pairs(h, 20)
found = {{(i, j) for i, j, _ in pairs}}
recall = np.mean([(int(s), {n} + k) in found for k, s in enumerate(src)])
OUT = {{'stage_s': time.time() - t, 'pairs': len(pairs), 'recall_at_16_bits': float(recall)}}
""")


def run_sizes(args, results: dict) -> None:
    for n in args.sizes:
        root = write_collection(args.work / f"synthetic-{n}", n)
        extra = args.work / f"synthetic-{n}-plus"  # +1% photos in a copy, so the base stays as it is
        row = {"photos": n}
        index_file = args.work / f"index-{n}.npz"
        index_file.unlink(missing_ok=True)
        row["index"] = index_stage(root, index_file)
        row["index_again"] = index_stage(root, index_file)
        shutil.rmtree(extra, ignore_errors=True)
        shutil.copytree(root, extra, copy_function=os.link)
        shutil.copy(index_file, args.work / f"index-{n}-plus.npz")
        # the copy has another root: re-key the index to it, then add 1% new photos
        from mineralnet.data import index as mindex

        facts = mindex.load_index(args.work / f"index-{n}-plus.npz")
        mindex.save_index(args.work / f"index-{n}-plus.npz", os.path.abspath(extra), facts)
        write_collection(extra, max(1, n // 100), start=n, seed=1)
        row["reindex_plus_1pct"] = index_stage(extra, args.work / f"index-{n}-plus.npz")
        row["split"] = split_stage(root, index_file)
        cache = args.work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        row["first_launch"] = first_batch_stage(root, args.work / f"run-{n}", args.work / "x")
        row["second_launch"] = first_batch_stage(root, args.work / f"run-{n}", args.work / "x")
        if n in args.ddp:
            shutil.rmtree(cache, ignore_errors=True)
            row["first_launch_2proc"] = first_batch_stage(root, args.work / f"run-{n}-2p", args.work / "x",
                                                          processes=2)
            row["second_launch_2proc"] = first_batch_stage(root, args.work / f"run-{n}-2p", args.work / "x",
                                                           processes=2)
        results["sizes"].append(row)
        print(json.dumps(row), flush=True)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"Measured {results['date']} on {env['cpu']} ({env['cores']} cores; flags {env['flags']}), commit "
             f"{results['commit']}; 1-minute load average {results['loadavg_start']:.1f} at the start, "
             f"{results['loadavg_end']:.1f} at the end. Command: `{results['command']}`", "",
             "| photos | index (1st) s | index (2nd) s | re-index +1% s | groups + split s | train share | "
             "1st launch to 1st batch s | 2nd launch s | loader img/s | peak RSS MB (2nd launch) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        lines.append(f"| {r['photos']:,} | {r['index']['stage_s']:.1f} | {r['index_again']['stage_s']:.2f} | "
                     f"{r['reindex_plus_1pct']['stage_s']:.2f} | {r['split']['stage_s']:.2f} | "
                     f"{r['split']['train_share']:.3f} | {r['first_launch']['first_batch_s']:.1f} | "
                     f"{r['second_launch']['first_batch_s']:.1f} | {r['second_launch']['loader_img_s']:.0f} | "
                     f"{r['second_launch']['peak_rss_mb']:.0f} |")
    ddp = [r for r in results["sizes"] if "first_launch_2proc" in r]
    if ddp:
        lines += ["", "| photos | 2 processes: 1st launch to 1st batch s | 2nd launch s | peak RSS MB per process |",
                  "|---|---|---|---|"]
        for r in ddp:
            lines.append(f"| {r['photos']:,} | {r['first_launch_2proc']['first_batch_s']:.1f} | "
                         f"{r['second_launch_2proc']['first_batch_s']:.1f} | "
                         f"{r['second_launch_2proc']['peak_rss_mb']:.0f} |")
    if results.get("pairs"):
        lines += ["", "| hashes | pair search s | pairs found | recall of planted 16-bit copies |", "|---|---|---|---|"]
        for r in results["pairs"]:
            lines.append(f"| {r['hashes']:,} | {r['stage_s']:.1f} | {r['pairs']:,} | {r['recall_at_16_bits']:.3f} |")
    if results.get("look_alike"):
        la = results["look_alike"]
        lines += ["", f"Look-alike collection ({la['photos']:,} specimens on one grey backdrop): {la['split']['pairs']:,} "
                      f"near-duplicate pairs, largest dissolved groups {la['split']['oversized']}, training share "
                      f"at --val-split 0.1: {la['split']['train_share']:.3f} (groups + split "
                      f"{la['split']['stage_s']:.1f} s, index {la['index']['stage_s']:.1f} s)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for the synthetic collections and runs")
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 50_000, 100_000])
    p.add_argument("--ddp", type=int, nargs="*", default=[100_000], help="sizes also measured with 2 processes")
    p.add_argument("--pairs", type=int, nargs="*", default=[100_000, 1_000_000], help="pair search alone")
    p.add_argument("--look-alike", type=int, default=100_000, help="photos of the look-alike collection (0: none)")
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from mineralnet.bench.environment import cpu_info

    cpu = cpu_info()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    results = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "command": "python " + " ".join(
                   ["bench/data_scale.py"] + [a if not a.startswith("/") else "WORK" for a in (argv or sys.argv[1:])]),
               "environment": {"cpu": cpu.get("model", "?"), "cores": os.cpu_count(),
                               "flags": " ".join(cpu.get("simd", [])) or "none of avx2/avx512/amx"},
               "sizes": [], "pairs": [], "loadavg_start": os.getloadavg()[0]}
    args.work.mkdir(parents=True, exist_ok=True)
    for n in args.pairs:
        results["pairs"].append({"hashes": n, **pair_search(n)})
        print(json.dumps(results["pairs"][-1]), flush=True)
    run_sizes(args, results)
    if args.look_alike:
        root = write_collection(args.work / f"lookalike-{args.look_alike}", args.look_alike, look_alike=True)
        index_file = args.work / f"lookalike-{args.look_alike}.npz"
        results["look_alike"] = {"photos": args.look_alike, "index": index_stage(root, index_file),
                                 "split": split_stage(root, index_file)}
        print(json.dumps(results["look_alike"]), flush=True)
    results["loadavg_end"] = os.getloadavg()[0]
    md = markdown(results)
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
