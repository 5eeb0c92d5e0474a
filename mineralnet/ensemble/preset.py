"""An ensemble preset (`train --config cpu-ensemble --data DIR --out RUN`): train the members, average them into an
ensemble, distil the ensemble into one student. RUN is the student, a normal run folder; inside it:

    RUN/members/m0, m1, ...   the member runs (each calibrated, as `mineralnet train` leaves a run)
    RUN/ensemble/             `mineralnet ensemble` of the members, calibrated (`mineralnet calibrate ENS`)
    RUN/teacher.safetensors   the ensemble's soft labels of the student's training photos (train/teacher.py)

Every member takes the preset's config with its own fields changed (`config.member_configs`) and the preset's
split seed, so all train on the student's split; the ensemble refuses members that validated on other photos,
and train/teacher.py refuses a teacher that trained on any of the student's validation photos. Run again, the
same command skips members whose result.json says finished, resumes a member that has a checkpoint, and keeps
an ensemble already built; the student resumes with `--resume RUN` like any run. Under DDP (`accelerate
launch`) every rank trains each member in turn, and the main process builds the ensemble while the others wait.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

from mineralnet.config import TrainConfig, member_configs
from mineralnet.errors import MineralNetError
from mineralnet.infer.ensemble import ENSEMBLE_FILE, is_ensemble
from mineralnet.runs import RunDir, read_split

DONE = ("finished", "time_budget")  # a member that ended by itself (a time budget is an end too)
SAME_MEMBER = ("backbone", "image_size", "seed", "epochs", "pretrained", "stages", "loss")  # checked on a skip


def train_ensemble_preset(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict:
    """Members, ensemble, student; returns the student's fit() result (or the stopped member's). `log` defaults to
    print on the main process only."""
    from mineralnet.calibration.fit import after_training
    from mineralnet.train.fit import fit

    log = log or (print if _is_main() else (lambda *_: None))

    if not cfg.out:
        raise MineralNetError("an ensemble preset needs --out RUN: the student's run folder, which also holds the "
                              "members and their ensemble")
    run = RunDir(cfg.out)
    ensemble = run.ensemble_dir.resolve()
    if cfg.teacher and Path(cfg.teacher).resolve() != ensemble:
        raise MineralNetError(f"--teacher {cfg.teacher}: an ensemble preset's teacher is the ensemble of its own "
                              f"members ({ensemble}); drop --teacher")
    members = member_configs(cfg)
    paths = []
    for i, mcfg in enumerate(members):
        path = run.members_dir / f"m{i}"
        log(f"ensemble preset: member {i + 1}/{len(members)} ({mcfg.backbone}, {mcfg.image_size} px, seed "
            f"{mcfg.seed}) in {path}")
        result = _train_member(mcfg, path, log, fit, after_training)
        if result.get("status") not in DONE:
            log(f"ensemble preset: member {path} stopped ({result.get('status')}); run the same command again to "
                f"continue (finished members are skipped)")
            return result
        paths.append(path)
    check_same_split(paths)
    _build(paths, ensemble, log)
    student = dataclasses.replace(cfg, teacher=str(ensemble))
    log(f"ensemble preset: distilling {ensemble} into {cfg.backbone} at {cfg.image_size} px in {run.path}")
    result = fit(student)
    after_training(result)
    if result.get("main_process") and result.get("status") in DONE:
        log(f"ensemble preset: {run.path} is the distilled student; {run.members_dir} holds the members and "
            f"{ensemble} their ensemble (`mineralnet eval {ensemble} --split val` compares them)")
    return result


def _train_member(mcfg: TrainConfig, path: Path, log, fit, after_training) -> dict:
    """One member: skipped when finished, resumed from its checkpoint, else trained (and calibrated) anew."""
    member = RunDir(path)
    done = member.result()
    if done and done.get("status") in DONE:
        saved = member.saved_config() or {}
        wanted = mcfg.to_dict()
        changed = [k for k in SAME_MEMBER if saved.get(k) != wanted.get(k)]
        if changed:
            raise MineralNetError(f"{path} was trained with {', '.join(f'{k}={saved.get(k)!r}' for k in changed)}, "
                                  f"the preset now asks {', '.join(f'{k}={wanted.get(k)!r}' for k in changed)}; "
                                  f"move {path} away to train that member again")
        log(f"ensemble preset: {path} finished earlier ({done['status']}); skipped")
        return done
    resume = member.has_state()
    if not resume and member.config_file.is_file() and _is_main():
        # started but stopped before its first checkpoint: nothing learned to keep, start it again
        shutil.rmtree(path)
    result = fit(dataclasses.replace(mcfg, out=str(path), resume=str(path) if resume else None),
                 keep_process_group=True)  # the next member and the student train in the same group
    after_training(result)  # each member calibrated: the ensemble averages calibrated probabilities
    return result


def check_same_split(paths) -> None:
    """Every member validated on the same photos as the first one (they all trained on the student's split)."""
    def val(p):
        return {str(Path(x).resolve()) for x, _ in read_split(p)["splits"]["val"]}

    first = val(paths[0])
    for p in paths[1:]:
        other = val(p)
        if other != first:
            raise MineralNetError(f"member {p} validated on {len(other)} photos, {paths[0]} on {len(first)}, "
                                  f"{len(other ^ first)} of them not shared: the members must share one split (the "
                                  f"photos changed between them?); move {p} away to train it again")


def _build(paths, ensemble: Path, log) -> None:
    """The calibrated ensemble of the members, built once by the main process (the other ranks wait). The process
    group stays alive for the student's training."""
    from accelerate.utils import broadcast_object_list

    from mineralnet.ensemble.build import build_ensemble
    from mineralnet.ensemble.calibrate import calibrate_ensemble
    from mineralnet.train.loop import fresh_accelerator

    accelerator = fresh_accelerator()
    error = None
    if accelerator.is_main_process and not _calibrated(ensemble):
        try:
            if not is_ensemble(ensemble):
                result = build_ensemble(paths, ensemble)
                log(f"ensemble preset: {ensemble} on the {result['photos']} photos every member held out:\n"
                    f"{result['table']}")
            calibrate_ensemble(ensemble, log=log)
        except MineralNetError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise MineralNetError(error)


def _calibrated(ensemble: Path) -> bool:
    import json

    return is_ensemble(ensemble) and "calibration" in json.loads((ensemble / ENSEMBLE_FILE).read_text())


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
