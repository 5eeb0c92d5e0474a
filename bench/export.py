"""ONNX Runtime fp32 / int8 against PyTorch eager on this CPU, and int8 top-1 agreement on minet7.

    python bench/export.py [--run RUN] [--data ../shared/data/minet7] [--rounds 20] [--out bench/results/export.md]

1. RUN (default: a random-init ResNet-50 F2+F4 FusionNet, 7 classes, 224 px) is exported with the
   library call behind `mineralnet-export RUN --int8 --calib-data DATA --dynamic --max-batch 8
   --outputs logits,probs,embedding` (parity gate included).
2. Extra int8 variants for the comparison: symmetric int8 activations (the TensorRT-compatible
   model) and uint8 with reduce_range; the default model also under ORT's "extended" level.
3. Latency at batch 1 and 8: every variant is timed in the same interleaved rounds (one call of
   each per round, after warm-up), so a load change on the shared machine hits all of them alike;
   median and p90 per variant, ratios against PyTorch eager fp32.
4. Agreement on the photos not used for calibration: top-1 of int8 vs fp32 with the model's own
   head, and with a linear probe (ridge regression on the fp32 fused features of half of those
   photos, scored on the other half) so that a random-init model's near-constant answers do not
   make agreement trivially high. With a trained RUN the model's own head is the number that counts.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MINET7 = HERE.parent.parent / "shared" / "data" / "minet7"


def session(path_or_bytes, level="all"):
    from mineralnet.export.onnx import ort_session

    return ort_session(path_or_bytes, optimization=level)


def interleaved(variants: dict, batch: int, size: int, rounds: int, warmup: int) -> dict:
    """{name: [ms, ...]}: each round calls every variant twice on the same input and times the
    second call; the first lets the previous variant's worker threads (ORT and OpenMP spin after
    a call) go idle, so no variant pays for its predecessor."""
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    xt = torch.from_numpy(x)
    times = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            arg = xt if name.startswith("PyTorch") else x
            fn(arg)
            t0 = time.perf_counter()
            fn(arg)
            dt = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times[name].append(dt)
    return times


def passes(sessions: dict, paths, preprocess, chunk=32) -> dict:
    """{name: {"logits": (N, C), "embedding": (N, D)}} over the photos, in chunks."""
    from mineralnet.export.onnx import run_session

    out = {name: {"logits": [], "embedding": []} for name in sessions}
    for start in range(0, len(paths), chunk):
        x = preprocess.batch(paths[start:start + chunk])
        for name, s in sessions.items():
            r = run_session(s, x)
            out[name]["logits"].append(r["logits"])
            out[name]["embedding"].append(r["embedding"])
    return {n: {k: np.concatenate(v) for k, v in d.items()} for n, d in out.items()}


def ridge(features: np.ndarray, labels: np.ndarray, classes: int, lam: float = 1.0):
    mu, sd = features.mean(0), features.std(0) + 1e-6
    f = np.concatenate([(features - mu) / sd, np.ones((len(features), 1))], 1).astype(np.float64)
    y = np.eye(classes)[labels]
    w = np.linalg.solve(f.T @ f + lam * np.eye(f.shape[1]), f.T @ y)
    return lambda e: np.concatenate([(e - mu) / sd, np.ones((len(e), 1))], 1) @ w


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="trained run directory (default: random-init ResNet-50 F2+F4)")
    ap.add_argument("--data", default=str(MINET7), help="photos in class folders (calibration + agreement)")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--agreement-images", type=int, default=0, help="limit (0 = every photo not calibrated on)")
    ap.add_argument("--out", default=str(HERE / "results" / "export.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mineralnet-bench-export-") as work:
        return measure(args, Path(work))


def measure(args, work: Path) -> int:
    from mineralnet import bench
    from mineralnet.data import scan_dataset
    from mineralnet.export import BatchProfile, ExportOptions, export
    from mineralnet.export.formats import _spread, list_images
    from mineralnet.export.onnx import quantize_int8, quantized_coverage
    from mineralnet.predict import Preprocessor
    from mineralnet.runs import load_model

    t_start = time.time()
    env = bench.environment()
    run = Path(args.run) if args.run else bench.make_random_run(work / "run", "resnet50", (2, 4), 7, 224)
    model, meta = load_model(run)
    size = meta["image_size"]
    opts = ExportOptions(out_dir=work / "export", calib_data=args.data, calib_size=args.calib_size,
                         profile=BatchProfile.range(1, 8, 8), outputs=("logits", "probs", "embedding"),
                         min_agreement=0.0)
    arts = export(run, ["int8"], opts, log=print)
    fp32_path, int8_path = work / "export" / "model.onnx", work / "export" / "model.int8.onnx"
    int8_record = arts[-1].record

    # the same calibration images for the variants
    calib_paths = _spread(list_images(args.data), args.calib_size)
    pre = Preprocessor(meta)
    calib = pre.batch(calib_paths)
    t0 = time.time()
    s8 = quantize_int8(fp32_path, calib, activations="int8", batch=8)
    rr = quantize_int8(fp32_path, calib, activations="uint8", batch=8, reduce_range=True)
    print(f"variants quantized in {time.time() - t0:.0f} s", flush=True)
    import onnx

    cov = {"uint8": quantized_coverage(onnx.load(str(int8_path))), "int8-sym": quantized_coverage(onnx.load_from_string(s8))}

    sessions = {
        "ORT fp32": session(fp32_path),
        "ORT int8 (uint8 act)": session(int8_path),
        "ORT int8 (uint8 act, ORT level extended)": session(int8_path, "extended"),
        "ORT int8 (uint8 act, reduce_range)": session(rr),
        "ORT int8 (int8 sym act, TensorRT-ready)": session(s8),
    }
    torch_model = model.eval()

    def torch_call(x):
        with torch.inference_mode():
            return torch_model(x)

    variants = {"PyTorch eager fp32": torch_call}
    for name, s in sessions.items():
        variants[name] = (lambda s: lambda x: s.run(["logits"], {"images": x}))(s)
    latency = {}
    for batch in (1, 8):
        t0 = time.time()
        times = interleaved(variants, batch, size, args.rounds, args.warmup)
        latency[batch] = {n: bench.percentiles(v) for n, v in times.items()}
        print(f"batch {batch}: timed in {time.time() - t0:.0f} s", flush=True)
        for n, st in latency[batch].items():
            print(f"  {n:45s} p50 {st['p50']:8.2f} ms  p90 {st['p90']:8.2f} ms", flush=True)

    # agreement on the photos not used for calibration
    index = scan_dataset(args.data, verify=True)
    calibrated = set(calib_paths)
    samples = [(p, y) for p, y in index.samples if p not in calibrated]
    if args.agreement_images:
        samples = _spread(samples, args.agreement_images)
    paths, labels = [p for p, _ in samples], np.array([y for _, y in samples])
    t0 = time.time()
    res = passes({"fp32": sessions["ORT fp32"], "uint8": sessions["ORT int8 (uint8 act)"],
                  "int8-sym": sessions["ORT int8 (int8 sym act, TensorRT-ready)"]}, paths, pre)
    print(f"agreement passes over {len(paths)} photos in {time.time() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    fit, held = order[: len(order) // 2], order[len(order) // 2:]
    head = ridge(res["fp32"]["embedding"][fit], labels[fit], len(index.classes))
    agreement = {}
    for q in ("uint8", "int8-sym"):
        own = res["fp32"]["logits"].argmax(1) == res[q]["logits"].argmax(1)
        pf, pq = head(res["fp32"]["embedding"][held]).argmax(1), head(res[q]["embedding"][held]).argmax(1)
        agreement[q] = {"own_head": float(own.mean()), "own_head_n": int(len(own)),
                        "own_head_classes": int(len(set(res["fp32"]["logits"].argmax(1)))),
                        "probe": float((pf == pq).mean()), "probe_n": int(len(held)),
                        "probe_acc_fp32": float((pf == labels[held]).mean()),
                        "probe_acc_int8": float((pq == labels[held]).mean())}
    elapsed = time.time() - t_start

    load_end = bench.environment()["load_average"]
    base = {b: latency[b]["PyTorch eager fp32"]["p50"] for b in latency}
    sizes = {"fp32": fp32_path.stat().st_size, "uint8": int8_path.stat().st_size, "int8-sym": len(s8)}
    trained = "trained run " + str(run) if args.run else "random init (no trained 7-class run was available)"
    lines = [
        "# Export: ONNX Runtime fp32 / int8 vs PyTorch eager (CPU)", "",
        f"Measured {_dt.date.today().isoformat()} on {bench.machine_line(env)}; Python "
        f"{platform.python_version()}. Load average (1/5/15 min) {env['load_average']} at the start and "
        f"{load_end} at the end: the 2 cores were shared with other work, hence the interleaved rounds.", "",
        f"Model: ResNet-50 FusionNet F2+F4 (2560-d), 7 classes, {size} px, {trained}. "
        f"ONNX opset 18 (dynamo exporter), dynamic batch; int8 = static QDQ, per-channel symmetric int8 "
        f"weights, MinMax calibration on {len(calib_paths)} photos of {args.data} through the eval transform. "
        f"All rows timed in the same {args.rounds} interleaved rounds after {args.warmup} warm-up rounds "
        f"(in each round every variant runs once untimed, then once timed); 2 threads for both runtimes, "
        f"ONNX Runtime at graph optimisation level 'all' unless stated.", "",
        "| variant | batch 1 p50 (ms) | p90 | vs eager | batch 8 p50 (ms) | p90 | vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in variants:
        cells = []
        for b in (1, 8):
            st = latency[b][name]
            cells += [f"{st['p50']:.1f}", f"{st['p90']:.1f}", f"{st['p50'] / base[b]:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    a_u8, a_s8 = agreement["uint8"], agreement["int8-sym"]
    lines += [
        "", f"Targets: ORT fp32 <= 0.8x eager: batch 1 "
        f"{latency[1]['ORT fp32']['p50'] / base[1]:.2f}x, batch 8 {latency[8]['ORT fp32']['p50'] / base[8]:.2f}x; "
        f"int8 <= 0.4x: batch 1 {latency[1]['ORT int8 (uint8 act)']['p50'] / base[1]:.2f}x, batch 8 "
        f"{latency[8]['ORT int8 (uint8 act)']['p50'] / base[8]:.2f}x (default uint8-activation model).", "",
        f"Files: fp32 {sizes['fp32'] / 1e6:.1f} MB, int8 (uint8 act) {sizes['uint8'] / 1e6:.1f} MB, "
        f"int8 (int8 sym act) {sizes['int8-sym'] / 1e6:.1f} MB. Quantized Conv/Gemm/MatMul nodes: "
        f"{cov['uint8'][0]}/{cov['uint8'][1]} (uint8 act), {cov['int8-sym'][0]}/{cov['int8-sym'][1]} (int8 sym).", "",
        f"Export parity gate (fp32 ONNX vs PyTorch on {arts[0].record['parity']['images']} photos): "
        f"max |logit diff| {arts[0].record['parity']['max_abs_diff']['logits']:.1e}, top-1 "
        f"{arts[0].record['parity']['top1_equal']}/{arts[0].record['parity']['top1_required']}.", "",
        "int8 top-1 agreement with fp32 (ONNX Runtime) on the photos not used for calibration:", "",
        "| int8 model | own head (n) | predicted classes (fp32) | linear probe (n) | probe acc fp32 | probe acc int8 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, a in (("uint8 act (default)", a_u8), ("int8 sym act (TensorRT)", a_s8)):
        lines.append(f"| {name} | {a['own_head']:.2%} ({a['own_head_n']}) | {a['own_head_classes']} | "
                     f"{a['probe']:.2%} ({a['probe_n']}) | {a['probe_acc_fp32']:.2%} | {a['probe_acc_int8']:.2%} |")
    lines += [
        "", "The linear probe is a ridge-regression head fitted on the fp32 fused features of half of those "
        "photos and scored on the other half (same probe for fp32 and int8): a model that has learned "
        "something from these photos, where the random-init head answers nearly the same class for every "
        "photo." if not args.run else "", "",
        "Command:", "", "```",
        "python bench/export.py " + " ".join(sys.argv[1:]), "```", "",
        f"Wall time {elapsed / 60:.1f} min. Raw numbers: export.json beside this file.", "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "environment": env, "run": str(run),
        "random_init": not args.run, "latency_ms": {str(b): v for b, v in latency.items()},
        "agreement": agreement, "sizes": sizes, "coverage": cov, "int8_record": int8_record,
        "parity": arts[0].record["parity"], "command": "python bench/export.py " + " ".join(sys.argv[1:]),
    }, indent=2, default=str) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
