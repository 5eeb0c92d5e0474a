#!/usr/bin/env python3
"""Name minerals in photos with an exported model on an edge device: numpy, Pillow and one runtime.

No PyTorch and no MineralNet install needed: copy this file and a `model.onnx` / `model.int8.onnx`
(onnxruntime) or `model[.fp16|.int8].tflite` (ai-edge-litert) written by `mineralnet-export`, then

    pip install numpy pillow onnxruntime      # or: pip install numpy pillow ai-edge-litert
    python edge_predict.py model.int8.onnx photo1.jpg photos/ --topk 3 [--json] [--coverage 0.9]
    python edge_predict.py model.int8.tflite photos/ --json

A `model[.int8].pte` runs too (pip install executorch), but ExecuTorch's Python runtime itself needs
PyTorch; on a phone the app calls ExecuTorch's Java/Swift runtime instead.

Class names and preprocessing are read from the model's own metadata; a model exported from a
calibrated run (`mineralnet calibrate RUN`) also carries its temperature, its "unknown mineral"
threshold on the graph's `novelty` output and its conformal scores, so each photo gets calibrated
probabilities, `unknown`, `novelty` and, with --coverage, a candidate set (as `mineralnet predict`). The preprocessing
reimplements MineralNet's evaluation transform (EXIF-upright RGB; integer block-average shrink
of photos >= 2x `resize`, shorter side resized to `resize` bilinearly, centre crop, x/255,
(x - mean)/std) with numpy in OpenCV's own fixed-point arithmetic: pixels are identical except
for rare +-1 grey levels at the border rows of enlarged photos (tests/test_export.py checks it,
and that the probabilities match MineralNet's predictor).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112


# ----------------------------------------------------------------------------- decoding
def load_rgb(path: str, min_size: int | None = None) -> np.ndarray:
    """Photo -> upright (H, W, 3) uint8 RGB; alpha composited on white.

    Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when the shorter side
    stays >= min_size, exactly as MineralNet does.
    """
    im = Image.open(path)
    if im.format == "JPEG" and min_size:
        w, h = im.size
        factor = 1
        while factor < 8 and min(w, h) // (factor * 2) >= min_size:
            factor *= 2
        if factor > 1:
            im.draft("RGB", (w // factor, h // factor))
    im.load()
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        orientation = 1
    a = _to_rgb(im)
    return np.ascontiguousarray(_upright(a, orientation))


def _upright(a: np.ndarray, orientation: int) -> np.ndarray:
    t = lambda x: x.transpose(1, 0, 2)  # noqa: E731
    return {2: lambda: a[:, ::-1], 3: lambda: a[::-1, ::-1], 4: lambda: a[::-1], 5: lambda: t(a),
            6: lambda: t(a)[:, ::-1], 7: lambda: t(a)[::-1, ::-1], 8: lambda: t(a)[::-1]}.get(orientation, lambda: a)()


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I") or mode == "F":  # 16-bit / float greyscale
        a = np.asarray(im)
        if mode == "F":
            a = np.clip(a, 0, 1 if a.max() <= 1.0 else 255) * (255 if a.max() <= 1.0 else 1)
            grey = np.rint(a).astype(np.uint8)
        else:
            grey = ((np.clip(a.astype(np.int64), 0, 65535) + 128) // 257).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa") or (mode == "L" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        a = np.asarray(im).astype(np.uint16)
        alpha = a[:, :, 3:]
        return ((a[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


# ----------------------------------------------------------------------------- preprocessing
def _bilinear_taps(n_in: int, n_out: int):
    """One axis of OpenCV's INTER_LINEAR resize of uint8 images, in its own fixed-point arithmetic
    (half-pixel centres, edges clamped, 11-bit weights): output i = (w0[i] * input[i0[i]] +
    w1[i] * input[i1[i]]) / 2048. Returns (i0, i1, w0, w1)."""
    src = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    frac = src - i0.astype(np.float32)
    frac[i0 < 0], i0[i0 < 0] = 0.0, 0
    frac[i0 >= n_in - 1], i0[i0 >= n_in - 1] = 0.0, n_in - 1
    w0 = np.rint((np.float32(1) - frac) * np.float32(2048)).astype(np.int32)
    w1 = np.rint(frac * np.float32(2048)).astype(np.int32)
    return i0, np.minimum(i0 + 1, n_in - 1), w0, w1


def _shrink(img: np.ndarray, k: int) -> np.ndarray:
    """Average k x k blocks as OpenCV's integer INTER_AREA does; the last < k rows/columns are dropped."""
    h, w = img.shape[0] // k, img.shape[1] // k
    sums = img[:h * k, :w * k].reshape(h, k, w, k, 3).astype(np.int32).sum(axis=(1, 3))
    if k == 2:  # OpenCV's 2x2 kernel rounds half up; larger blocks multiply by 1/k^2 in float
        return ((sums + 2) >> 2).astype(np.uint8)
    return np.rint(sums.astype(np.float32) * np.float32(1.0 / (k * k))).astype(np.uint8)


