"""The ONNX files that feed TensorRT, checked on this CPU: agreement with fp32 on minet7, export time.

    python bench/trt_onnx.py RUN [--calib-size 128] [--out bench/results]

RUN is a run trained on ../shared/data/minet7 (its split.json says which photos it trained on).
Calibration uses `--calib-size` of its training photos; agreement and accuracy are measured on its
held-out validation photos, which neither training nor calibration saw. It runs the library call
behind `mineralnet-export RUN --fp16 --int8 --trt --calib-data TRAIN --val-data VAL --dynamic
--max-batch 32` (no TensorRT here: that call writes and checks the ONNX files, then stops at the
engine build), times each file, and then compares fp16 and int8-for-TensorRT against fp32 in ONNX
Runtime on every validation photo. No GPU timing is possible here. Writes OUT/trt_onnx.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _link_split(split: dict, names: list[str], folder: Path) -> Path:
    """Symlink the photos `names` (root-relative) into folder/<class>/ (a labelled photo folder)."""
    root = Path(split["root"])
    for name in names:
        dst = folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(root / name)
    return folder


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def main(argv=None) -> int:
    from mineralnet.errors import MineralNetError
    from mineralnet.export import BatchProfile, ExportOptions, export
    from mineralnet.export import onnx as xonnx
    from mineralnet.infer import Preprocessor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    run = Path(args.run)
    split = json.loads((run / "split.json").read_text())
    meta = json.loads((run / "model.json").read_text())
    stamps: list[tuple[float, str]] = []
    with tempfile.TemporaryDirectory(prefix="mineralnet-trt-onnx-") as tmp:
        work = Path(tmp)
        train = _link_split(split, split["train"], work / "train")
        val = _link_split(split, split["val"], work / "val")
        opts = ExportOptions(out_dir=work / "export", quant_data=train, quant_size=args.calib_size, val_data=val,
                             profile=BatchProfile.range(1, 8, 32))
        t0 = time.perf_counter()
        try:
            export(run, ["fp16", "int8", "trt"], opts, log=lambda line: stamps.append((time.perf_counter(), line)))
            stopped = "engines built (TensorRT present)"
        except MineralNetError as e:
            stopped = str(e).split(";")[0]
            if not stopped.startswith("cannot build TensorRT engines"):
                raise
        ex = work / "export"
        manifest = json.loads((ex / "model.json").read_text())["exports"]
        seconds, last = {}, t0
        for stamp, line in stamps:
            name = line.split()[1].rsplit("/", 1)[-1]
            seconds[name], last = round(stamp - last, 1), stamp
        labels = np.array([split["classes"].index(n.split("/")[0]) for n in split["val"]])
        images = Preprocessor(meta).batch([str(Path(split["root"]) / n) for n in split["val"]])
        level = {"model.int8.onnx": manifest["model.int8.onnx"]["quantization"]["onnxruntime_optimization"]}
        logits = {f: xonnx.run_session(xonnx.ort_session(ex / f, optimization=level.get(f, "all")), images)["logits"]
                  for f in ("model.onnx", "model.fp16.onnx", "model.int8.onnx")}
    ref = logits["model.onnx"]
    rows = []
    for name, got in logits.items():
        rows.append({"file": name, "precision": manifest[name]["precision"], "export_seconds": seconds.get(name),
                     "quantize_seconds": manifest[name].get("int8", {}).get("seconds"),
                     "bytes": manifest[name]["bytes"], "opset": manifest[name]["opset"],
                     "top1_agreement_with_fp32": float((got.argmax(1) == ref.argmax(1)).mean()),
                     "max_abs_logit_diff": float(np.abs(got - ref).max()),
                     "accuracy": float((got.argmax(1) == labels).mean())})
    result = {"run": os.path.basename(os.path.normpath(run)), "val_photos": int(len(labels)),
              "calib_photos": args.calib_size, "stopped": stopped, "cpu": _cpu(), "threads": os.cpu_count(),
              "rows": rows, "int8_record": manifest["model.int8.onnx"]["int8"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trt_onnx.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"{len(labels)} held-out minet7 photos of run `{result['run']}` (validation split, not used for training "
          f"or calibration); int8 calibrated on {args.calib_size} of its training photos. CPU: {result['cpu']}, "
          f"{result['threads']} cores shared with other jobs. No GPU here: no TensorRT timings.", "",
          "| file | precision | export s | size MB | top-1 agreement with fp32 | max abs logit diff | accuracy |",
          "|---|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['file']} | {r['precision']} | {r['export_seconds']} | {r['bytes'] / 1e6:.1f} | "
           f"{r['top1_agreement_with_fp32']:.1%} | {r['max_abs_logit_diff']:.3g} | {r['accuracy']:.1%} |" for r in rows]
    (out / "trt_onnx.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
