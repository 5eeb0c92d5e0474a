"""`mineralnet calibrate RUN|ENS`: flags -> `calibrate_run` (calibration/fit.py), or for an ensemble folder
`calibrate_ensemble` (ensemble/calibrate.py)."""
from __future__ import annotations

import argparse

from mineralnet.calibration import core
from mineralnet.calibration.fit import DEFAULT_ACCEPTANCE, DEFAULT_DETECTOR, DEFAULT_SHRINKAGE, calibrate_run
from mineralnet.errors import MineralNetError

ENSEMBLE_ONLY = ("mutual_information",)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory made by training (with its split.json), or an ensemble folder "
                                    "(`mineralnet ensemble`): one temperature on the averaged member probabilities "
                                    "and the threshold of its novelty score, on the photos every member held out, "
                                    "written into its ensemble.json")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, choices=core.DETECTORS + ENSEMBLE_ONLY,
                        help=f"novelty score that decides 'unknown' (default {DEFAULT_DETECTOR}); an ensemble takes "
                             f"energy (its members' mean) or mutual_information (their disagreement)")
    parser.add_argument("--acceptance", type=float, default=DEFAULT_ACCEPTANCE,
                        help="fraction of known validation photos the unknown threshold accepts (default 0.95)")
    parser.add_argument("--raps-lambda", type=float, default=0.0,
                        help="RAPS penalty per candidate past --raps-k (default 0 = APS)")
    parser.add_argument("--raps-k", type=int, default=0, help="RAPS: candidates allowed without penalty")
    parser.add_argument("--knn-k", type=int, default=10, help="neighbour rank of the knn detector (default 10)")
    parser.add_argument("--shrinkage", type=float, default=DEFAULT_SHRINKAGE,
                        help=f"mahalanobis/relmaha: covariance shrinkage towards a scaled identity, 0..1 "
                             f"(default {DEFAULT_SHRINKAGE})")
    parser.add_argument("--batch-size", type=int, default=64, help="photos per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    parser.add_argument("--device", default=None, help="PyTorch device (default cuda if present)")


def run(args) -> int:
    from mineralnet.data.shards import shard_source_note

    if shard_source_note(args.run):
        raise MineralNetError(f"{args.run} is a folder of WebDataset shards, not a training run; calibrate the run "
                              f"trained from them (mineralnet train --data {args.run} --out RUN, then "
                              f"mineralnet calibrate RUN)")
    if not 0.0 < args.acceptance <= 1.0:
        raise MineralNetError(f"--acceptance {args.acceptance} must be in (0, 1], e.g. 0.95")
    if args.raps_lambda < 0 or args.raps_k < 0 or args.knn_k < 1:
        raise MineralNetError("--raps-lambda and --raps-k must be >= 0 and --knn-k >= 1")
    if not 0.0 <= args.shrinkage <= 1.0:
        raise MineralNetError(f"--shrinkage {args.shrinkage} must be in [0, 1] (0: the sample covariance, "
                              f"1: a scaled identity), e.g. {DEFAULT_SHRINKAGE}")
    from mineralnet.infer.ensemble import is_ensemble

    if is_ensemble(args.run):
        return _calibrate_ensemble(args)
    if args.detector in ENSEMBLE_ONLY:
        raise MineralNetError(f"--detector {args.detector} is an ensemble's score (its members' disagreement); for "
                              f"the run {args.run} choose one of {', '.join(core.DETECTORS)}")
    calibrate_run(args.run, detector=args.detector, acceptance=args.acceptance, lam=args.raps_lambda,
                  k_reg=args.raps_k, knn_k=args.knn_k, shrinkage=args.shrinkage, batch_size=args.batch_size,
                  workers=args.workers, device=args.device)
    return 0


def _calibrate_ensemble(args) -> int:
    from mineralnet.ensemble.calibrate import calibrate_ensemble

    given = [flag for flag, value, default in (("--knn-k", args.knn_k, 10), ("--workers", args.workers, 0),
                                               ("--shrinkage", args.shrinkage, DEFAULT_SHRINKAGE)) if value != default]
    if given:
        raise MineralNetError(f"{', '.join(given)}: {args.run} is an ensemble, whose calibration has no feature "
                              f"detectors and reads photos itself; drop {', '.join(given)}")
    if args.detector not in ("energy",) + ENSEMBLE_ONLY:
        raise MineralNetError(f"--detector {args.detector}: the ensemble {args.run} decides `unknown` with energy "
                              f"(its members' mean) or mutual_information (their disagreement); choose one of them")
    calibrate_ensemble(args.run, detector=args.detector, acceptance=args.acceptance, lam=args.raps_lambda,
                       k_reg=args.raps_k, batch_size=args.batch_size, device=args.device)
    return 0
