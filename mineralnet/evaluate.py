"""`mineralnet eval RUN --data DIR`: evaluate a trained run on a labelled folder of photos.

`mineralnet eval RUN --split val` evaluates the photos the run held out for validation (its split.json:
a `--folds K --fold I` fold, a `--val-split` fraction or the default 10%), with the same preprocessing, so
it reproduces the validation numbers of training from the files.

Writes RUN/eval/ for --split val, RUN/eval-<data folder name>/ for --data (the training-time evaluation in
RUN/eval/ stays), or --out; warns when the photos include the run's training photos. The files: metrics.json (Top1, mean class accuracy = the paper's "mAP", Top3,
per-class accuracy/precision/recall/F1, confusion matrix in counts and row-normalised %),
per_class.csv and confusion.png, and prints the per-class table. Training calls
`write_eval_report` at its end to produce the same files for its validation set.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from torch.utils.data import DataLoader

from mineralnet.calibration.fit import eval_calibration, format_calibration
from mineralnet.data import DatasetIndex, PhotoDataset, build_transforms, scan_dataset
from mineralnet.data.hints import check_class_root
from mineralnet.errors import MineralNetError
from mineralnet.metrics import format_table
from mineralnet.report import write_eval_report
from mineralnet.artifact import load_model
from mineralnet.runs import EVAL_CLASSES_FILE, EVAL_CONFUSION_FILE, EVAL_DIR, EVAL_METRICS_FILE, read_split
from mineralnet.threads import apply_threads, parse_threads
from mineralnet.infer.loop import evaluate
from mineralnet.train.loop import fresh_accelerator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory made by training (holds model.safetensors + model.json), or an "
                                    "ensemble folder from `mineralnet ensemble`")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", help="labelled folder: one sub-folder per mineral, named as in the run's classes")
    src.add_argument("--split", choices=("val", "train"),
                     help="the run's own held-out photos (val) or training photos (train), as listed in its "
                          "split.json: re-scores a fold of a cross-validation run from the files")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: RUN/eval for --split val, RUN/eval-<data folder name> for --data "
                             "so the training-time evaluation in RUN/eval stays)")
    parser.add_argument("--threads", default="auto",
                        help="intra-op CPU threads per process (default auto: OMP_NUM_THREADS when you set it, else "
                             "cores / processes under `accelerate launch`, else torch's default)")
    parser.add_argument("--tta", default=None,
                        help="test-time augmentation: flip, scales or flip,scales (probabilities averaged over "
                             "views; scored through the Predictor with the time per photo); 'none' scores one view "
                             "the same way, for a like-for-like time")
    parser.add_argument("--coverage", type=float, default=0.9,
                        help="conformal candidate-set coverage to check on a calibrated run (default 0.9)")


def split_samples(run, which: str = "val"):
    """The photos a run trained (`which="train"`) or validated on, from its split file, as a DatasetIndex."""
    split = read_split(run)
    samples = split["splits"][which]
    missing = [p for p, _ in samples if not Path(p).is_file()]
    if missing:
        raise MineralNetError(f"{len(missing)} of the {len(samples)} {which} photos listed in the split of "
                              f"{str(run)!r} are missing, e.g. {missing[0]!r}; were the photos moved? Evaluate "
                              f"with --data DIR instead")
    return DatasetIndex(root=split["root"], classes=list(split["classes"]), samples=list(samples))


def predict_folder(run, data, batch_size: int = 32, workers: int = 2, split: str | None = None,
                   with_logits: bool = False):
    """Load `run`, scan `data` with the run's class names (or take its own `split` photos: "val" or
    "train") and predict every image under an Accelerator.

    Returns:
        (targets (N,), preds (N,), probs (N, C), meta, index, accelerator) on every process, and the
        logits (N, C) last with `with_logits`.
    """
    if batch_size < 1:
        raise MineralNetError(f"--batch-size {batch_size} must be at least 1")
    if workers < 0:
        raise MineralNetError(f"--workers {workers} must be 0 or more")
    model, meta = load_model(run)
    if split:
        index = split_samples(run, split)
        if index.classes != list(meta["classes"]):
            raise MineralNetError(f"the split of {str(run)!r} lists classes {index.classes} but its model has "
                                  f"{meta['classes']}; the run is inconsistent, evaluate with --data DIR")
    else:
        check_class_root(data, list(meta["classes"]))
        index = scan_dataset(data, verify=True, classes=list(meta["classes"]))
    if not index.samples:
        raise MineralNetError(f"no readable images under {str(data)!r}; put photos in one sub-folder per "
                              f"mineral named as the run's classes ({', '.join(meta['classes'])})")
    transform = build_transforms(meta["image_size"], meta["mean"], meta["std"], train=False,
                                 resize=meta.get("resize"))
    loader = DataLoader(PhotoDataset(index.samples, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers)
    accelerator = fresh_accelerator()
    model, loader = accelerator.prepare(model, loader)
    out = evaluate(model, loader, accelerator)
    result = (np.asarray(out["targets"]), np.asarray(out["preds"]), np.asarray(out["probs"]), meta, index, accelerator)
    return (*result, np.asarray(out["logits"])) if with_logits else result


def training_overlap(run, paths) -> tuple[int, int]:
    """(photos among `paths` that the run trained on, len(paths)); (0, n) when the run has no split file."""
    try:
        train = {str(Path(p).resolve()) for p, _ in read_split(run)["splits"]["train"]}
    except MineralNetError:
        return 0, len(paths)
    return sum(str(Path(p).resolve()) in train for p in paths), len(paths)


def warn_training_overlap(run, paths, what: str = "scores") -> int:
    """Print a console warning when photos in `paths` were training photos of `run`; returns the count."""
    n, total = training_overlap(run, paths)
    if n:
        print(f"warning: {n} of the {total} photos ({n / total:.0%}) are training photos of this run; these "
              f"{what} overstate accuracy on new photos (use --split val for the held-out ones)")
    return n


def default_out_dir(run, data=None, split: str | None = None) -> Path:
    """RUN/eval for the run's own held-out photos (what training wrote), RUN/eval-train for its training
    photos, RUN/eval-<folder or CSV name> for other data: training's evaluation is never replaced silently."""
    if split:
        return Path(run) / (EVAL_DIR if split == "val" else f"{EVAL_DIR}-{split}")
    p = Path(str(data).rstrip("/") or "/").resolve()
    raw = p.name if p.is_dir() else p.stem
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in raw) or "data"
    return Path(run) / f"{EVAL_DIR}-{name}"


