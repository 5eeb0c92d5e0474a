"""``mineralnet``: one command with subcommands; ``mineralnet-export`` is ``mineralnet export``.

This module only dispatches. Each feature package holds its command in its ``cli.py`` (train, calibration,
app, export, bench, data); the single-module commands (eval, cv, explain, predict, weights) keep theirs at
the bottom of their module. That module defines ``add_arguments(parser)`` (or ``add_<name>_arguments``) and
``run(args) -> int`` (or ``run_<name>``); only the chosen subcommand's module is imported, so
``mineralnet data check`` does not pay for importing onnx or matplotlib.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from mineralnet import __version__
from mineralnet.errors import MineralNetError

# name -> (module, one-line help). Order is the order shown by `mineralnet --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mineralnet.train.cli", "train a model (same as `python launch/train.py`)"),
    "eval": ("mineralnet.analysis.cli", "evaluate a trained run on a labelled folder or on its own held-out photos"),
    "ensemble": ("mineralnet.ensemble.cli", "average several trained runs into one ensemble and evaluate it"),
    "cv": ("mineralnet.analysis.cli", "K-fold cross-validation over a grid of variants"),
    "explain": ("mineralnet.analysis.cli", "Grad-CAM, t-SNE and misrecognised-photo gallery for a run"),
    "export": ("mineralnet.export.cli", "export a run to ONNX (fp32/fp16/int8) and TensorRT"),
    "calibrate": ("mineralnet.calibration.cli", "fit unknown-mineral detection, temperature and candidate sets for a run"),
    "predict": ("mineralnet.infer.cli", "name the minerals in photos with a run, ONNX file or engine"),
    "app": ("mineralnet.app.cli", "a local web page: drop photos, see the minerals (pip install \"mineralnet[app]\")"),
    "bench": ("mineralnet.bench.cli", "latency/throughput benchmark of models across runtimes"),
    "data": ("mineralnet.data.cli", "inspect a photo collection (`mineralnet data check DIR`)"),
    "weights": ("mineralnet.weights.cli", "list offline pretrained weights; convert a checkpoint to timm safetensors"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    rows = "\n".join(f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items())
    return (
        f"usage: mineralnet <command> [options]   (mineralnet <command> --help for details)\n\n"
        f"MineralNet {__version__}: recognise minerals from photos by stage-feature fusion and\n"
        f"weighted top-k hard-sample mining (Jia et al., Minerals 2021).\n\ncommands:\n{rows}\n"
    )


def _hook(module, name: str, kind: str):
    # A module that serves one command uses add_arguments/run; one serving several uses
    # add_<name>_arguments/run_<name>.
    specific = getattr(module, f"{kind}_{name}" if kind == "run" else f"add_{name}_arguments", None)
    return specific or getattr(module, "run" if kind == "run" else "add_arguments")


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def fast_checks(name: str, argv: list[str]) -> None:
    """Checks cheap enough to run before a command imports torch: a missing --data path (train, eval) is
    reported at once instead of after seconds of imports. The full checks still run later."""
    if name not in ("train", "eval", "explain") or "-h" in argv or "--help" in argv:
        return
    for flag in ("--data", "--val-data"):
        value = _flag_value(argv, flag)
        stream = name == "train" and flag == "--data" and value and (
            value.startswith("pipe:") or "://" in value or ".tar" in value)  # shards: checked when read
        if value and not stream and not os.path.exists(os.path.expanduser(value)):
            raise MineralNetError(f"data path {value} does not exist; expected one sub-folder per mineral "
                                  f"(DIR/quartz/*.jpg) or a CSV with columns path,label")


def run_command(name: str, argv: list[str], prog: str | None = None) -> int:
    module_name, help_ = COMMANDS[name]
    try:
        fast_checks(name, argv)
    except MineralNetError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{(prog or 'mineralnet').split()[0]}: error: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog=prog or f"mineralnet {name}", description=help_[0].upper() + help_[1:] + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module = importlib.import_module(module_name)
    _hook(module, name, "add")(parser)
    args = parser.parse_args(argv)
    try:
        return int(_hook(module, name, "run")(args) or 0)
    except MineralNetError as e:
        # Under a multi-process launch every rank hits the same bad input: one line, from rank 0.
        if os.environ.get("RANK", "0") == "0":
            print(f"{parser.prog.split()[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog.split()[0]}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), end="", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0
    if argv[0] == "--version":
        print(f"mineralnet {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(_usage(), end="", file=sys.stderr)
        print(f"mineralnet: error: unknown command {argv[0]!r}; choose one of: "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of launch/train.py (same flags as `mineralnet train`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("train", argv, prog="train.py")


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of ``mineralnet-export``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("export", argv, prog="mineralnet-export")


if __name__ == "__main__":
    sys.exit(main())
