"""Name the minerals in photos with any exported form of a model: `mineralnet predict`, `Predictor`.

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

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mineralnet.errors import MineralNetError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
KINDS = "a run directory, an .onnx file from mineralnet-export, a TensorRT engine (.engine/.plan/.trt), an " \
        "OpenVINO IR (.xml + .bin), a LiteRT .tflite or an ExecuTorch .pte"


class Preprocessor:
    """Photo (path or (H, W, 3) uint8 RGB array) -> (3, S, S) float32, exactly as evaluation does."""

    def __init__(self, meta: dict):
        from mineralnet.data import build_transforms

        self.transform = build_transforms(int(meta["image_size"]), meta["mean"], meta["std"], train=False,
                                          resize=int(meta["resize"]))
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


# ----------------------------------------------------------------------------- backends
class TorchBackend:
    """A run directory or .safetensors file, in PyTorch (CUDA when available)."""

    kind = "pytorch"

    def __init__(self, path, device: str | None = None):
        import torch

        from mineralnet.runs import load_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.meta = load_model(path, map_location="cpu")
        self.model.to(self.device)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = {"logits": [], "embedding": []}
            for start in range(0, len(x), 32):
                xb = torch.from_numpy(x[start:start + 32]).to(self.device)
                fused = self.model.embed(xb)
                out["logits"].append(self.model.forward_head(fused).float().cpu().numpy())
                out["embedding"].append(fused.float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}


class OnnxBackend:
    """An .onnx file written by mineralnet-export, in ONNX Runtime."""

    kind = "onnx"

    def __init__(self, path, providers: Sequence[str] | None = None, threads: int | None = None):
        from mineralnet.export.metadata import parse_metadata
        from mineralnet.export.onnx import ort_session

        if providers is None:
            import onnxruntime as ort

            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort_session(path, providers=providers, threads=threads)
        self.meta = parse_metadata(self.session.get_modelmeta().custom_metadata_map)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        from mineralnet.export.onnx import run_session

        return run_session(self.session, x)


class TensorRTBackend:
    """A TensorRT engine (plain plan file) with its `<engine>.json` sidecar."""

    kind = "tensorrt"

    def __init__(self, path):
        from mineralnet.export.tensorrt import TRTRunner

        self.runner = TRTRunner(path)
        self.meta = self.runner.meta

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(x)


class OpenVinoBackend:
    """An OpenVINO IR (.xml + .bin) written by mineralnet-export, on the CPU.

    `precision` is OpenVINO's inference precision hint: fp32 (the default: the numbers the export
    gates checked), or bf16/fp16 where the CPU has those instructions.
    """

    kind = "openvino"

    def __init__(self, path, precision: str | None = None, threads: int | None = None):
        from mineralnet.export.ir import IRRunner

        self.runner = IRRunner(path, precision=precision or "fp32", threads=threads)
        self.meta = self.runner.meta

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(x)


class LiteRTBackend:
    """A .tflite file written by mineralnet-export, in the LiteRT interpreter (ai-edge-litert)."""

    kind = "litert"

    def __init__(self, path, threads: int | None = None):
        from mineralnet.export.tflite import LiteRTRunner

        self.runner = LiteRTRunner(path, threads=threads)
        self.meta = self.runner.meta

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(x)


class ExecuTorchBackend:
    """A .pte file written by mineralnet-export, in ExecuTorch's Python runtime (XNNPACK)."""

    kind = "executorch"

    def __init__(self, path):
        from mineralnet.export.executorch import ExecuTorchRunner

        self.runner = ExecuTorchRunner(path)
        self.meta = self.runner.meta

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(x)