class Preprocess:
    """(H, W, 3) uint8 RGB -> (3, S, S) float32: MineralNet's evaluation transform.

    A photo at least twice `resize` is first shrunk by the integer factor with block averaging
    (anti-aliasing), then the shorter side is resized to `resize` bilinearly, then centre-cropped
    to S x S and normalised.
    """

    def __init__(self, image_size: int, resize: int, mean, std):
        self.size, self.resize = int(image_size), int(resize)
        self.luts = [(np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(m)) / np.float32(s)
                     for m, s in zip(mean, std)]

    def __call__(self, img: np.ndarray) -> np.ndarray:
        k = int(min(img.shape[:2]) / self.resize)
        if k > 1:
            img = _shrink(img, k)
        H, W = img.shape[:2]
        s = self.resize / min(H, W)
        nh, nw = max(1, round(H * s)), max(1, round(W * s))
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        if (nh, nw) == (H, W):
            crop = img[top:top + self.size, left:left + self.size]
        else:  # resize only the rows/columns that survive the centre crop
            y0, y1, b0, b1 = (t[top:top + self.size] for t in _bilinear_taps(H, nh))
            x0, x1, a0, a1 = (t[left:left + self.size] for t in _bilinear_taps(W, nw))
            src = img.astype(np.int32)
            cols = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]  # (H, S, 3), x2048
            # OpenCV's vertical pass: ((b0 * (c0 >> 4)) >> 16) + ((b1 * (c1 >> 4)) >> 16), then (+2) >> 2
            acc = (((b0[:, None, None] * (cols[y0] >> 4)) >> 16)
                   + ((b1[:, None, None] * (cols[y1] >> 4)) >> 16))
            crop = np.clip((acc + 2) >> 2, 0, 255).astype(np.uint8)
        return np.stack([self.luts[c][crop[:, :, c]] for c in range(3)])


# ----------------------------------------------------------------------------- model
def _sidecar(path: str) -> dict:
    """`<model>.json` beside a phone model (written by mineralnet-export with every .tflite/.pte)."""
    try:
        with open(path + ".json") as f:
            return json.load(f)
    except OSError:
        return {}


class _LiteRT:
    """A .tflite in the LiteRT interpreter (pip install ai-edge-litert); int8 I/O (de)quantized here."""

    def __init__(self, path: str, threads: int | None):
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.interpreter import Interpreter

        with open(path, "rb") as f:
            data = f.read()
        model, self.meta = schema.Model.GetRootAs(data, 0), {}
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() in (b"mineralnet", "mineralnet"):
                self.meta = json.loads(bytes(model.Buffers(entry.Buffer()).DataAsNumpy()).decode())
        self.meta = self.meta or _sidecar(path)
        it = Interpreter(model_content=data, num_threads=threads)
        self.runner = it.get_signature_runner(next(iter(it.get_signature_list())))
        (self.input_name, self.input), = self.runner.get_input_details().items()
        details = self.runner.get_output_details()  # output_0..output_k = meta["outputs"] in order
        self.outs = [(n, details[n]) for n in sorted(details, key=lambda n: int(n.rsplit("_", 1)[-1]))]
        self.batch = int(self.input["shape"][0])

    def run(self, x: np.ndarray) -> list:
        if np.issubdtype(self.input["dtype"], np.integer):  # full-integer model: quantize the input
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(self.input["dtype"])
        result = self.runner(**{self.input_name: x})
        values = []
        for name, d in self.outs:
            v = result[name]
            if np.issubdtype(d["dtype"], np.integer):
                scale, zero = d["quantization"]
                v = (v.astype(np.float32) - zero) * np.float32(scale)
            values.append(v)
        return values