def run(args) -> int:
    from mineralnet.infer.ensemble import is_ensemble  # ensembles and TTA go through the Predictor

    if getattr(args, "tta", None) or is_ensemble(args.run):
        return run_with_predictor(args)
    split = getattr(args, "split", None)
    if not split and not args.data:
        raise MineralNetError("say what to evaluate: --data DIR (labelled photos, one sub-folder per mineral) "
                              "or --split val (the run's own held-out photos)")
    apply_threads(parse_threads(args.threads))
    targets, preds, probs, meta, index, accelerator, logits = predict_folder(
        args.run, args.data, args.batch_size, args.workers, split=split, with_logits=True)
    out_dir = Path(args.out) if args.out else default_out_dir(args.run, args.data, split)
    if accelerator.is_main_process:
        if split != "train":
            warn_training_overlap(args.run, [p for p, _ in index.samples])
        if (out_dir / EVAL_METRICS_FILE).is_file():
            print(f"replacing the previous evaluation in {out_dir}")
        source = {"split": split} if split else {"data": str(args.data)}
        calibration = eval_calibration(args.run, targets, logits, meta["classes"], out_dir, args.coverage)
        metrics = write_eval_report(out_dir, targets, preds, probs, meta["classes"],
                                    extra={"run": str(args.run), **source, "skipped_unreadable": len(index.bad),
                                           "calibration": calibration})
        if index.bad:
            print(f"skipped {len(index.bad)} unreadable image(s), e.g. {index.bad[0]}")
        print(format_table(metrics))
        print(format_calibration(calibration))
        print(f"wrote {out_dir / EVAL_METRICS_FILE}, {out_dir / EVAL_CLASSES_FILE}, {out_dir / EVAL_CONFUSION_FILE}, "
              f"{out_dir / 'reliability.png'}")
    accelerator.end_training()
    return 0


