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

from pathlib import Path

import numpy as np

from torch.utils.data import DataLoader

from mineralnet.data import DatasetIndex, PhotoDataset, scan_dataset
from mineralnet.data.hints import check_class_root
from mineralnet.errors import MineralNetError
from mineralnet.artifact import load_model
from mineralnet.runs import EVAL_DIR, read_split
from mineralnet.infer.predictor import eval_transform
from mineralnet.infer.loop import evaluate
from mineralnet.train.loop import fresh_accelerator


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
    transform = eval_transform(meta)
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
