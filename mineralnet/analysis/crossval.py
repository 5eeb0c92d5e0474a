"""`mineralnet cv`: K-fold cross-validation over a grid of variants (the paper's Tables 3-8).

    mineralnet cv --data DIR --out CV --folds 10 --config cpu \
        --grid stages=4 2,4 --grid loss=ce wtopk
    mineralnet cv ... --variant "stages=4 loss=ce" --variant "stages=2,4 loss=wtopk"

Every grid cell ("variant") is trained K times through the same `mineralnet.train.fit()`, once per
validation fold. All cells use the same stratified folds: the folds depend only on the photos,
K and --seed, are saved once in CV/folds.json, and every finished run's own split.json is checked
against them. Folds run fold by fold (all variants on fold 0, then fold 1, ...) so that the paired
comparison is available early. A finished fold (result.json + eval/metrics.json in its run
directory) is never re-run; an interrupted one is resumed from its saved state.

Output: CV/results.md (one row per variant: Top1 and mean class accuracy = the paper's "mAP",
mean ± sample std over folds, the per-fold numbers, and a paired t-test against the first cell,
the baseline) and CV/results.json.

An ensemble preset (`--config cpu-ensemble`: members, their ensemble, the distilled student) runs whole in each
fold's run directory, all on the fold's split: the variant's row is the student (the model that ships), and
rows named `VARIANT [mI]` / `VARIANT [ensemble]` follow it with each member and the ensemble on the same
validation photos, so the paired test against the baseline covers all of them.
"""
from __future__ import annotations

import dataclasses
import itertools
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from mineralnet.calibration.fit import after_training
from mineralnet.config import FIELD_NAMES, load_config
from mineralnet.errors import MineralNetError
from mineralnet.analysis.cvfolds import (announce, check_run_split, fold_per_class, load_or_save_folds,
                                         select_photos)
from mineralnet.analysis.cvreport import results_markdown, summarize_variants, write_results
from mineralnet.files import atomic_write_text
from mineralnet.runs import RunDir, read_metrics, read_result
from mineralnet import train

DEFAULT_FOLDS = 10
# Fields a grid may not vary: they define where the data and runs are, or the folds themselves.
NOT_GRIDDABLE = {
    "data": "the photos are fixed for a cross-validation",
    "out": "cv chooses each run's directory",
    "folds": "use --folds",
    "fold": "cv runs every fold (limit with --only-folds)",
    "val_data": "cv validates on the folds",
    "val_split": "cv validates on the folds",
    "resume": "cv resumes by itself: run the same command again",
    "split_seed": "it fixes the folds, which every variant shares; run cv again with another "
                  "--split-seed and --out",
    "group_duplicates": "it shapes the folds, which every variant shares",
    "max_duplicate_group": "it shapes the folds, which every variant shares",
}
FINISHED = ("finished", "time_budget")


# ----------------------------------------------------------------------------- grid
def parse_grid(specs) -> list[tuple[str, list[str]]]:
    """[["stages=4", "2,4"], ["loss=ce", "wtopk"]] -> [("stages", ["4", "2,4"]), ("loss", ["ce", "wtopk"])]."""

    out: list[tuple[str, list[str]]] = []
    for spec in specs or []:
        head, rest = spec[0], list(spec[1:])
        if "=" not in head:
            raise MineralNetError(f"--grid {' '.join(spec)!r} must look like FIELD=V1 V2 ..., "
                                  f"e.g. --grid stages=4 2,4 --grid loss=ce wtopk")
        name, first = head.split("=", 1)
        name = name.strip().lstrip("-").replace("-", "_")
        if name not in FIELD_NAMES:
            close = sorted(f for f in FIELD_NAMES if name[:3] and f.startswith(name[:3]))
            raise MineralNetError(f"--grid field {name!r} is not a training setting"
                                  + (f" (did you mean {', '.join(close)}?)" if close else "")
                                  + "; see `mineralnet train --help` for the fields")
        if name in NOT_GRIDDABLE:
            raise MineralNetError(f"--grid {name}=... is not allowed: {NOT_GRIDDABLE[name]}")
        if any(n == name for n, _ in out):
            raise MineralNetError(f"--grid {name} is given twice; list all its values after one {name}=")
        values = ([first] if first != "" else []) + rest
        if not values:
            raise MineralNetError(f"--grid {name}= has no values; e.g. --grid {name}=V1 V2")
        if len(set(values)) != len(values):
            raise MineralNetError(f"--grid {name} repeats a value ({' '.join(values)})")
        out.append((name, values))
    return out


