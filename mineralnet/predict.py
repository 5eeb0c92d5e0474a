"""Name the minerals in photos with any exported form of a model: `mineralnet predict`, `Predictor`.

    Predictor("runs/exp1")                      # run directory (PyTorch)
    Predictor("runs/exp1/export/model.onnx")    # ONNX Runtime (fp32, fp16 or int8)
    Predictor("runs/exp1/export/model.engine")  # TensorRT engine (+ model.engine.json beside it)

The preprocessing always comes from the model's own metadata (model.json, the ONNX
metadata_props, or the engine's JSON sidecar) and is the evaluation transform of
`mineralnet.data`, so a photo gets the same numbers here as in `mineralnet eval`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mineralnet.errors import MineralNetError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


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
        from mineralnet.export.onnx import ort_session, parse_metadata

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


def open_backend(path, *, device: str | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None):
    """The backend for a run directory / .safetensors / model.json, an .onnx file or an engine."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise MineralNetError(f"model {str(p)!r} does not exist; pass a run directory, an .onnx file from "
                              f"mineralnet-export, or a TensorRT engine ({'/'.join(ENGINE_SUFFIXES)})")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return OnnxBackend(p, providers=providers, threads=threads)
    if suffix in ENGINE_SUFFIXES:
        return TensorRTBackend(p)
    if p.is_dir() or suffix in (".safetensors", ".json"):
        return TorchBackend(p, device=device)
    raise MineralNetError(f"model {str(p)!r}: unknown kind; pass a run directory (model.safetensors + "
                          f"model.json), an .onnx file or a TensorRT engine ({'/'.join(ENGINE_SUFFIXES)})")


# ----------------------------------------------------------------------------- predictor
@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), best first
    probs: np.ndarray  # (num_classes,)

    def to_dict(self) -> dict:
        return {"image": self.image,
                "top": [{"class": name, "prob": round(float(p), 6)} for name, p in self.top]}


class Predictor:
    """One interface to a model in any of its forms.

    Args:
        model: run directory (or its model.safetensors / model.json), .onnx file, or TensorRT
            engine (.engine/.plan, with its .json sidecar).
        device: PyTorch device for run directories (default CUDA when available).
        providers: ONNX Runtime execution providers (default CUDA when installed, then CPU).
    """

    def __init__(self, model, *, device: str | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        self.path = os.fspath(model)
        self.backend = open_backend(model, device=device, providers=providers, threads=threads)
        self.meta = self.backend.meta
        self.classes: list[str] = list(self.meta["classes"])
        self.preprocess = Preprocessor(self.meta)

    @property
    def kind(self) -> str:
        return self.backend.kind

    def outputs(self, images: Sequence) -> dict[str, np.ndarray]:
        """Raw model outputs for photos (paths, arrays or PIL images) or a preprocessed (N,3,S,S) array."""
        x = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.preprocess.batch(images)
        return self.backend.run(np.ascontiguousarray(x, dtype=np.float32))

    def probabilities(self, images: Sequence) -> np.ndarray:
        """(N, num_classes) class probabilities."""
        out = self.outputs(images)
        if "probs" in out:
            return out["probs"].astype(np.float32)
        if "logits" in out:
            return softmax(out["logits"])
        raise MineralNetError(f"model {self.path!r} has only the outputs {', '.join(out)}; class probabilities "
                              f"need logits or probs: re-export with --outputs logits,probs")

    def predict(self, images: Sequence, topk: int = 3, batch_size: int = 32) -> list[Prediction]:
        """Top-k (class name, probability) for each photo."""
        topk = max(1, min(int(topk), len(self.classes)))
        results = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            probs = self.probabilities(chunk)
            for image, p in zip(chunk, probs):
                order = np.argsort(-p, kind="stable")[:topk]
                name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<array>"
                results.append(Prediction(name, [(self.classes[i], float(p[i])) for i in order], p))
        return results


# ----------------------------------------------------------------------------- command line
def expand_images(paths: Sequence[str]) -> list[str]:
    """Files as given; folders expand to the image files under them (sorted)."""
    from mineralnet.data import IMAGE_EXTENSIONS, list_images

    out: list[str] = []
    for raw in paths:
        p = Path(os.path.expanduser(raw))
        if p.is_dir():
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
    parser.add_argument("model", help="run directory, .onnx file from mineralnet-export, or TensorRT engine")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="photo files or folders of photos")
    parser.add_argument("--topk", type=int, default=3, help="how many minerals to list per photo (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, help="photos per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="PyTorch device for run directories (default cuda if present)")


def run(args) -> int:
    if args.topk < 1:
        raise MineralNetError(f"--topk {args.topk} must be at least 1")
    if args.batch_size < 1:
        raise MineralNetError(f"--batch-size {args.batch_size} must be at least 1")
    predictor = Predictor(args.model, device=args.device)  # a wrong model first: it is the first argument
    images = expand_images(args.images)
    results = predictor.predict(images, topk=args.topk, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": predictor.path, "runtime": predictor.kind,
                          "predictions": [r.to_dict() for r in results]}, indent=2))
        return 0
    width = min(60, max(len(r.image) for r in results))
    for r in results:
        tops = "  ".join(f"{name} {p:6.1%}" for name, p in r.top)
        print(f"{r.image:<{width}}  {tops}")
    return 0
