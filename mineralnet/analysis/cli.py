"""The analysis commands: `mineralnet eval`, `mineralnet cv` and `mineralnet explain` (their logic is in
evaluate.py, crossval.py + cvfolds.py + cvreport.py and explain.py + figures.py of this package)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mineralnet.analysis.crossval import DEFAULT_FOLDS, cross_validate, parse_grid, parse_variants
from mineralnet.analysis.evaluate import default_out_dir, predict_folder, split_samples, warn_training_overlap
from mineralnet.analysis.explain import explain
from mineralnet.calibration.fit import eval_calibration, format_calibration
from mineralnet.config import FIELD_NAMES, add_config_arguments
from mineralnet.data import scan_dataset
from mineralnet.data.hints import check_class_root
from mineralnet.errors import MineralNetError
from mineralnet.metrics import format_table
from mineralnet.report import write_eval_report
from mineralnet.runs import EVAL_CLASSES_FILE, EVAL_CONFUSION_FILE, EVAL_METRICS_FILE
from mineralnet.threads import apply_threads, parse_threads

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
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

def run_eval(args) -> int:
    from mineralnet.infer.ensemble import is_ensemble  # ensembles and TTA go through the Predictor

    if getattr(args, "tta", None) or is_ensemble(args.run):
        return _eval_with_predictor(args)
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
def _eval_with_predictor(args) -> int:
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

def add_cv_arguments(parser) -> None:

    parser.description = ("K-fold cross-validation: every grid cell is trained once per fold on identical "
                          "stratified folds; results.md/json give Top1 and mean class accuracy (the paper's "
                          "mAP) as mean ± std with a paired t-test against the first cell. Re-running the "
                          "same command resumes. Takes every training flag (`mineralnet train --help`).")
    cv = parser.add_argument_group("cross-validation")
    cv.add_argument("--grid", nargs="+", action="append", metavar="FIELD=V1 V2",
                    help="vary a training field over values, repeatable; the cartesian product is run, the "
                         "first cell is the baseline. e.g. --grid stages=4 2,4 --grid loss=ce wtopk")
    cv.add_argument("--variant", action="append", metavar="\"FIELD=V FIELD=V\"",
                    help="one explicit variant, repeatable (the first is the baseline), e.g. --variant "
                         "\"stages=4 loss=ce\" --variant \"stages=2,4 loss=wtopk\"; crossed with --grid if both")
    cv.add_argument("--only-folds", default=None, metavar="I,J",
                    help="run only these folds of the K (e.g. 0,1,2 to fit a time budget); the split stays K-fold")
    cv.add_argument("--drop-rare", type=int, default=0, metavar="N",
                    help="leave out the classes with fewer than N photos (listed when cv starts); a class with a "
                         "single photo cannot be cross-validated, so N >= 2 lets such a collection run")
    cv.add_argument("--launcher", default=None, metavar="CMD",
                    help="run each fold as `CMD launch/train.py ...` in a subprocess, e.g. "
                         "\"accelerate launch --multi_gpu --num_processes 8\" (default: in this process)")
    add_config_arguments(parser)  # --data, --out, --folds, --config and every other training flag
    # The shared training flags mean something slightly different here: say so in --help.
    for flag, text in (("--out", "cv folder: folds.json, results.md/json and one run per variant and fold"),
                       ("--folds", f"K of the stratified K-fold split (default {DEFAULT_FOLDS}, the paper's)"),
                       ("--fold", "not used by cv (it runs every fold); see --only-folds"),
                       ("--data", "photos: one sub-folder per mineral (or a CSV manifest path,label)")):
        parser._option_string_actions[flag].help = text

def _parse_int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise MineralNetError(f"{flag} {text!r} must be a comma list of fold numbers, e.g. 0,1,2") from None

def run_cv(args) -> int:

    fields = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}
    if "fold" in fields:
        raise MineralNetError("--fold is chosen by cv (it runs every fold); use --only-folds I,J to run some")
    if fields.get("resume"):
        raise MineralNetError("--resume is not a cv flag: run the same cv command again and it resumes")
    folds = fields.pop("folds", DEFAULT_FOLDS)
    try:
        folds = int(folds)
    except ValueError:
        raise MineralNetError(f"--folds {folds!r} must be a whole number of folds, at least 2") from None
    grid = parse_grid(args.grid)
    variants = parse_variants(args.variant)
    only = _parse_int_list(args.only_folds, "--only-folds") if args.only_folds else None
    command = "mineralnet cv " + shlex.join(sys.argv[2:]) if len(sys.argv) > 2 and sys.argv[1] == "cv" else None
    cross_validate(fields, config=args.config, grid=grid, variants=variants, folds=folds, only_folds=only,
                   launcher=args.launcher, command=command, drop_rare=args.drop_rare)
    return 0

def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory made by training (model.safetensors + model.json)")
    parser.add_argument("--data", help="labelled photos: one sub-folder per mineral (the run's class names); "
                                        "optional with --val-only")
    parser.add_argument("--per-class", type=int, default=10, help="photos per mineral in the t-SNE (default 10; paper 5)")
    parser.add_argument("--cams", type=int, default=16,
                        help="photos in the Grad-CAM grid (one right and one wrong per mineral; default 16)")
    parser.add_argument("--gallery", type=int, default=24, help="misrecognised photos shown (default 24)")
    parser.add_argument("--val-only", action="store_true",
                        help="only the run's validation photos (from its split.json; without --data, where "
                             "training found them), e.g. for a cv fold")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the photo choice and t-SNE (default 0)")
    parser.add_argument("--out", default=None, help="output folder (default RUN/explain)")

def run_explain(args) -> int:
    explain(args.run, args.data, out=args.out, per_class=args.per_class, cams=args.cams, gallery=args.gallery,
            batch_size=args.batch_size, workers=args.workers, val_only=args.val_only, seed=args.seed)
    return 0
