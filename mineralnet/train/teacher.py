"""Distillation's teacher (`train --teacher RUN_OR_ENSEMBLE`): its soft labels of the training photos, computed
once before training and cached in the run folder, and the training dataset that yields each photo's index so a
batch can look up its rows.

The table holds log-probabilities (N_train, C), row i for training photo i of the split: for a single run
log_softmax(logits) (so softmax(row / T) = softmax(logits / T) exactly), for an ensemble the log of its averaged
calibrated probabilities. Under DDP the main process computes it and the others wait and read the file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mineralnet.errors import MineralNetError
from mineralnet.files import atomic_write_bytes
from mineralnet.infer.predictor import Predictor
from mineralnet.runs import RunDir

BATCH = 32


class IndexedDataset(Dataset):
    """The training dataset's items with the sample's index appended: (x, y, i). Everything else (set_epoch,
    cached, samples, ...) is the wrapped dataset's."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _photos_digest(paths) -> str:
    return hashlib.sha256("\n".join(map(str, paths)).encode("utf-8", "surrogateescape")).hexdigest()


def _teacher_rows(predictor: Predictor, paths) -> np.ndarray:
    """(len(paths), C) log-probabilities: log_softmax of a single run's logits, else log of the probabilities."""
    rows = []
    for i in range(0, len(paths), BATCH):
        chunk = paths[i:i + BATCH]
        out = predictor.outputs(chunk) if predictor.ensemble is None and not predictor.tta else {}
        if "logits" in out:
            rows.append(torch.log_softmax(torch.as_tensor(np.asarray(out["logits"], np.float32)), 1).numpy())
        else:
            rows.append(np.log(np.clip(predictor.probabilities(chunk), 1e-12, None)).astype(np.float32))
    return np.concatenate(rows)


def compute_teacher_table(teacher, classes, paths, device: str | None = None) -> tuple[np.ndarray, dict]:
    """(log-probabilities (N, C), metadata) of `teacher` on the photos; refuses another class list."""
    predictor = Predictor(teacher, device=device)
    if list(predictor.classes) != list(classes):
        raise MineralNetError(f"--teacher {str(teacher)!r} knows the classes {', '.join(predictor.classes)}, the "
                              f"student's photos have {', '.join(classes)}; distil from a teacher trained on the "
                              f"same mineral folders")
    table = _teacher_rows(predictor, list(paths))
    meta = {"teacher": str(Path(teacher).resolve()), "classes": json.dumps(list(classes)),
            "photos": _photos_digest(paths), "source": "calibrated probabilities" if predictor.ensemble else "logits"}
    return table, meta


def _cached(run: RunDir, teacher, classes, paths):
    """The cached table when it was made by this teacher for these photos and classes, else None."""
    from safetensors import safe_open

    path = run.teacher_file
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        ok = (meta.get("teacher") == str(Path(teacher).resolve()) and meta.get("photos") == _photos_digest(paths)
              and meta.get("classes") == json.dumps(list(classes)))
        return f.get_tensor("log_probs") if ok else None


def teacher_training_photos(teacher) -> set[str]:
    """The resolved paths of the photos the teacher trained on: its split's training part, or the union over an
    ensemble's members. A run without a split file adds nothing (there is nothing to check it by)."""
    from mineralnet.infer.ensemble import is_ensemble, read_ensemble
    from mineralnet.runs import read_split

    runs = [m["resolved"] for m in read_ensemble(teacher)["members"]] if is_ensemble(teacher) else [teacher]
    seen: set[str] = set()
    for r in runs:
        try:
            train = read_split(r)["splits"].get("train", [])
        except MineralNetError:
            continue
        seen |= {str(Path(p).resolve()) for p, _ in train}
    return seen


def check_teacher_held_out(teacher, val) -> None:
    """Refuse a teacher that trained on any of the student's validation photos: its soft labels would carry
    those photos' answers into the student, and the student's validation numbers would be too good."""
    seen = teacher_training_photos(teacher)
    leaked = [p for p, _ in val if str(Path(p).resolve()) in seen]
    if leaked:
        raise MineralNetError(f"--teacher {str(teacher)!r} trained on {len(leaked)} of the student's {len(val)} "
                              f"validation photos (e.g. {leaked[0]!r}); train the teacher (every member) on the "
                              f"student's split: the same --data, --val-split and --split-seed")


def teacher_table(cfg, split, run: RunDir, accelerator) -> torch.Tensor:
    """The (N_train, C) teacher log-probabilities on the accelerator's device: read from the run folder when it
    is there for this teacher and these photos (a resume), else computed by the main process and cached."""
    from accelerate.utils import broadcast_object_list
    from safetensors.torch import save

    paths = [p for p, _ in split.train]
    error = None
    if accelerator.is_main_process:
        try:
            check_teacher_held_out(cfg.teacher, split.val)
            if _cached(run, cfg.teacher, split.classes, paths) is None:
                print(f"distillation: computing the soft labels of {cfg.teacher} on {len(paths)} training photos "
                      f"(once; cached in the run folder)", flush=True)
                table, meta = compute_teacher_table(cfg.teacher, split.classes, paths, device=str(accelerator.device))
                atomic_write_bytes(run.teacher_file, save({"log_probs": torch.from_numpy(table)}, metadata=meta))
        except MineralNetError as e:
            error = str(e)
    error = broadcast_object_list([error])[0] if accelerator.num_processes > 1 else error
    if error:
        raise MineralNetError(error)
    table = _cached(run, cfg.teacher, split.classes, paths)
    if table is None or tuple(table.shape) != (len(paths), len(split.classes)):
        raise MineralNetError(f"{str(run.teacher_file)!r} does not match the training photos; delete it and train "
                              f"again")
    return table.to(accelerator.device)
