"""`mineralnet eval RUN --data DIR`: evaluate a trained run on a labelled folder of photos.

Writes RUN/eval/ (or --out): metrics.json (Top1, mean class accuracy = the paper's "mAP", Top3,
per-class accuracy/precision/recall/F1, confusion matrix in counts and row-normalised %),
per_class.csv and confusion.png, and prints the per-class table. Training calls
`write_eval_report` at its end to produce the same files for its validation set.
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.metrics import compute_metrics, format_table

EVAL_DIR = "eval"
CSV_FIELDS = ("class", "support", "correct", "predicted", "accuracy", "precision", "recall", "f1")


def write_eval_report(out_dir, targets, preds, probs, classes, extra: dict | None = None) -> dict:
    """Write metrics.json, per_class.csv and confusion.png into `out_dir` (created if needed).

    Args:
        out_dir: the folder the three files go into (training passes RUN/eval).
        targets, preds: (N,) true and predicted class indices.
        probs: (N, C) softmax probabilities, or None (then no Top3).
        classes: class names in index order.
        extra: more keys for metrics.json (e.g. data folder, run).
    Returns:
        the metrics dict written to metrics.json.
    """
    from mineralnet.plots import plot_confusion
    from mineralnet.runs import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = np.asarray(targets).reshape(-1)
    preds = np.asarray(preds).reshape(-1)
    if len(targets) != len(preds):
        raise ValueError(f"{len(targets)} targets but {len(preds)} predictions")
    metrics = compute_metrics(targets, preds, probs, classes=list(classes))
    if extra:
        metrics.update(extra)
    atomic_write_json(out_dir / "metrics.json", metrics)

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in metrics["per_class"]:
        writer.writerow({k: ("" if row[k] is None else (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k]))
                         for k in CSV_FIELDS})
    atomic_write_text(out_dir / "per_class.csv", buf.getvalue())
    plot_confusion(np.asarray(metrics["confusion"]), list(classes), out_dir / "confusion.png")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory made by training (holds model.safetensors + model.json)")
    parser.add_argument("--data", required=True,
                        help="labelled folder: one sub-folder per mineral, named as in the run's classes")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    parser.add_argument("--out", default=None, help="output folder (default RUN/eval)")


def predict_folder(run, data, batch_size: int = 32, workers: int = 2):
    """Load `run`, scan `data` with the run's class names and predict every image under an Accelerator.

    Returns:
        (targets (N,), preds (N,), probs (N, C), meta, index) on every process.
    """
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from mineralnet.data import ImageDataset, build_transforms, scan_dataset
    from mineralnet.runs import load_model
    from mineralnet.train import evaluate

    if batch_size < 1:
        raise MineralNetError(f"--batch-size {batch_size} must be at least 1")
    if workers < 0:
        raise MineralNetError(f"--workers {workers} must be 0 or more")
    model, meta = load_model(run)
    index = scan_dataset(data, verify=True, classes=list(meta["classes"]))
    if not index.samples:
        raise MineralNetError(f"no readable images under {str(data)!r}; put photos in one sub-folder per "
                              f"mineral named as the run's classes ({', '.join(meta['classes'])})")
    transform = build_transforms(meta["image_size"], meta["mean"], meta["std"], train=False,
                                 resize=meta.get("resize"))
    loader = DataLoader(ImageDataset(index.samples, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers)
    from accelerate.state import AcceleratorState, GradientState

    # A fresh Accelerator even when a training ran earlier in this process (cv, notebooks, tests).
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, loader = accelerator.prepare(model, loader)
    out = evaluate(model, loader, accelerator)
    return np.asarray(out["targets"]), np.asarray(out["preds"]), np.asarray(out["probs"]), meta, index, accelerator


def run(args) -> int:
    targets, preds, probs, meta, index, accelerator = predict_folder(args.run, args.data, args.batch_size,
                                                                     args.workers)
    out_dir = Path(args.out) if args.out else Path(args.run) / EVAL_DIR
    if accelerator.is_main_process:
        metrics = write_eval_report(out_dir, targets, preds, probs, meta["classes"],
                                    extra={"run": str(args.run), "data": str(args.data),
                                           "skipped_unreadable": len(index.bad)})
        if index.bad:
            print(f"skipped {len(index.bad)} unreadable image(s), e.g. {index.bad[0]}")
        print(format_table(metrics))
        print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'per_class.csv'}, {out_dir / 'confusion.png'}")
    accelerator.end_training()
    return 0
