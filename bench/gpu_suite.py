#!/usr/bin/env python3
"""GPU suite: the paper's model (ResNet-50 F2+F4, 224 px) training step and inference on one GPU -> OUT/.

    python3 bench/gpu_suite.py --out DIR [--budget-s 480] [--no-compile]

Runs from a bare checkout (no install: the repository root goes first on sys.path) with a plain `python3`
that has torch, timm and accelerate; it calls library functions, never console scripts. After every row it
rewrites OUT/gpu_suite.json and OUT/gpu_suite.md, so a crash or a kill keeps what was measured. Each
variant runs in its own try block: an error (CUDA out of memory, an AMP quirk, a missing package) becomes
that row's `error`, and the suite goes on.

Training rows (img/s, and TFLOP/s as a fraction of the GPU's dense peak for that precision):
- step rows feed synthetic batches already in GPU memory, as NVIDIA's reference ResNet-50 numbers do
  (their DALI pipeline decodes on the GPU): `reference` = fp16 + GradScaler, channels_last, batch 256,
  cudnn.benchmark (NVIDIA's AMP setup); bf16 as an extra; with and without torch.compile; `mineralnet` rows
  run the same through our `train_one_epoch` under Accelerate (its overhead against the bare step);
- pipeline rows run `mineralnet.train.setup` + `train_one_epoch` on synthetic JPEGs: `workers` = today's
  per-photo CPU pipeline (decode + augment in DataLoader workers, pinned, non_blocking copies); `device` =
  the device-side augmentation (`augment_on="device"`; an error row where this checkout lacks it).
Inference rows: eager PyTorch, channels_last, batch 1/32/256, fp16/bf16 (and TF32 fp32 at 256); TensorRT
engine rows only when TensorRT is installed (then int8 too). Training and inference rows are separate
tables; the only ratio is each training row against the reference row.

Without a GPU the same code runs on the CPU (fp16 and compile rows are skipped with the reason); with
small settings that is what tests/test_gpu_suite.py runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a bare checkout: the library is the folder beside this one
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Dense (no sparsity) tensor-core peaks, TFLOP/s, from NVIDIA's data sheets (SXM parts).
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0},
               "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0},
               "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0}}
COMPILE_NEEDS_S = 150  # a compile row is started only with this much of the budget left
SKIPPABLE = ("fp16 needs a CUDA GPU", "torch.compile rows run on CUDA only (pass --compile to force)")


def peak_tflops(gpu_name: str | None, precision: str) -> float | None:
    key = {"fp32": "tf32"}.get(precision, precision)
    for fragment, peaks in PEAK_TFLOPS.items():
        if gpu_name and fragment in gpu_name.upper():
            return peaks.get(key)
    return None


class Suite:
    """The rows so far, written out after each one."""

    def __init__(self, out: Path, args):
        self.out, self.args, self.rows, self.t0 = out, args, [], time.perf_counter()
        self.env = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def add(self, row: dict) -> dict:
        gpu = (self.env.get("gpu") or {}).get("name")
        if row.get("status") == "ok" and row.get("gflop_per_image"):
            row["tflops"] = row["img_s"] * row["gflop_per_image"] / 1e3
            peak = peak_tflops(gpu, row["precision"])
            row["pct_peak"] = 100 * row["tflops"] / peak if peak else None
        self.rows.append(row)
        print(f"  {row['kind']:<5} {row['name']:<40} {row['precision']:<5} b{row['batch']:<4} "
              f"{row.get('status')}: " + (f"{row['img_s']:.1f} img/s" if row.get("status") == "ok"
                                           else row.get("reason", "")), flush=True)
        self.save()
        return row

    def run(self, kind: str, name: str, precision: str, batch: int, fn, **extra) -> dict:
        """One variant: fn() -> {img_s, ...}; any exception becomes this row's error."""
        row = dict(kind=kind, name=name, precision=precision, batch=batch, image_size=self.args.image_size, **extra)
        if self.left() < 0:
            return self.add(dict(row, status="skipped", reason="the suite's time budget is spent"))
        try:
            row.update(fn(), status="ok")
        except SkipRow as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 -- per variant on purpose: one failure must not end the suite
            row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            (self.out / "errors.log").open("a").write(f"--- {kind} {name} {precision} b{batch}\n"
                                                       f"{traceback.format_exc()}\n")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return self.add(row)

    def save(self) -> None:
        data = {"environment": self.env, "seconds": round(time.perf_counter() - self.t0, 1), "rows": self.rows}
        tmp = self.out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.out / "gpu_suite.json")
        (self.out / "gpu_suite.md").write_text(markdown(data))