# ----------------------------------------------------------------------------- ensembles, TTA
def run_with_predictor(args) -> int:
    """`mineralnet eval` of an ensemble folder, or with --tta: through the Predictor (photos, not one
    preprocessed tensor), with the time per photo; files as `run` writes them, plus summary.md."""
    from mineralnet.infer.ensemble import common_val
    from mineralnet.ensemble.evaluate import score, write_report
    from mineralnet.infer import Predictor

    split = getattr(args, "split", None)
    if not split and not args.data:
        raise MineralNetError("say what to evaluate: --data DIR (labelled photos, one sub-folder per mineral) "
                              "or --split val (the held-out photos)")
    apply_threads(parse_threads(args.threads))
    predictor = Predictor(args.run, tta=getattr(args, "tta", None))
    ensemble = predictor.kind == "ensemble"
    if split and ensemble:
        if split != "val":
            raise MineralNetError("--split train: an ensemble's members trained on different photos; use --split val "
                                  "(the photos every member held out) or --data DIR")
        samples = common_val([m["resolved"] for m in predictor.ensemble.spec["members"]])
    elif split:
        index = split_samples(args.run, split)
        if index.classes != predictor.classes:
            raise MineralNetError(f"the split of {str(args.run)!r} lists classes {index.classes} but its model has "
                                  f"{predictor.classes}; the run is inconsistent, evaluate with --data DIR")
        samples = list(index.samples)
    else:
        check_class_root(args.data, predictor.classes)
        index = scan_dataset(args.data, verify=True, classes=predictor.classes)
        samples = list(index.samples)
        if index.bad:
            print(f"skipped {len(index.bad)} unreadable image(s), e.g. {index.bad[0]}")
    if not samples:
        raise MineralNetError(f"no readable labelled photos to evaluate in {args.data or split!r}")
    if not ensemble and split != "train":
        warn_training_overlap(args.run, [p for p, _ in samples])
    out_dir = Path(args.out) if args.out else default_out_dir(args.run, args.data, split)
    if not args.out and getattr(args, "tta", None):  # never replace training's RUN/eval with a TTA score
        out_dir = out_dir.with_name(f"{out_dir.name}-tta-{args.tta.strip().lower().replace(',', '-')}")
    if (out_dir / EVAL_METRICS_FILE).is_file():
        print(f"replacing the previous evaluation in {out_dir}")
    result = score(predictor, samples, args.batch_size)
    source = {"split": split} if split else {"data": str(args.data)}
    report = write_report(out_dir, predictor, samples, result, {"run": str(args.run), **source})
    print(format_table(report["metrics"]))
    views = len(predictor.tta) if predictor.tta else 1
    print(f"{result['ms_per_photo']:.1f} ms/photo ({views} view{'s' if views > 1 else ''}"
          f"{f', {len(predictor.ensemble.members)} members' if ensemble else ''}, batch {args.batch_size}, "
          f"decoding included)")
    if ensemble:
        print(report["table"])
    print(f"wrote {out_dir / EVAL_METRICS_FILE}, {out_dir / EVAL_CLASSES_FILE}, {out_dir / EVAL_CONFUSION_FILE}, "
          f"{out_dir / 'summary.md'}")
    return 0
