"""Name the minerals in photos with any form of a model: `Predictor`, `Prediction`, `Preprocessor`.

    Predictor("runs/exp1")                      # run directory (PyTorch)
    Predictor("runs/exp1/export/model.onnx")    # ONNX Runtime (fp32, fp16 or int8)
    Predictor("runs/exp1/export/model.engine")  # TensorRT engine (+ model.engine.json beside it)
    Predictor("runs/exp1/export/model.xml")     # OpenVINO IR (+ model.bin beside it), fp32 or int8
    Predictor("runs/exp1/export/model.tflite")  # LiteRT interpreter (fp32, fp16 or full-integer int8)
    Predictor("runs/exp1/export/model.pte")     # ExecuTorch runtime (XNNPACK, fp32 or int8)

The preprocessing always comes from the model's own metadata (model.json, the ONNX
metadata_props, the engine's JSON sidecar, the IR's rt_info, the metadata inside a .tflite/.pte)
and is the evaluation transform of `mineralnet.data`, so a photo gets the same numbers here as in `mineralnet eval`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.infer.backends import open_backend


def eval_transform(meta: dict):
    """The evaluation transform of a model, from its own metadata (image_size, mean, std, resize): the one
    builder that eval, calibration, explain, export and the Predictor use, so a photo gets the same
    numbers everywhere."""
    from mineralnet.data import build_transforms

    resize = meta.get("resize")
    return build_transforms(int(meta["image_size"]), meta["mean"], meta["std"], train=False,
                            resize=int(resize) if resize else None)


class Preprocessor:
    """Photo (path or (H, W, 3) uint8 RGB array) -> (3, S, S) float32, exactly as evaluation does."""

    def __init__(self, meta: dict):
        self.transform = eval_transform(meta)
        self.min_size = getattr(self.transform, "min_decode_size", None)

    def __call__(self, image) -> np.ndarray:
        from mineralnet.data import load_image

        if isinstance(image, (str, os.PathLike)):
            image = load_image(image, min_size=self.min_size)
        elif not isinstance(image, np.ndarray):  # a PIL image
            image = np.asarray(image.convert("RGB"))
        out = self.transform(image)
        return out.numpy() if hasattr(out, "numpy") else np.asarray(out, np.float32)

    def batch(self, images: Sequence) -> np.ndarray:
        """(N, 3, S, S) float32."""
        return np.stack([self(im) for im in images]) if len(images) else np.zeros((0, 3, 1, 1), np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


NO_CALIBRATION_NOTE = ("the model has no calibration: `unknown` is null and probabilities are the plain softmax; "
                       "run `mineralnet calibrate RUN` (and export again for ONNX/TensorRT)")


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), best first; calibrated when the model is
    probs: np.ndarray  # (num_classes,)
    novelty: float | None = None  # higher = less like the training minerals; None without calibration
    unknown: bool | None = None  # novelty above the run's threshold; None without calibration
    set: list[str] | None = None  # conformal candidate set (with a coverage), best first

    def to_dict(self) -> dict:
        d = {"file": self.image, "top": [{"label": name, "prob": round(float(p), 6)} for name, p in self.top],
             "unknown": self.unknown, "novelty": None if self.novelty is None else round(float(self.novelty), 6)}
        if self.set is not None:
            d["set"] = list(self.set)
        return d


def _calibration(backend, path):
    """The Calibration of a run directory, or the public part carried by an exported model, or None."""
    from mineralnet.calibration.store import Calibration

    if backend.kind == "pytorch":
        return Calibration.load(Path(path))
    public = backend.meta.get("calibration")
    return Calibration.from_public(public) if isinstance(public, dict) else None


class Predictor:
    """One interface to a model in any of its forms.

    Args:
        model: run directory (or its model.safetensors / model.json), .onnx file, TensorRT
            engine (.engine/.plan, with its .json sidecar), OpenVINO IR (.xml, with its .bin),
            LiteRT .tflite or ExecuTorch .pte.
        device: PyTorch device for run directories (default CUDA when available).
        providers: ONNX Runtime execution providers (default CUDA when installed, then CPU).
        precision: OpenVINO inference precision hint for an IR: fp32 (default), bf16 or fp16.
        runtime: "openvino" runs an .onnx file in OpenVINO rather than ONNX Runtime.

    With a calibration (`mineralnet calibrate RUN`; exported models carry it) probabilities are
    temperature-scaled and every prediction has `novelty`, `unknown` and, given a coverage, a
    conformal candidate `set`; without one, `unknown`/`novelty` are None and `note` says why.
    """

    def __init__(self, model, *, device: str | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None, precision: str | None = None, runtime: str | None = None,
                 tta: str | None = None):
        from mineralnet.infer.ensemble import Ensemble, is_ensemble
        from mineralnet.infer.tta import parse_tta

        self.tta = parse_tta(tta)
        self.path = os.fspath(model)
        self.ensemble = None
        if is_ensemble(model):
            if precision is not None or runtime is not None or providers is not None:
                raise MineralNetError(f"{self.path!r} is an ensemble of run directories; --precision/--runtime/"
                                      f"providers apply to exported models: drop them")
            self.ensemble = self.backend = Ensemble(model, Predictor, device=device, threads=threads)
            self.meta, self.classes, self.note = self.ensemble.meta, self.ensemble.classes, self.ensemble.note
            self.preprocess = None
            self.calibration = self.ensemble.calibration  # `mineralnet calibrate ENS`, else None
            return
        self.backend = open_backend(model, device=device, providers=providers, threads=threads,
                                    precision=precision, runtime=runtime)
        self.meta = self.backend.meta
        self.classes: list[str] = list(self.meta["classes"])
        self.preprocess = Preprocessor(self.meta)
        self.calibration = _calibration(self.backend, model)
        self.note = None if self.calibration is not None else NO_CALIBRATION_NOTE

    @property
    def kind(self) -> str:
        return self.backend.kind

    def outputs(self, images: Sequence) -> dict[str, np.ndarray]:
        """Raw model outputs for photos (paths, arrays or PIL images) or a preprocessed (N,3,S,S) array."""
        if self.ensemble is not None:
            return self.ensemble.outputs(images)
        x = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.preprocess.batch(images)
        return self.backend.run(np.ascontiguousarray(x, dtype=np.float32))

    def answers(self, images: Sequence, coverage: float | None = None) -> dict:
        """{"probs" (N, C), "novelty" (N,) or None, "unknown" (N,) or None, "sets" (with a coverage)};
        with `tta`, probs are averaged over the views of each photo (mineralnet.infer.tta)."""
        if self.tta:
            from mineralnet.infer.tta import tta_answers

            if coverage is not None:
                raise MineralNetError("--coverage with --tta: the candidate sets are calibrated on single views; "
                                      "drop one of them")
            return tta_answers(self.answers_once, images, self.tta)
        return self.answers_once(images, coverage)

    def answers_once(self, images: Sequence, coverage: float | None = None) -> dict:
        """`answers` on the photos as they are (no test-time augmentation)."""
        if self.ensemble is not None:
            return self.ensemble.answers(images, coverage)
        out = self.outputs(images)
        if self.calibration is not None:
            return self.calibration.answer(out, coverage=coverage)
        if coverage is not None:
            raise MineralNetError(f"--coverage needs a calibrated model; {NO_CALIBRATION_NOTE}")
        if "probs" in out:
            probs = out["probs"].astype(np.float32)
        elif "logits" in out:
            probs = softmax(out["logits"])
        else:
            raise MineralNetError(f"model {self.path!r} has only the outputs {', '.join(out)}; class probabilities "
                                  f"need logits or probs: re-export with --outputs logits,probs")
        return {"probs": probs, "novelty": None, "unknown": None}

    def probabilities(self, images: Sequence) -> np.ndarray:
        """(N, num_classes) class probabilities (temperature-scaled when the model is calibrated)."""
        return np.asarray(self.answers(images)["probs"], np.float32)

    def predict(self, images: Sequence, topk: int = 3, batch_size: int = 32, coverage: float | None = None
                ) -> list[Prediction]:
        """Top-k (class name, probability), novelty, unknown and (with `coverage`) the candidate set, for
        photos (paths, arrays or PIL images) or a preprocessed (N, 3, S, S) array (named "<array>")."""
        topk = max(1, min(int(topk), len(self.classes)))
        batch = isinstance(images, np.ndarray) and images.ndim == 4
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size] if batch else list(images[start:start + batch_size])
            ans = self.answers(chunk, coverage)
            for i, (image, p) in enumerate(zip(chunk, ans["probs"])):
                order = np.argsort(-p, kind="stable")[:topk]
                name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<array>"
                results.append(Prediction(
                    name, [(self.classes[j], float(p[j])) for j in order], np.asarray(p, np.float32),
                    novelty=None if ans["novelty"] is None else float(ans["novelty"][i]),
                    unknown=None if ans["unknown"] is None else bool(ans["unknown"][i]),
                    set=[self.classes[j] for j in ans["sets"][i]] if "sets" in ans else None))
        return results


def labelled_photos(data, classes: Sequence[str]) -> list[tuple[str, int]]:
    """[(path, label)] from a class-folder tree / CSV manifest (labels mapped onto `classes`), a
    DatasetIndex, or a list of (path, label) pairs."""
    if isinstance(data, (str, os.PathLike)):
        from mineralnet.data import scan_dataset

        return list(scan_dataset(data, verify=True, classes=list(classes)).samples)
    return list(getattr(data, "samples", data))


def score_photos(model, data, *, reference=None, batch_size: int = 32, **backend) -> dict:
    """Accuracy of a model in any form on labelled photos, and its top-1 agreement with a reference.

    Args:
        model: a Predictor, or what Predictor accepts (run dir, .onnx, engine, .xml), opened with
            `backend` (device, providers, threads, precision).
        data: labelled photos (see `labelled_photos`); photos that do not decode are skipped when
            a folder is scanned, as `mineralnet eval` does.
        reference: the reference's predictions on the same photos ((N,) class indices, e.g. the
            `preds` of this function for the PyTorch fp32 run dir), for the agreement.
    Returns:
        {"images", "top1", "mean_class_acc" (the paper's mAP, computed as `mineralnet eval` does),
        "agreement" (None without reference), "preds" (N,), "targets" (N,)}.
    """
    from mineralnet.metrics import compute_metrics

    predictor = model if isinstance(model, Predictor) else Predictor(model, **backend)
    samples = labelled_photos(data, predictor.classes)
    if not samples:
        raise MineralNetError(f"no readable labelled photos in {data!r}; pass a folder with one sub-folder "
                              f"per mineral named as the model's classes ({', '.join(predictor.classes)})")
    preds = np.concatenate([predictor.probabilities([p for p, _ in samples[i:i + batch_size]]).argmax(1)
                            for i in range(0, len(samples), batch_size)])
    targets = np.array([label for _, label in samples])
    metrics = compute_metrics(targets, preds, classes=predictor.classes)
    agreement = None
    if reference is not None:
        reference = np.asarray(reference).reshape(-1)
        if len(reference) != len(preds):
            raise MineralNetError(f"the reference has {len(reference)} predictions for {len(preds)} photos; "
                                  f"score the reference on the same photos")
        agreement = float((reference == preds).mean())
    return {"images": len(samples), "top1": float(metrics["top1"]), "mean_class_acc": float(metrics["mean_class_acc"]),
            "agreement": agreement, "preds": preds, "targets": targets}
