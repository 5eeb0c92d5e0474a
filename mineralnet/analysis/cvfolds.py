"""The folds of `mineralnet cv`: rare minerals, near-duplicate groups, folds.json, per-class pooling.

    select_photos(data, drop_rare, out)   -> (index cv trains on, data path for training, dropped classes)
    make_folds(index, folds, seed, ...)   -> {classes, n, val: [[relative path, ...] per fold], ...}
    load_or_save_folds(out, ...)          -> the folds, written to out/folds.json once and checked after
    pool_per_class(fold_metrics, classes) -> per class: folds validated in, pooled accuracy

A class with fewer photos than folds (but at least 2) is validated in only as many folds as it has
photos; cv says so once. A class with one photo is refused, or left out with --drop-rare N (classes
under N photos): cv then trains on a CSV manifest of the other photos (out/photos.csv), so every fold
run sees the same photos and classes as the folds. Near-duplicate photos (`mineralnet.data.duplicates`)
share a fold unless --no-group-duplicates; training computes the same groups and hence the same folds.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from mineralnet import data as mdata
from mineralnet.errors import MineralNetError
from mineralnet.files import atomic_write_json
from mineralnet.runs import RunDir, read_split

MANIFEST = "photos.csv"


def select_photos(data, drop_rare: int, out: Path):
    """(index, data for training, {dropped class: photos}). With drop_rare > 0 the classes with fewer
    photos are left out and training reads out/photos.csv instead of `data`."""
    index = mdata.scan_dataset(data, verify=True)
    counts = index.counts()
    dropped = {c: n for c, n in counts.items() if n < drop_rare}
    if not dropped:
        return index, str(data), {}
    kept = [c for c in index.classes if c not in dropped]
    if len(kept) < 2:
        raise MineralNetError(f"--drop-rare {drop_rare} leaves {len(kept)} class(es) of {str(data)!r}; "
                              f"cross-validation needs at least 2 minerals: lower --drop-rare")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    tmp = manifest.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((p, index.classes[y]) for p, y in index.samples if index.classes[y] not in dropped)
    os.replace(tmp, manifest)
    kept_index = mdata.scan_dataset(manifest, verify=False)
    if index.facts is not None:  # the photos' index facts carry over: nothing is read again
        row = {p: i for i, (p, _) in enumerate(index.samples)}
        kept_index.facts = index.facts.take([row[p] for p, _ in kept_index.samples])
    return kept_index, str(manifest), dropped


def make_folds(index, folds: int, seed: int, *, group_duplicates: bool = True,
               max_group: int = mdata.DEFAULT_MAX_GROUP) -> dict:
    """The stratified folds of `index` as relative paths: {classes, n, val: [[path, ...] per fold], ...}."""
    if len(index.classes) < 2:
        raise MineralNetError(f"{str(index.root)!r} has {len(index.classes)} class folder(s); cross-validation "
                              f"needs at least 2 minerals")
    groups, merged = None, 0
    if group_duplicates:
        dup = mdata.collection_groups(index, max_group=max_group)
        groups, merged = dup.ids, dup.merged
        if dup.oversized:
            print(f"cv: {dup.oversized_note([p for p, _ in index.samples], max_group)}", flush=True)
    val = mdata.stratified_kfold(index.labels(), folds, seed, classes=index.classes, groups=groups)
    rel = [os.path.relpath(p, index.base) for p, _ in index.samples]
    small = {index.classes[c]: n for c, n in mdata.small_classes(index.labels(), folds).items()}
    return {"data": str(index.root), "base": str(index.base), "folds": folds, "seed": seed,
            "classes": list(index.classes), "n": len(rel), "unreadable": len(index.bad),
            "small_classes": small, "duplicate_groups_merged": merged,
            "val": [sorted(rel[i] for i in fold) for fold in val]}


def load_or_save_folds(out: Path, index, folds: int, seed: int, *, group_duplicates: bool = True,
                       max_group: int = mdata.DEFAULT_MAX_GROUP) -> dict:
    """Compute the folds; write out/folds.json the first time, and check them against it afterwards."""
    current = make_folds(index, folds, seed, group_duplicates=group_duplicates, max_group=max_group)
    path = out / "folds.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in ("folds", "seed", "classes", "val")} != \
                {k: current[k] for k in ("folds", "seed", "classes", "val")}:
            raise MineralNetError(f"{str(path)!r} holds other folds than --data {str(index.root)!r} with --folds "
                                  f"{folds} --seed {seed} gives now (photos, classes, --folds, --seed, --drop-rare "
                                  f"or near-duplicate grouping changed; folds made before grouping existed come "
                                  f"back with --no-group-duplicates); use a new --out, or restore the photos and "
                                  f"flags of that cross-validation")
    else:
        atomic_write_json(path, current)
    return current


def announce(fold_info: dict, dropped: dict) -> None:
    """The one-time lines about rare classes and near-duplicate groups."""
    if dropped:
        print(f"cv: left out {len(dropped)} class(es) with fewer photos than --drop-rare: "
              + ", ".join(f"{c} ({n})" for c, n in dropped.items()), flush=True)
    small = fold_info.get("small_classes") or {}
    if small:
        print(f"cv: {len(small)} class(es) have fewer photos than the {fold_info['folds']} folds and are validated "
              f"in only that many folds: " + ", ".join(f"{c} ({n})" for c, n in small.items())
              + "; their accuracies rest on few photos", flush=True)
    if fold_info.get("duplicate_groups_merged"):
        print(f"cv: {fold_info['duplicate_groups_merged']} group(s) of near-duplicate photos kept together in one "
              f"fold each (`mineralnet data check DIR --duplicates` lists them)", flush=True)


def check_run_split(run_dir: Path, data_root, fold_val: list[str]) -> None:
    """The run's own split must hold exactly the fold's validation photos (paths relative to `data_root`)."""
    try:
        got = sorted(os.path.abspath(p) for p, _ in read_split(run_dir)["splits"]["val"])
    except MineralNetError:
        return  # no split written yet
    want = sorted(os.path.abspath(os.path.join(data_root, rel)) for rel in fold_val)
    if got != want:
        raise MineralNetError(f"{str(run_dir)!r} validates on other photos than the cv fold in folds.json; "
                              f"delete {str(run_dir)!r} and run cv again")


def fold_per_class(run_dir: Path) -> dict:
    """{class: [correct, support]} of a finished fold run's eval/metrics.json."""
    m = RunDir(run_dir).eval_metrics()
    if m is None:
        raise MineralNetError(f"{str(run_dir)!r} has no final evaluation (eval/metrics.json); resume the cv run")
    return {row["class"]: [int(row["correct"]), int(row["support"])] for row in m.get("per_class", [])}


def pool_per_class(fold_counts: list[dict], classes: list[str]) -> list[dict]:
    """Per class over the folds: in how many it was validated, its pooled accuracy (correct / photos over
    those folds) and the mean of its per-fold accuracies."""
    rows = []
    for c in classes:
        seen = [fc[c] for fc in fold_counts if c in fc and fc[c][1] > 0]
        correct, support = sum(s[0] for s in seen), sum(s[1] for s in seen)
        rows.append({"class": c, "folds": len(seen), "photos": support,
                     "accuracy": correct / support if support else None,
                     "mean_fold_accuracy": float(np.mean([a / n for a, n in seen])) if seen else None})
    return rows
