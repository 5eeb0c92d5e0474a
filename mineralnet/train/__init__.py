"""Training: `fit(cfg)` runs one training; the parts are public for benchmarks and tests.

    state.py   LRControl, Progress, StopFlag, ModelEma, build_optimizer
    inputs.py  prepare_data (scan, split, statistics), build_loaders
    loop.py    train_one_epoch, evaluate (the one prediction loop), fresh_accelerator
    fit.py     setup() -> TrainParts, fit(): train -> validate -> end of epoch -> budget
    cli.py     the `mineralnet train` command
"""
from mineralnet.train.cli import resolve_resume
from mineralnet.train.fit import TrainParts, fit, make_accelerator, save_checkpoint, setup
from mineralnet.train.inputs import DataSplit, build_loaders, prepare_data
from mineralnet.train.loop import any_process, evaluate, fresh_accelerator, train_one_epoch
from mineralnet.train.state import LRControl, ModelEma, Progress, StopFlag, build_optimizer

__all__ = ["DataSplit", "LRControl", "ModelEma", "Progress", "StopFlag", "TrainParts", "any_process",
           "build_loaders", "build_optimizer", "evaluate", "fit", "fresh_accelerator", "make_accelerator",
           "prepare_data", "resolve_resume", "save_checkpoint", "setup", "train_one_epoch"]
