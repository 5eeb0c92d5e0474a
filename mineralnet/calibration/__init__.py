"""Unknown-mineral detection, temperature scaling and conformal candidate sets for a trained run.

    calibrate_run("runs/exp1")          # writes runs/exp1/calibration.json + calibration.safetensors
    Calibration.load("runs/exp1").answer({"logits": ..., "embedding": ...}, coverage=0.9)

`mineralnet calibrate RUN` is the command line (mineralnet/calibration/cli.py).
"""
from mineralnet.calibration.core import DETECTORS
from mineralnet.calibration.fit import DEFAULT_ACCEPTANCE, DEFAULT_DETECTOR, calibrate_arrays, calibrate_run
from mineralnet.calibration.store import Calibration

__all__ = ["DETECTORS", "DEFAULT_ACCEPTANCE", "DEFAULT_DETECTOR", "Calibration", "calibrate_arrays", "calibrate_run"]