class SkipRow(Exception):
    """This variant does not apply here; the message says why."""


# ============================================================================ timing
def timed(step, batch: int, warmup_s: float, duration_s: float, device: str, min_steps: int = 3) -> dict:
    """Call step() for warmup_s, then for duration_s (at least min_steps), synchronised -> img/s."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_end = time.perf_counter() + warmup_s
    step()
    while time.perf_counter() < t_end:
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < duration_s:
        step()
        n += 1
        if device == "cuda" and n % 4 == 0:
            sync()  # keep the CPU from running far ahead of the timed work
    sync()
    seconds = time.perf_counter() - t0
    return {"img_s": batch * n / seconds, "ms_per_batch": 1e3 * seconds / n, "steps": n}


def autocast(device: str, precision: str):
    import contextlib

    if precision in ("fp32", "tf32"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def check_precision(device: str, precision: str) -> None:
    if precision == "fp16" and device != "cuda":
        raise SkipRow(SKIPPABLE[0])
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise SkipRow("this GPU has no bf16")


def new_model(args, device: str):
    from mineralnet.model import FusionNet

    torch.manual_seed(0)
    model = FusionNet(args.backbone, (2, 4), args.classes, pretrained=False)
    return model.to(device).to(memory_format=torch.channels_last)  # the module on the device, as mineralnet.infer's TorchBackend does


def resident_batches(args, batch: int, device: str, n: int = 2):
    """Synthetic batches in device memory (channels_last), rotated so no single buffer stays in cache."""
    g = torch.Generator().manual_seed(batch)
    xs = [torch.randn(batch, 3, args.image_size, args.image_size, generator=g).to(device)
          .contiguous(memory_format=torch.channels_last) for _ in range(n)]
    ys = [torch.randint(0, args.classes, (batch,), generator=g).to(device) for _ in range(n)]
    return list(zip(xs, ys))


# ============================================================================ training rows
def bare_step_row(args, device: str, precision: str, batch: int, compile_: bool):
    """NVIDIA-style step: autocast, GradScaler for fp16, SGD, weighted top-k loss, data resident on the GPU."""
    def fn():
        check_precision(device, precision)
        if compile_ and not args.compile:
            raise SkipRow(SKIPPABLE[1])
        from mineralnet.losses import build_loss

        model = new_model(args, device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
        loss_fn = build_loss("wtopk", k=0.5, alpha=0.2)
        net = torch.compile(model) if compile_ else model
        data, i = resident_batches(args, batch, device), [0]

        def step():
            x, y = data[i[0] % len(data)]
            i[0] += 1
            with autocast(device, precision):
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        t0 = time.perf_counter()
        step()  # the first step (compilation, cuDNN autotuning) is timed on its own
        first = time.perf_counter() - t0
        return dict(timed(step, batch, args.warmup_s, args.duration_s, device), first_step_s=round(first, 2))
    return fn


def ours_step_row(args, device: str, precision: str, batch: int):
    """The same step through mineralnet's train_one_epoch under Accelerate (GPU-resident batches)."""
    def fn():
        check_precision(device, precision)
        from mineralnet.config import load_config
        from mineralnet.losses import build_loss
        from mineralnet.train import LRControl, Progress, TrainParts, build_optimizer, make_accelerator
        from mineralnet.train import train_one_epoch

        cfg = load_config("base", backbone=args.backbone, image_size=args.image_size, batch_size=batch,
                          precision=precision, channels_last=True, loss="wtopk", log_every=50, epochs=1,
                          scheduler="none", lr=0.01)
        accelerator = make_accelerator(cfg)
        model = new_model(args, "cpu")
        opt = build_optimizer(cfg, model)
        model, opt = accelerator.prepare(model, opt)
        loader = resident_batches(args, batch, str(accelerator.device)) * 4
        parts = TrainParts(cfg, run=None, split=None, model=model, loss_fn=build_loss("wtopk"), optimizer=opt,
                           train_loader=loader, val_loader=None, lr_control=LRControl(cfg, opt, len(loader)),
                           progress=Progress(), ema=None, mix=None)

        def epoch():
            parts.progress.step_in_epoch = 0
            train_one_epoch(parts, accelerator)
        out = timed(epoch, batch * len(loader), args.warmup_s, args.duration_s, device, min_steps=1)
        accelerator.end_training()
        return dict(out, ms_per_batch=out["ms_per_batch"] / len(loader))
    return fn


