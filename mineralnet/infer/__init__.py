"""The inference layer: every runtime behind one interface, and everything that runs a trained model.

    backends.py   Backend interface, BACKENDS (the one suffix -> runtime table), model_kind, open_backend
    predictor.py  Preprocessor, Predictor, Prediction, score_photos
    loop.py       predict_loader: the one prediction loop over a DataLoader (eval, calibration, explain, ...)
    ort.py, tensorrt.py, openvino.py, litert.py, executorch.py, phone.py, metadata.py
                  the runtimes' runners and readers (export/ writes the files and checks them with these)
    cli.py        the `mineralnet predict` command

Layers: files/errors -> config/data/model/metrics/runs -> infer -> train/calibration/export/quantize -> analysis
/bench/app -> cli; nothing here imports from train/, calibration's fitting, export/ or above.
"""
from mineralnet.infer.backends import BACKENDS, Backend, ModelKind, model_kind, open_backend
from mineralnet.infer.loop import predict_loader
from mineralnet.infer.predictor import Prediction, Predictor, Preprocessor, labelled_photos, score_photos, softmax

__all__ = ["BACKENDS", "Backend", "ModelKind", "Prediction", "Predictor", "Preprocessor", "labelled_photos",
           "model_kind", "open_backend", "predict_loader", "score_photos", "softmax"]
