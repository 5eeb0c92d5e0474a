"""Training: `fit(cfg)` runs one training; the parts are public for benchmarks and tests.

    state.py   LRControl, Progress, StopFlag, ModelEma, build_optimizer
    inputs.py  prepare_data (scan, split, statistics), build_loaders
    loop.py    train_one_epoch, fresh_accelerator (validation predicts through mineralnet.infer.loop)
    fit.py     setup() -> TrainParts, fit(): train -> validate -> end of epoch -> budget
    cli.py     the `mineralnet train` command (resolve_resume; it ends by calibrating the run)
"""
from mineralnet.train.fit import TrainParts, fit, make_accelerator, save_checkpoint, setup
from mineralnet.train.inputs import DataSplit, build_loaders, prepare_data
from mineralnet.train.loop import any_process, fresh_accelerator, train_one_epoch
from mineralnet.train.state import LRControl, ModelEma, Progress, StopFlag, build_optimizer

__all__ = ["DataSplit", "LRControl", "ModelEma", "Progress", "StopFlag", "TrainParts", "any_process",
           "build_loaders", "build_optimizer", "fit", "fresh_accelerator", "make_accelerator",
           "prepare_data", "save_checkpoint", "setup", "train_one_epoch"]