def write_photos(folder: Path, n: int, side: int, classes: int) -> Path:
    """n synthetic JPEGs (smooth colour fields: decode cost like a photo's), one folder per class."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)
        img = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(d / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def pipeline_row(args, device: str, precision: str, batch: int, work: Path, augment_on: str):
    """setup() + train_one_epoch on JPEG files: the loader and augmentation as training runs them."""
    def fn():
        check_precision(device, precision)
        photos = work / "photos"
        if not (work / "photos.done").exists():  # written once, inside the row: OpenCV may be missing
            write_photos(photos, args.photos, args.photo_side, args.classes)
            (work / "photos.done").touch()
        from mineralnet.config import load_config
        from mineralnet.train import make_accelerator, setup, train_one_epoch
        from mineralnet.train.fit import open_run

        extra = {} if augment_on == "workers" else {"augment_on": augment_on}  # unknown field -> error row
        cfg = load_config("base", data=str(photos), out=str(work / f"run-{augment_on}-{precision}"),
                          backbone=args.backbone, image_size=args.image_size, batch_size=batch,
                          precision=precision, channels_last=True, workers=args.workers, normalize="imagenet",
                          cache_images=augment_on == "device", epochs=1, log_every=50, val_split=0.1, **extra)
        accelerator = make_accelerator(cfg)
        try:
            run = open_run(cfg, accelerator)
            parts = setup(cfg, accelerator, run)
            parts.run.release()
            images = batch * len(parts.train_loader)

            def epoch():
                parts.progress.step_in_epoch = 0
                train_one_epoch(parts, accelerator)
            out = timed(epoch, images, 0.0, args.duration_s, device, min_steps=1)
        finally:
            accelerator.end_training()
        return dict(out, ms_per_batch=out["ms_per_batch"] * batch / images, workers=args.workers)
    return fn


def training_stage(suite: Suite, args, device: str, work: Path, gflop: float | None) -> None:
    b = args.batch
    common = dict(gflop_per_image=gflop, data="resident", channels_last=True)
    suite.run("train", "reference: bare step, GradScaler", "fp16", b, bare_step_row(args, device, "fp16", b, False),
              **common)
    suite.run("train", "bare step", "bf16", b, bare_step_row(args, device, "bf16", b, False), **common)
    suite.run("train", "mineralnet train_one_epoch", "fp16", b, ours_step_row(args, device, "fp16", b), **common)
    suite.run("train", "mineralnet train_one_epoch", "bf16", b, ours_step_row(args, device, "bf16", b), **common)
    precision = "fp16" if device == "cuda" else "bf16"
    for augment_on in ("workers", "device"):
        suite.run("train", f"pipeline: augmentation on {augment_on}", precision, b,
                  pipeline_row(args, device, precision, b, work, augment_on),
                  **dict(common, data=f"JPEG files, augment on {augment_on}"))


def compile_stage(suite: Suite, args, device: str, gflop: float | None) -> None:
    """Last: compiling ResNet-50's forward and backward takes a minute or two per precision."""
    common = dict(gflop_per_image=gflop, data="resident", channels_last=True)
    for prec in ("fp16", "bf16"):
        if args.compile and suite.left() < COMPILE_NEEDS_S:
            suite.add(dict(kind="train", name="bare step, torch.compile", precision=prec, batch=args.batch,
                           image_size=args.image_size, status="skipped",
                           reason=f"less than {COMPILE_NEEDS_S} s of the time budget left"))
            continue
        suite.run("train", "bare step, torch.compile", prec, args.batch,
                  bare_step_row(args, device, prec, args.batch, True), **common)