def parse_variants(specs) -> list[dict]:
    """["stages=4 loss=ce", "stages=2,4 loss=wtopk"] -> [{"stages": "4", "loss": "ce"}, ...]."""
    out = []
    for spec in specs or []:
        tokens = spec.split() if isinstance(spec, str) else [t for part in spec for t in part.split()]
        cell = {}
        for token in tokens:
            name, values = parse_grid([[token]])[0] if "=" in token else (None, None)
            if name is None or len(values) != 1:
                raise MineralNetError(f"--variant {spec!r} must be FIELD=VALUE pairs, e.g. --variant "
                                      f"\"stages=4 loss=ce\"")
            if name in cell:
                raise MineralNetError(f"--variant {spec!r} sets {name} twice")
            cell[name] = values[0]
        if not cell:
            raise MineralNetError(f"--variant {spec!r} is empty; e.g. --variant \"stages=4 loss=ce\"")
        if cell in out:
            raise MineralNetError(f"--variant {spec!r} is given twice")
        out.append(cell)
    return out


def variant_name(cell: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.items()) or "base"


def variant_slug(cell: dict) -> str:
    """A folder name for a grid cell: stages=2,4 loss=wtopk -> stages-2+4_loss-wtopk."""
    if not cell:
        return "base"
    safe = lambda s: "".join(ch if ch.isalnum() or ch in ".+-" else "+" for ch in str(s).replace(",", "+"))
    return "_".join(f"{safe(k)}-{safe(v)}" for k, v in cell.items())


def build_variants(base: dict, config: str | None, grid, variants=None) -> list[tuple[dict, object]]:
    """[(cell, TrainConfig)]: each explicit variant (or none) times the cartesian product of the grid,
    every config validated up front."""

    names = [n for n, _ in grid]
    grid_cells = [dict(zip(names, combo)) for combo in itertools.product(*[v for _, v in grid])] or [{}]
    clash = sorted({n for v in variants or [] for n in v} & set(names))
    if clash:
        raise MineralNetError(f"{', '.join(clash)} is set by both --variant and --grid; set it in one of them")
    cells = [{**v, **g} for v in (variants or [{}]) for g in grid_cells]
    out = []
    for cell in cells:
        try:
            cfg = load_config(config, **{**base, **cell})
        except MineralNetError as e:
            raise MineralNetError(f"grid cell {variant_name(cell)!r}: {e}") from None
        out.append((cell, cfg))
    # One set of folds for all variants, also when the grid varies --seed (repeats on the same folds).
    split_seed = load_config(config, **base).data_seed
    for _, cfg in out:
        if cfg.split_seed is None:
            cfg.split_seed = split_seed
    return out


# ----------------------------------------------------------------------------- one fold
# Settings that may change between calls without invalidating a finished fold.
RERUN_SAFE = ("resume", "out", "workers", "log_every", "cache_images", "cache_budget_gb", "index")


def check_same_config(run_dir: Path, cfg) -> None:
    """A fold run found on disk must have been trained with this variant's settings."""
    saved = RunDir(run_dir).saved_config()
    if saved is None:
        return
    want = cfg.to_dict()
    if cfg.members:  # an ensemble preset's student distils its own fold's ensemble (ensemble/preset.py)
        want["teacher"] = str(RunDir(run_dir).ensemble_dir.resolve())
    diff = [f"{k}: {saved.get(k)!r} -> {want[k]!r}" for k in want
            if k not in RERUN_SAFE and k in saved and saved[k] != want[k]]
    if diff:
        raise MineralNetError(f"{str(run_dir)!r} was trained with other settings ({'; '.join(diff[:3])}); "
                              f"use a new --out for the new settings, or delete that folder")


def fold_result(run_dir: Path) -> dict | None:
    """Metrics of a finished fold run, or None when it has not finished."""
    result = read_result(run_dir)
    if result is None or result.get("status") not in FINISHED:
        return None
    m = RunDir(run_dir).eval_metrics()
    if m is None:
        return None
    out = {"top1": m["top1"], "mean_class_acc": m["mean_class_acc"], "top3": m.get("top3"),
           "epoch": result.get("best", {}).get("epoch"), "status": result.get("status"),
           "train_seconds": result.get("train_seconds"), "run_dir": str(run_dir)}
    lines = read_metrics(run_dir)
    if lines:
        out.update(epochs=lines[-1]["epoch"], last_top1=lines[-1]["val_top1"],
                   last_mean_class_acc=lines[-1]["val_mean_class_acc"])
    return out


def _prepare_fold_dir(run_dir: Path, keep: tuple[str, ...] = ()) -> bool:
    """True when the fold has a saved state to resume; a run that died before its first checkpoint
    holds nothing worth keeping and is cleared so that training can start it again, except the entries
    named in `keep` (an ensemble preset's members and ensemble, which resume on their own)."""
    if RunDir(run_dir).has_state():
        return True
    if run_dir.exists():
        if not keep:
            shutil.rmtree(run_dir)
            return False
        for entry in run_dir.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return False


