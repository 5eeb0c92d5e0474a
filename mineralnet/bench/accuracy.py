"""`mineralnet bench MODEL... --data DIR`: Top1, mean class accuracy and the top-1 agreement with the
PyTorch fp32 model for every measured row (an ensemble row: its accuracy, no agreement), each runtime and precision scored on the same labelled photos
with `mineralnet.infer.score_photos` (the numbers `mineralnet eval` gives for the run directory)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Optional

from mineralnet.errors import MineralNetError
from mineralnet.bench.runtimes import _autocast
from mineralnet.infer import Predictor, labelled_photos, score_photos
from mineralnet.infer.ensemble import common_val
from mineralnet.artifact import run_of
from mineralnet.runs import read_split

ACCURACY_KEYS = ("images", "top1", "mean_class_acc", "agreement")


def _key(path) -> str:
    return os.path.realpath(os.fspath(path))


def _predictor(row: dict, device: str) -> Predictor:
    """The Predictor that computes what the row's runtime computes."""
    runtime, path = row["runtime"], row["path"]
    if runtime.startswith("torch"):
        return Predictor(path, device=device)
    if runtime == "openvino":
        return Predictor(path, precision=row.get("hint") or "fp32", runtime="openvino")
    if runtime.startswith("ort-"):
        return Predictor(path, providers=[row.get("provider") or "CPUExecutionProvider"])
    return Predictor(path)


def _score_key(row: dict) -> tuple:
    # torch-cl and torch-compile compute the eager model's numbers: one score per precision for all three
    runtime = "torch" if row["runtime"].startswith("torch") else row["runtime"]
    return runtime, _key(row["path"]), row["precision"]


class PhotoSet:
    """The labelled photos every row is scored on: a class-folder tree, or with `split` the photos of that
    part of the run's split file (split.json), found under `data`."""

    def __init__(self, data, split: Optional[str] = None):
        if not Path(data).is_dir():
            raise MineralNetError(f"--data {os.fspath(data)!r} is not a folder; pass labelled photos (one sub-folder "
                                  f"per mineral), e.g. ../shared/data/minet7")
        self.data, self.split, self._cache = data, split, {}

    def samples(self, classes: list[str], run: Optional[Path]) -> list[tuple[str, int]]:
        key = (tuple(classes), _key(run) if self.split and run else None)
        if key not in self._cache:
            self._cache[key] = self._load(classes, run)
        return self._cache[key]

    def ensemble_samples(self, predictor: Predictor) -> list[tuple[str, int]]:
        """The photos an ensemble row is scored on: the folder's, or with --split val those every member held out."""
        if self.split is None:
            return self.samples(predictor.classes, None)
        if self.split != "val":
            raise MineralNetError(f"--split {self.split}: the members of the ensemble {predictor.path!r} may have "
                                  f"trained on different photos; use --split val (the photos every member held out)")
        key = ("ensemble", _key(predictor.path))
        if key not in self._cache:
            members = [m["resolved"] for m in predictor.ensemble.spec["members"]]
            self._cache[key] = common_val(members, root=self.data)
        return self._cache[key]

    def _load(self, classes: list[str], run: Optional[Path]) -> list[tuple[str, int]]:
        if self.split is None:
            return labelled_photos(self.data, classes)
        if run is None:
            raise MineralNetError(f"--split {self.split} reads the split file of the model's run, and this model "
                                  f"sits in no run directory; drop --split or pass the run's exports")
        doc = read_split(run, root=self.data)
        if list(doc["classes"]) != list(classes):
            raise MineralNetError(f"{run}/split.json lists the classes {doc['classes']}, the model {classes}; "
                                  f"pass the model of that run")
        if self.split not in doc["splits"]:
            raise MineralNetError(f"--split {self.split}: {run}/split.json has {', '.join(doc['splits'])}")
        samples = [(p, y) for p, y in doc["splits"][self.split] if y >= 0]
        missing = [p for p, _ in samples if not Path(p).is_file()]
        if missing:
            raise MineralNetError(f"--data {os.fspath(self.data)!r} lacks {len(missing)} photos of the run's "
                                  f"{self.split} split (e.g. {missing[0]}); pass the folder the run was trained on")
        return samples


def score_rows(rows: list[dict], photos: PhotoSet, *, device: str = "cpu", batch_size: int = 32,
               log: Callable[[str], None] = print) -> None:
    """Add images, top1, mean_class_acc and agreement (with the run's PyTorch fp32 top-1; None when the
    model belongs to no run directory) to every measured row, in place. Rows of one model, runtime and
    precision share one score; the batch size does not change the predictions."""
    scores: dict[tuple, dict] = {}
    references: dict[str, dict] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        key = _score_key(row)
        if key not in scores:
            scores[key] = _score(row, photos, device, batch_size, references, log)
        row.update({k: scores[key][k] for k in ACCURACY_KEYS})


def _reference(run: Path, photos: PhotoSet, device: str, batch_size: int, references: dict) -> dict:
    key = _key(run)
    if key not in references:
        predictor = Predictor(run, device=device)
        references[key] = score_photos(predictor, photos.samples(predictor.classes, run), batch_size=batch_size)
    return references[key]


def _score(row: dict, photos: PhotoSet, device: str, batch_size: int, references: dict, log) -> dict:
    if row["runtime"] == "ensemble":  # no fp32 run of its own to agree with
        predictor = Predictor(row["path"], device=device)
        score = score_photos(predictor, photos.ensemble_samples(predictor), batch_size=batch_size)
        log(f"  {row['model']} ensemble: top-1 {score['top1']:.2%}, mean class {score['mean_class_acc']:.2%} on "
            f"{score['images']} photos")
        return score
    run = run_of(row["path"])
    reference = _reference(run, photos, device, batch_size, references) if run else None
    if row["runtime"].startswith("torch") and row["precision"] == "fp32" and run and _key(run) == _key(row["path"]):
        score = dict(reference, agreement=1.0)
    else:
        predictor = _predictor(row, device)
        samples = photos.samples(predictor.classes, run)
        with _autocast(device, row["precision"]) if row["runtime"].startswith("torch") else contextlib.nullcontext():
            score = score_photos(predictor, samples, batch_size=batch_size,
                                 reference=None if reference is None else reference["preds"])
    agree = "-" if score["agreement"] is None else f"{score['agreement']:.2%}"
    log(f"  {row['model']} {row['runtime']} {row['precision']}: top-1 {score['top1']:.2%}, mean class "
        f"{score['mean_class_acc']:.2%}, agrees with PyTorch fp32 on {agree} of {score['images']} photos")
    return score

