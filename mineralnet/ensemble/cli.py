"""`mineralnet ensemble RUN1 RUN2 ... --out ENS` (see mineralnet.ensemble.build)."""
from __future__ import annotations

import argparse

from mineralnet.errors import MineralNetError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories made by training, with the same classes; they may differ in backbone, "
                             "resolution and seed. Trained on the same split (train --split-seed S) they share "
                             "held-out photos to evaluate on")
    parser.add_argument("--out", required=True, help="the ensemble folder to write (ensemble.json, eval/)")
    parser.add_argument("--weights", default=None,
                        help="comma-separated weight per member, e.g. 2,1 (default equal)")
    parser.add_argument("--detector", default="energy", choices=("energy", "mutual_information"),
                        help="the score that decides `unknown`: the members' mean energy (default) or their "
                             "disagreement (mutual information); both are reported")
    parser.add_argument("--batch-size", type=int, default=32, help="photos per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="PyTorch device (default cuda if present)")


def run(args) -> int:
    from mineralnet.ensemble.build import build_ensemble

    weights = None
    if args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise MineralNetError(f"--weights {args.weights!r}: give numbers separated by commas, e.g. 2,1") from None
    result = build_ensemble(args.runs, args.out, weights, batch_size=args.batch_size, detector=args.detector,
                            device=args.device)
    print(f"evaluated on the {result['photos']} photos held out by every member:")
    print(result["table"])
    print(f"wrote {args.out}/ensemble.json and {args.out}/eval/ (metrics.json, per_class.csv, confusion.png, "
          f"summary.md, members/)")
    return 0