def launch_script() -> list[str]:
    """What a launcher runs: launch/train.py of a source checkout, else the installed module."""
    script = Path(__file__).resolve().parents[2] / "launch" / "train.py"
    return [str(script)] if script.is_file() else ["-m", "mineralnet.cli", "train"]


def run_fold(cfg, run_dir: Path, launcher: str | None, fold_yaml: Path) -> None:
    """Train one fold in-process through fit() (an ensemble preset through its own driver, which skips finished
    members), or hand it to `launcher` (e.g. accelerate launch), which runs the same driver."""

    preset = bool(cfg.members)
    run = RunDir(run_dir)
    resume = _prepare_fold_dir(run_dir, keep=(run.members_dir.name, run.ensemble_dir.name) if preset else ())
    if launcher is None:
        fold_cfg = dataclasses.replace(cfg, out=str(run_dir), resume=str(run_dir) if resume else None)
        if preset:
            from mineralnet.ensemble.preset import train_ensemble_preset

            train_ensemble_preset(fold_cfg)  # members, ensemble, student (calibrated, as after_training does)
        else:
            after_training(train.fit(fold_cfg))
        return
    if resume:
        argv = ["--resume", str(run_dir)]
    else:
        atomic_write_text(fold_yaml, dataclasses.replace(cfg, out=str(run_dir)).to_yaml())
        argv = ["--config", str(fold_yaml)]
    cmd = shlex.split(launcher) + launch_script() + argv
    print("  $ " + shlex.join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise MineralNetError(f"training {str(run_dir)!r} failed (exit status {rc}, `{shlex.join(cmd)}`); fix "
                              f"the cause shown above and run the same cv command again to resume")


def preset_parts(run_dir: Path) -> list[tuple[str, Path]]:
    """An ensemble preset's fold: (label, folder) of each finished member (m0, m1, ...) and of the ensemble."""
    run = RunDir(run_dir)
    members = sorted((p for p in run.members_dir.glob("m*") if p.is_dir() and p.name[1:].isdigit()),
                     key=lambda p: int(p.name[1:]))
    return [(p.name, p) for p in members] + [("ensemble", run.ensemble_dir)]


def part_result(path: Path, label: str, members: list[dict] | None = None) -> dict:
    """A member's or the ensemble's numbers on the fold's validation photos (its own eval/metrics.json), in the
    shape of `fold_result`. A member: its training time and settings; the ensemble: the members' time summed."""
    m = RunDir(path).eval_metrics()
    if m is None:
        raise MineralNetError(f"{str(path)!r} has no evaluation (eval/metrics.json); run the same cv command "
                              f"again to finish the ensemble preset of this fold")
    out = {"top1": m["top1"], "mean_class_acc": m["mean_class_acc"], "top3": m.get("top3"), "run_dir": str(path),
           "part": label}
    if label == "ensemble":
        secs = [f.get("train_seconds") for f in members or []]
        out["train_seconds"] = sum(secs) if secs and all(secs) else None
        return out
    result, saved = read_result(path) or {}, RunDir(path).saved_config() or {}
    out.update(train_seconds=result.get("train_seconds"), epoch=result.get("best", {}).get("epoch"),
               status=result.get("status"), member={k: saved.get(k) for k in ("backbone", "image_size", "seed")})
    lines = read_metrics(path)
    if lines:
        out.update(epochs=lines[-1]["epoch"], last_top1=lines[-1]["val_top1"],
                   last_mean_class_acc=lines[-1]["val_mean_class_acc"])
    return out


def add_preset_parts(records: list[dict], rec: dict, run_dir: Path, fold: int) -> None:
    """Append this fold's members and ensemble to their rows `NAME [mI]` / `NAME [ensemble]`, made on first use
    right after the preset's own row (the student)."""
    members = []
    for offset, (label, path) in enumerate(preset_parts(run_dir), start=1):
        name = f"{rec['name']} [{label}]"
        row = next((r for r in records if r["name"] == name), None)
        if row is None:
            row = {"name": name, "slug": rec["slug"], "overrides": rec["overrides"], "part": label, "folds": []}
            records.insert(records.index(rec) + offset, row)
        result = part_result(path, label, members)
        if label != "ensemble":
            members.append(result)
        row["folds"] = [f for f in row["folds"] if f["fold"] != fold] + [
            {"fold": fold, **result, "per_class": fold_per_class(path)}]


# ----------------------------------------------------------------------------- driver
def cross_validate(base: dict, **kwargs) -> dict:
    """`_cross_validate` while owning --out (RUN/.lock, as training does): a second cv fails at once."""
    from mineralnet.runs import owning

    with owning(base.get("out")):
        return _cross_validate(base, **kwargs)


def _cross_validate(base: dict, *, config: str | None = None, grid=None, variants=None, folds: int = DEFAULT_FOLDS,
                    only_folds=None, launcher: str | None = None, command: str | None = None,
                    drop_rare: int = 0) -> dict:
    """Run (or resume) the cross-validation and write results.md/json. Returns the summary dict.

    Args:
        base: TrainConfig field overrides shared by all variants; must hold `data` and `out`.
        config: YAML preset file or name the overrides apply to.
        grid: [(field, [values])] from `parse_grid`.
        variants: [{field: value}] from `parse_variants`: explicit cells, each crossed with the grid.
        folds: K (at least 2). only_folds: run just these fold indices (a time budget).
        launcher: e.g. "accelerate launch --multi_gpu --num_processes 8": train each fold in a subprocess.
        drop_rare: leave out the classes with fewer photos (reported); 0 keeps every class.
    """
    if folds is None or int(folds) < 2:
        raise MineralNetError(f"--folds {folds} must be at least 2 (the paper uses 10)")
    folds = int(folds)
    if not base.get("data"):
        raise MineralNetError("cv needs --data DIR: a folder with one sub-folder of photos per mineral")
    if not base.get("out"):
        raise MineralNetError("cv needs --out DIR: the folder for the fold runs and results.md")
    fold_ids = list(range(folds)) if only_folds is None else sorted(set(only_folds))
    bad = [i for i in fold_ids if not 0 <= i < folds]
    if bad or not fold_ids:
        raise MineralNetError(f"--only-folds {','.join(map(str, only_folds or []))} must name folds in 0..{folds - 1}")
    out = Path(base["out"])
    grid = grid or []
    out.mkdir(parents=True, exist_ok=True)
    index, train_data, dropped = select_photos(base["data"], int(drop_rare or 0), out)
    variants = build_variants({**base, "data": train_data, "folds": folds, "fold": 0}, config, grid, variants)
    seed = variants[0][1].data_seed
    fold_info = load_or_save_folds(out, index, folds, seed, group_duplicates=variants[0][1].group_duplicates,
                                   max_group=variants[0][1].max_duplicate_group)
    announce(fold_info, dropped)

    records = [{"name": variant_name(cell), "slug": variant_slug(cell), "overrides": cell, "folds": []}
               for cell, _ in variants]
    own = list(records)  # one row per variant; an ensemble preset adds rows for its members and ensemble to records
    summary = {"data": fold_info["data"], "n": fold_info["n"], "classes": fold_info["classes"], "folds": folds,
               "seed": seed, "folds_run": fold_ids, "grid": [[n, v] for n, v in grid],
               "variant_specs": [variant_name(c) for c, _ in variants], "out": str(out),
               "config": config, "launcher": launcher, "command": command, "variants": records,
               "dropped_classes": dropped, "small_classes": fold_info.get("small_classes", {})}
    total, t0 = len(fold_ids) * len(variants), time.perf_counter()
    done_count = 0
    for fi, fold in enumerate(fold_ids):
        for vi, ((cell, cfg), rec) in enumerate(zip(variants, own)):
            done_count += 1
            run_dir = out / rec["slug"] / f"fold{fold}"
            check_same_config(run_dir, dataclasses.replace(cfg, fold=fold))
            tag = f"[{done_count}/{total}] fold {fold} ({fi + 1}/{len(fold_ids)}), variant {vi + 1}/{len(variants)} " \
                  f"{rec['name']!r}"
            result = fold_result(run_dir)
            if result is None:
                print(f"{tag}: training -> {run_dir}", flush=True)
                t_fold = time.perf_counter()
                run_fold(dataclasses.replace(cfg, fold=fold), run_dir, launcher,
                         out / rec["slug"] / f"fold{fold}.yaml")
                result = fold_result(run_dir)
                if result is None:
                    raise MineralNetError(f"training {str(run_dir)!r} ended without a finished result "
                                          f"(interrupted?); run the same cv command again to resume it")
                print(f"{tag}: Top1 {100 * result['top1']:.2f}%  mean class acc (paper's mAP) "
                      f"{100 * result['mean_class_acc']:.2f}%  ({(time.perf_counter() - t_fold) / 60:.1f} min)",
                      flush=True)
            else:
                print(f"{tag}: already finished (Top1 {100 * result['top1']:.2f}%), not re-run", flush=True)
            check_run_split(run_dir, fold_info.get("base") or fold_info["data"], fold_info["val"][fold])
            rec["folds"].append({"fold": fold, **result, "per_class": fold_per_class(run_dir)})
            if cfg.members:
                add_preset_parts(records, rec, run_dir, fold)
            summarize_variants(records, fold_ids)
            summary["wall_seconds_this_call"] = time.perf_counter() - t0
            write_results(out, summary)
    print(results_markdown(summary))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return summary