def open_backend(path, *, device: str | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None, precision: str | None = None, runtime: str | None = None):
    """The backend for a run directory / .safetensors / model.json, an .onnx file, an engine or an IR.
    `runtime="openvino"` runs an .onnx file in OpenVINO (its ONNX reader) instead of ONNX Runtime."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise MineralNetError(f"model {str(p)!r} does not exist; pass {KINDS}")
    suffix = p.suffix.lower()
    if runtime is not None and (runtime != "openvino" or suffix not in (".onnx", ".xml")):
        raise MineralNetError(f"runtime {runtime!r} for {str(p)!r}: only 'openvino' can be chosen, for an .onnx "
                              f"file or an IR (.xml)")
    if runtime == "openvino":
        return OpenVinoBackend(p, precision=precision, threads=threads)
    if precision is not None and suffix != ".xml":
        raise MineralNetError(f"--precision {precision} is OpenVINO's runtime hint; {str(p)!r} is not an "
                              f"OpenVINO IR (.xml): drop --precision, or pass the IR")
    if suffix == ".onnx":
        return OnnxBackend(p, providers=providers, threads=threads)
    if suffix in ENGINE_SUFFIXES:
        return TensorRTBackend(p)
    if suffix == ".xml":
        return OpenVinoBackend(p, precision=precision, threads=threads)
    if suffix == ".tflite":
        return LiteRTBackend(p, threads=threads)
    if suffix == ".pte":
        return ExecuTorchBackend(p)
    if suffix in (".mlpackage", ".mlmodel"):
        raise MineralNetError(f"model {str(p)!r}: Core ML models run only on macOS/iOS (coremltools predict); "
                              f"on this machine use the .onnx, .tflite or .pte of the same export")
    if p.is_dir() or suffix in (".safetensors", ".json"):
        return TorchBackend(p, device=device)
    raise MineralNetError(f"model {str(p)!r}: unknown kind; pass {KINDS}")


# ----------------------------------------------------------------------------- predictor
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
    from mineralnet.calibration import Calibration

    if isinstance(backend, TorchBackend):
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
        from mineralnet.tta import parse_tta  # issue 30: test-time augmentation

        from mineralnet.ensemble.core import Ensemble, is_ensemble  # issue 30: an ensemble folder

        self.tta = parse_tta(tta)
        self.path = os.fspath(model)
        self.ensemble = None
        if is_ensemble(model):
            if precision is not None or runtime is not None or providers is not None:
                raise MineralNetError(f"{self.path!r} is an ensemble of run directories; --precision/--runtime/"
                                      f"providers apply to exported models: drop them")
            self.ensemble = self.backend = Ensemble(model, Predictor, device=device, threads=threads)
            self.meta, self.classes, self.note = self.ensemble.meta, self.ensemble.classes, self.ensemble.note
            self.preprocess = self.calibration = None
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
        if self.ensemble is not None:  # issue 30
            return self.ensemble.outputs(images)
        x = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.preprocess.batch(images)
        return self.backend.run(np.ascontiguousarray(x, dtype=np.float32))

    def answers(self, images: Sequence, coverage: float | None = None) -> dict:
        """{"probs" (N, C), "novelty" (N,) or None, "unknown" (N,) or None, "sets" (with a coverage)};
        with `tta`, probs are averaged over the views of each photo (mineralnet.tta)."""
        if self.tta:  # issue 30
            from mineralnet.tta import tta_answers

            if coverage is not None:
                raise MineralNetError("--coverage with --tta: the candidate sets are calibrated on single views; "
                                      "drop one of them")
            return tta_answers(self.answers_once, images, self.tta)
        return self.answers_once(images, coverage)

    def answers_once(self, images: Sequence, coverage: float | None = None) -> dict:
        """`answers` on the photos as they are (no test-time augmentation)."""
        if self.ensemble is not None:  # issue 30
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


# ----------------------------------------------------------------------------- command line
def expand_images(paths: Sequence[str]) -> list[str]:
    """Files as given; folders expand to the image files under them (sorted)."""
    from mineralnet.data import IMAGE_EXTENSIONS, list_images
    from mineralnet.data.scan import list_unsupported

    out: list[str] = []
    for raw in paths:
        p = Path(os.path.expanduser(raw))
        if p.is_dir():
            for path, reason in list_unsupported(p):  # never skipped silently
                print(f"skipping {path}: {reason}", file=sys.stderr)
            found = list_images(p)
            if not found:
                raise MineralNetError(f"folder {raw!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise MineralNetError(f"image {raw!r} does not exist; check the path (folders are searched for images)")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("model", help="run directory, .onnx file from mineralnet-export, TensorRT engine, "
                                      "OpenVINO IR (.xml + .bin), LiteRT .tflite or ExecuTorch .pte")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="photo files or folders of photos")
    parser.add_argument("--topk", type=int, default=3, help="how many minerals to list per photo (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, help="photos per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="PyTorch device for run directories (default cuda if present)")
    parser.add_argument("--coverage", type=float, default=None,
                        help="also give the smallest candidate set that holds the true mineral with this "
                             "probability (e.g. 0.9; needs a calibrated model)")
    from mineralnet.tta import HELP as TTA_HELP  # issue 30

    parser.add_argument("--tta", default=None, help=TTA_HELP)
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                        help="OpenVINO inference precision for an IR (default fp32; bf16/fp16 run faster on CPUs "
                             "that have them, with slightly different numbers)")


def run(args) -> int:
    if args.topk < 1:
        raise MineralNetError(f"--topk {args.topk} must be at least 1")
    if args.batch_size < 1:
        raise MineralNetError(f"--batch-size {args.batch_size} must be at least 1")
    if args.coverage is not None and not 0.0 < args.coverage < 1.0:
        raise MineralNetError(f"--coverage {args.coverage} must be between 0 and 1, e.g. 0.9")
    # a wrong model first: it is the first argument
    predictor = Predictor(args.model, device=args.device, precision=getattr(args, "precision", None),
                          tta=getattr(args, "tta", None))
    images = expand_images(args.images)
    results = predictor.predict(images, topk=args.topk, batch_size=args.batch_size, coverage=args.coverage)
    if args.json:
        doc = {"model": predictor.path, "runtime": predictor.kind, "calibrated": predictor.calibration is not None}
        if predictor.tta:  # issue 30
            doc["tta"] = list(predictor.tta)
        if predictor.note:
            doc["note"] = predictor.note
        if args.coverage is not None:
            doc["coverage"] = args.coverage
        print(json.dumps({**doc, "predictions": [r.to_dict() for r in results]}, indent=2))
        return 0
    if predictor.note:
        print(f"note: {predictor.note}", file=sys.stderr)
    width = min(60, max(len(r.image) for r in results))
    for r in results:
        tops = "  ".join(f"{name} {p:6.1%}" for name, p in r.top)
        flag = "" if r.unknown is None else ("  UNKNOWN?" if r.unknown else "  known") + f" (novelty {r.novelty:.3g})"
        cands = "" if r.set is None else f"  set {{{', '.join(r.set)}}}"
        print(f"{r.image:<{width}}  {tops}{flag}{cands}")
    return 0