# ============================================================================ inference rows
def infer_row(args, device: str, precision: str, batch: int):
    def fn():
        check_precision(device, precision)
        model = new_model(args, device).eval()
        data, i = resident_batches(args, batch, device), [0]

        def step():
            x, _ = data[i[0] % len(data)]
            i[0] += 1
            with torch.inference_mode(), autocast(device, precision):
                model(x)
        return timed(step, batch, args.warmup_s / 2, args.duration_s / 2, device)
    return fn


def tensorrt_rows(suite: Suite, args, device: str, work: Path, gflop: float | None) -> None:
    """TensorRT engines (fp16, int8) of a random-weight run, only where TensorRT can run them."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        suite.add(dict(kind="infer", name="TensorRT engines", precision="fp16/int8", batch=0,
                       image_size=args.image_size, status="skipped",
                       reason="tensorrt is not installed: no engines built (and no int8 export)"))
        return

    def fn(precision):
        def build():
            from mineralnet.bench import make_random_run, run_inference
            from mineralnet.cli import run_command  # `mineralnet export`, in this process: no console script

            run = work / "trt-run"
            if not run.exists():
                make_random_run(run, backbone=args.backbone, image_size=args.image_size, num_classes=args.classes)
                calib = write_photos(work / "calib", 64, args.photo_side, args.classes)
                code = run_command("export", [str(run), "--fp16", "--int8", "--trt", "--calib-data", str(calib),
                                    "--calib-size", "64", "--dynamic", "--opt-batch", "32", "--max-batch", "256"])
                if code:
                    raise RuntimeError(f"export exited {code}")
            engine = next(iter(sorted((run / "export").glob(f"*{precision}*.engine"))), None)
            if engine is None:
                raise RuntimeError(f"no {precision} engine in {run / 'export'}")
            rows = run_inference([str(engine)], runtimes=["tensorrt"], batch_sizes=[args.batch],
                                 warmup_s=1.0, duration_s=args.duration_s / 2)
            ok = [r for r in rows if r.get("throughput_img_s")]
            if not ok:
                raise RuntimeError(str(rows[0].get("reason") if rows else "no rows"))
            return {"img_s": ok[0]["throughput_img_s"], "ms_per_batch": 1e3 * args.batch / ok[0]["throughput_img_s"]}
        return build
    for precision in ("fp16", "int8"):
        suite.run("infer", "TensorRT engine", precision, args.batch, fn(precision), gflop_per_image=gflop)


def inference_stage(suite: Suite, args, device: str, work: Path, gflop: float | None) -> None:
    for precision in ("fp16", "bf16"):
        for batch in (1, 32, args.batch):
            suite.run("infer", "eager, channels_last", precision, batch, infer_row(args, device, precision, batch),
                      gflop_per_image=gflop, channels_last=True)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows on tensor cores (TF32), as NVIDIA's peak assumes
    torch.backends.cudnn.allow_tf32 = True
    suite.run("infer", "eager, channels_last, TF32", "fp32", args.batch, infer_row(args, device, "fp32", args.batch),
              gflop_per_image=gflop, channels_last=True)
    tensorrt_rows(suite, args, device, work, gflop)


# ============================================================================ report
def markdown(data: dict) -> str:
    env, rows = data["environment"], data["rows"]
    gpu = (env.get("gpu") or {}).get("name") or "no GPU (CPU)"
    md = [f"## GPU suite: {env.get('backbone')} FusionNet (F2+F4) training and inference on {gpu}", "",
          f"`python3 bench/gpu_suite.py {' '.join(env.get('argv', []))}`, started {env.get('started')}, "
          f"{data['seconds']:.0f} s. torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; "
          f"cudnn.benchmark on; image {rows[0]['image_size'] if rows else '?'} px; backbone "
          f"{env.get('backbone')}.", ""]
    ref = next((r for r in rows if r["kind"] == "train" and r["name"].startswith("reference")
                and r.get("status") == "ok"), None)
    for kind, title in (("train", "Training (img/s; vs = against the reference row)"), ("infer", "Inference")):
        md += [f"### {title}", "", "| variant | data | precision | batch | img/s | ms/batch | TFLOP/s | % of peak |"
               + (" vs reference |" if kind == "train" else ""),
               "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if kind == "train" else "")]
        for r in (r for r in rows if r["kind"] == kind):
            if r.get("status") != "ok":
                cells = f"{r.get('status')}: {r.get('reason', '')} | | | |"
                md.append(f"| {r['name']} | {r.get('data', '')} | {r['precision']} | {r['batch']} | {cells}"
                          + (" |" if kind == "train" else ""))
                continue
            pct = f"{r['pct_peak']:.1f}" if r.get("pct_peak") is not None else "-"
            tf = f"{r['tflops']:.3g}" if r.get("tflops") is not None else "-"
            line = (f"| {r['name']} | {r.get('data', '')} | {r['precision']} | {r['batch']} | {r['img_s']:.1f} | "
                    f"{r['ms_per_batch']:.2f} | {tf} | {pct} |")
            if kind == "train":
                line += f" {r['img_s'] / ref['img_s']:.2f}x |" if ref else " - |"
            md.append(line)
        md.append("")
    md.append("Peaks (dense tensor-core TFLOP/s): " + "; ".join(
        f"{k} bf16/fp16 {v['bf16']:.0f}, TF32 {v['tf32']:.0f}" for k, v in PEAK_TFLOPS.items())
              + ". FLOPs per image from torch.utils.flop_counter (training: forward + backward).")
    return "\n".join(md) + "\n"


def describe(args, device: str) -> dict:
    import mineralnet
    from mineralnet.bench.environment import gpu_info

    return {"device": device, "gpu": gpu_info(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "mineralnet_from": str(Path(mineralnet.__file__).parent),
            "backbone": args.backbone, "cpu_count": os.cpu_count()}


def flops_per_image(args, train: bool) -> float | None:
    try:
        from mineralnet.bench.environment import _arch_flops

        meta = {"backbone": args.backbone, "stages": [2, 4], "num_classes": args.classes}
        return _arch_flops(meta, args.image_size, train=train) / 1e9
    except Exception:  # noqa: BLE001 -- FLOPs only fill a column
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_suite.json, gpu_suite.md and errors.log")
    p.add_argument("--budget-s", type=float, default=420,
                   help="start no row after this many seconds (the whole suite then ends within ~8 minutes)")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256, help="training batch, and the largest inference batch")
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--photos", type=int, default=2048, help="synthetic JPEGs for the pipeline rows")
    p.add_argument("--photo-side", type=int, default=320)
    p.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)))
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile rows (default: on a GPU only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile is None:
        args.compile = device == "cuda"
    torch.backends.cudnn.benchmark = True
    suite = Suite(Path(args.out), args)
    suite.env.update(describe(args, device))
    suite.save()
    print(f"GPU suite on {device} ({(suite.env['gpu'] or {}).get('name', 'no GPU')}); results in {args.out}")
    with tempfile.TemporaryDirectory(prefix="mineralnet-gpu-suite-") as tmp:
        train_gflop = flops_per_image(args, train=True)
        training_stage(suite, args, device, Path(tmp), train_gflop)
        inference_stage(suite, args, device, Path(tmp), flops_per_image(args, train=False))
        compile_stage(suite, args, device, train_gflop)
    suite.save()
    print(f"wrote {suite.out / 'gpu_suite.md'} and gpu_suite.json in {time.perf_counter() - suite.t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