class _ExecuTorch:
    """A .pte in ExecuTorch's Python runtime (pip install executorch; its pybindings need torch)."""

    def __init__(self, path: str, threads: int | None):
        from executorch.runtime import Runtime

        with open(path, "rb") as f:
            program = Runtime.get().load_program(f.read())
        self.meta = {}
        if "mineralnet_metadata" in program.method_names:
            self.meta = json.loads(program.load_method("mineralnet_metadata").execute([])[0])
        self.meta = self.meta or _sidecar(path)
        self.method = program.load_method("forward")
        self.batch = int((self.meta.get("batch") or {}).get("size") or 1)

    def run(self, x: np.ndarray) -> list:
        import torch

        return [v.numpy() for v in self.method.execute([torch.from_numpy(x)])]


class EdgeModel:
    """An .onnx (ONNX Runtime), .tflite (LiteRT) or .pte (ExecuTorch) file from mineralnet-export, with its
    metadata."""

    def __init__(self, path: str, threads: int | None = None, providers=None):
        if path.lower().endswith((".tflite", ".pte")):
            phone = (_LiteRT if path.lower().endswith(".tflite") else _ExecuTorch)(path, threads)
            meta, self.batch, self.output_names = phone.meta, phone.batch, list(phone.meta.get("outputs", []))
            self._run = phone.run
        else:
            meta = self._open_onnx(path, threads, providers)
        missing = {"classes", "image_size", "resize", "mean", "std"} - set(meta)
        if missing:
            raise ValueError(f"{path} lacks metadata {sorted(missing)}; export it with mineralnet-export")
        self.classes, self.precision = meta["classes"], meta.get("precision", "?")
        self.calibration = meta.get("calibration")  # None: plain softmax, unknown null
        self.preprocess = Preprocess(meta["image_size"], meta["resize"], meta["mean"], meta["std"])

    def _open_onnx(self, path: str, threads, providers) -> dict:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])
        quant = json.loads(self.session.get_modelmeta().custom_metadata_map.get("quantization") or "{}")
        if quant.get("onnxruntime_optimization") == "disable":
            # the int8 model exported for TensorRT: ONNX Runtime's optimiser miscomputes its fp16 Q/DQ graph
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self.session = ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])
        meta = {k: json.loads(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                if k in ("classes", "image_size", "resize", "mean", "std", "precision", "calibration")}
        inp = self.session.get_inputs()[0]
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._run = lambda x: self.session.run(None, {inp.name: x})
        return meta

    def outputs(self, images: np.ndarray) -> dict:
        """(N, 3, S, S) float32 -> {output name: (N, ...) array}, in chunks of the model's batch."""
        step = self.batch or 16
        parts = {}
        for start in range(0, len(images), step):
            x = images[start:start + step]
            n = len(x)
            if self.batch and n < self.batch:
                x = np.concatenate([x, np.repeat(x[-1:], self.batch - n, axis=0)])
            for name, value in zip(self.output_names, self._run(x)):
                parts.setdefault(name, []).append(value[:n])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def probabilities(self, images: np.ndarray, out: dict | None = None) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, num_classes) probabilities (temperature-scaled when calibrated)."""
        out = self.outputs(images) if out is None else out
        t = float(self.calibration["temperature"]) if self.calibration else 1.0
        if "logits" in out:
            z = out["logits"].astype(np.float64) / t
        elif self.calibration:
            z = np.log(np.maximum(out["probs"].astype(np.float64), 1e-30)) / t
        else:
            return out["probs"].astype(np.float32)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def candidate_sets(self, probs: np.ndarray, coverage: float) -> list:
        """Split-conformal APS/RAPS sets: classes in descending probability while the cumulative
        mass (+ lam per rank past k_reg) is at most the calibration quantile; the top-1 always."""
        c = self.calibration["conformal"]
        scores = np.sort(np.asarray(c["scores"], np.float64))
        k = int(np.ceil((len(scores) + 1) * coverage - 1e-9))
        qhat = np.inf
        if k <= len(scores):  # the k-th score, half-way to the next distinct one (as MineralNet does)
            above = scores[k:][scores[k:] > scores[k - 1]]
            qhat = (scores[k - 1] + above[0]) / 2 if len(above) else scores[k - 1] + 1e-6 * max(1.0, abs(scores[k - 1]))
        order = np.argsort(-probs, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
        cum = cum + float(c["lam"]) * np.maximum(0, np.arange(1, probs.shape[1] + 1) - int(c["k_reg"]))[None, :]
        keep = cum <= qhat
        keep[:, 0] = True
        return [[self.classes[i] for i, m in zip(o, row) if m] for o, row in zip(order, keep)]

    def predict(self, paths, topk: int = 3, coverage: float | None = None):
        x = np.stack([self.preprocess(load_rgb(p, self.preprocess.resize)) for p in paths])
        out = self.outputs(x)
        probs = self.probabilities(x, out)
        novelty = out.get("novelty") if self.calibration else None
        sets = self.candidate_sets(probs, coverage) if coverage is not None else None
        k = max(1, min(topk, len(self.classes)))
        records = []
        for n, (p, row) in enumerate(zip(paths, probs)):
            r = {"file": p, "top": [{"label": self.classes[i], "prob": round(float(row[i]), 6)}
                                    for i in np.argsort(-row, kind="stable")[:k]],
                 "unknown": None if novelty is None else bool(novelty[n] > self.calibration["threshold"]),
                 "novelty": None if novelty is None else round(float(novelty[n]), 6)}
            if sets is not None:
                r["set"] = sets[n]
            records.append(r)
        return records


def expand(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, files in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out += sorted(os.path.join(dirpath, f) for f in files
                              if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"image {p!r} does not exist")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="edge_predict.py", description=__doc__.splitlines()[0])
    parser.add_argument("model", help=".onnx, .tflite or .pte file written by mineralnet-export")
    parser.add_argument("images", nargs="+", help="photos or folders of photos")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (ONNX Runtime, LiteRT)")
    parser.add_argument("--coverage", type=float, default=None,
                        help="also print the candidate set holding the true mineral with this probability (e.g. 0.9)")
    args = parser.parse_args(argv)
    try:
        images = expand(args.images)
        model = EdgeModel(args.model, threads=args.threads)
        if args.coverage is not None and not (model.calibration and 0 < args.coverage < 1):
            raise ValueError(f"--coverage {args.coverage} needs a coverage in (0, 1) and a model exported from a "
                             f"calibrated run (`mineralnet calibrate RUN`, then export again)")
        results = model.predict(images, args.topk, args.coverage)
    except Exception as e:  # one line, not a traceback, on a device without a developer at hand
        print(f"edge_predict: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    if args.json:
        doc = {"model": args.model, "precision": model.precision, "calibrated": bool(model.calibration)}
        if not model.calibration:
            doc["note"] = "the model has no calibration: `unknown` is null; calibrate the run and export again"
        print(json.dumps({**doc, "predictions": results}, indent=2))
    else:
        for r in results:
            flag = "" if r["unknown"] is None else ("  UNKNOWN?" if r["unknown"] else "  known")
            cands = f"  set {{{', '.join(r['set'])}}}" if "set" in r else ""
            print(f"{r['file']}  " + "  ".join(f"{t['label']} {t['prob']:6.1%}" for t in r["top"]) + flag + cands)
    return 0


if __name__ == "__main__":
    sys.exit(main())
