"""What every format's `write(ctx)` gets: the run, its loaded model, the check photos, the options,
the output folder, and the files written so far in this export.

    ctx = ExportContext(run, options, formats=["onnx", "int8"])
    ctx.model, ctx.meta, ctx.novelty     # FusionNet, its model.json (+ the open-set calibration), detector
    ctx.check_images()                   # photos the gates compare on (--val-data, quantization photos, the run's
                                         # validation photos, else synthetic)
    ctx.quantization_photos()            # the photos int8 ranges are measured on (--calib-data)
    ctx.save(name, data, record)         # atomic write + one record in model.json

"Calibration" in MineralNet means the open-set calibration of a run (temperature, unknown threshold,
conformal sets); the photos int8 ranges are measured on are the *quantization photos* (`quant_*` options,
CLI `--calib-data/--calib-size/--calib-method`, also spelled `--quant-data/--quant-size/--quant-method`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mineralnet.data import list_images
from mineralnet.errors import MineralNetError
from mineralnet.export import metadata
from mineralnet.export.onnx import DEFAULT_OPSET, DEFAULT_OUTPUTS, parse_outputs
from mineralnet.infer.tensorrt import DEFAULT_WORKSPACE_MIB, BatchProfile

CHECK_IMAGES = 32  # images for the parity gate / int8 agreement when no --val-data is given


@dataclass
class ExportOptions:
    """Knobs of `export()`; the CLI fills them from its flags."""

    out_dir: str | os.PathLike | None = None  # default: RUN/export
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    profile: BatchProfile = field(default_factory=lambda: BatchProfile.static(1))
    opset: int = DEFAULT_OPSET
    quant_data: str | os.PathLike | None = None  # --calib-data: the quantization photos of int8
    # --calib-size: how many of them, spread over the folder (None: all up to quantize.exporting.DEFAULT_CALIB_SIZE)
    quant_size: int | None = None
    quant_method: str = "minmax"  # --calib-method: the TensorRT flavour's ranges (the CPU flavour chooses by measurement)
    int8_activations: str | None = None  # None: int8 when a TensorRT engine is asked for, else uint8
    int8_gate: str = "drop=1,bound=2"  # quantize.stats.parse_gate: accuracy drop and its upper 95% bound (points)
    int8_fallback: str = "auto"  # "auto": sensitive nodes (ranking photos) back to float; "off": full int8
    int8_min_share: float = 0.8  # the fallback never leaves under this share of the MACs int8 (fallback.MIN_INT8_SHARE)
    int8_search: bool = True  # choose the int8 recipe on the selection photos
    report: bool = False  # add the sensitivity ranking to model.int8.report.*
    val_data: str | os.PathLike | None = None  # held-out labelled photos (default: the run's validation split)
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    timing_cache: str | os.PathLike | None = None  # default: OUT/timing.cache
    openvino_int8: str = "qdq"  # int8 IR from model.int8.onnx ("qdq") or NNCF on the quantization photos
    tflite_int8: str = "float-tail"  # model.int8.tflite: int8 backbone, float tail and I/O; or "full" integer
    triton_dir: str | os.PathLike | None = None  # --triton DIR: the model repository
    triton_instances: int = 1  # instances per model in config.pbtxt
    triton_kind: str = "gpu"  # instance kind of the ONNX models (engines always run on the GPU)


@dataclass
class Artifact:
    """One written file (or Triton model folder) and its record in model.json."""

    path: Path
    record: dict

    def line(self) -> str:
        r = self.record
        notes = [r["precision"], f"{r['bytes'] / 1e6:.1f} MB"]
        if "parity" in r:
            p = r["parity"]
            d = p["max_abs_diff"].get("logits", max(p["max_abs_diff"].values()))
            ties = p["images"] - p["top1_required"]
            notes.append(f"max|d logit| {d:.1e} on {p['images']} {p['source']}, top-1 identical "
                         f"{p['top1_equal']}/{p['top1_required']}" + (f" ({ties} fp16 near-ties exempt)" if ties else ""))
        if "int8" in r and "gate" in r["int8"]:
            notes.append(r["int8"]["gate"]["line"])
        elif "int8" in r:
            q = r["int8"]
            notes.append(f"top-1 agreement with fp32 {q['agreement']['top1']:.1%} on {q['agreement']['images']} "
                         f"{q['agreement']['source']}")
            if "accuracy" in q:
                a = q["accuracy"]
                notes.append(f"accuracy fp32 {a['fp32']:.2%} / int8 {a['int8']:.2%} on {a['images']} photos")
        return f"wrote {self.path} ({'; '.join(notes)})"


def spread(items: Sequence, n: int) -> list:
    """`n` items evenly spaced over the sorted list (so every class folder is represented)."""
    if n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def existing_images(folder, flag: str) -> list[str]:
    """The photos under `folder`, or one clear error naming the flag."""
    p = Path(os.path.expanduser(os.fspath(folder)))
    if not p.is_dir():
        raise MineralNetError(f"{flag} {os.fspath(folder)!r} is not a folder; pass a folder of photos "
                              f"(class sub-folders are fine)")
    found = list_images(p)
    if not found:
        raise MineralNetError(f"{flag} {os.fspath(folder)!r} holds no images; pass a folder of photos")
    return found


def synthetic_photos(meta: dict, n: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Deterministic stand-in photos (smooth colour fields + texture) of varied sizes and aspect."""
    rng = np.random.default_rng(seed)
    base = int(meta["resize"])
    photos = []
    for _ in range(n):
        h = int(base * rng.uniform(1.0, 1.6))
        w = int(base * rng.uniform(1.0, 1.6))
        coarse = rng.uniform(0, 255, (4, 5, 3))
        ys, xs = np.linspace(0, 3, h)[:, None], np.linspace(0, 4, w)[None, :]
        y0, x0 = np.floor(ys).astype(int).clip(0, 2), np.floor(xs).astype(int).clip(0, 3)
        fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
        field_ = (coarse[y0, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1, x0] * fy * (1 - fx)
                  + coarse[y0, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1, x0 + 1] * fy * fx)
        photos.append(np.clip(field_ + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return photos


class ExportContext:
    """The model, its metadata, the photos and the files shared by the format writers of one export."""

    def __init__(self, run, options: ExportOptions, formats: Sequence[str] = ("onnx",)):
        from mineralnet.infer import Preprocessor
        from mineralnet.artifact import load_model
        from mineralnet.runs import RunDir, run_folder

        self.run = Path(run)
        self.model, self.meta = load_model(run)
        self.options = options
        self.formats = tuple(formats)  # the rows of the table asked for (writers may depend on each other's)
        out = options.out_dir or RunDir(run_folder(self.run)).export_dir
        self.out_dir = Path(os.path.expanduser(os.fspath(out)))
        self.preprocess = Preprocessor(self.meta)
        self.files: dict[str, Path] = {}  # precision -> ONNX file written by this export
        self.quantization_source: str | None = None  # set by quantization_photos()
        self.artifacts: list[Artifact] = []
        self.novelty = self._open_set_calibration()
        self._check: tuple[np.ndarray, str] | None = None
        self.log = lambda line: None  # export() passes its log (the int8 recipe search reports through it)

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def _open_set_calibration(self):
        """A calibrated run exports its detector as a `novelty` output and its temperature, threshold
        and conformal scores in the metadata; returns the detector module (or None)."""
        from mineralnet.calibration.store import Calibration

        cal = Calibration.load(self.run)
        if cal is None:
            if "novelty" in self.options.outputs:
                raise MineralNetError(f"--outputs novelty needs a calibrated run; run `mineralnet calibrate "
                                      f"{self.run}` first")
            return None
        self.meta = {**self.meta, "calibration": cal.public()}
        # a copy: the caller's ExportOptions stay as given
        self.options = dataclasses.replace(self.options, outputs=parse_outputs((*self.options.outputs, "novelty")))
        return cal.graph_module()

    def check_images(self) -> tuple[np.ndarray, str]:
        """(N, 3, S, S) images for the gates, and where they came from."""
        if self._check is None:
            o = self.options
            for folder, flag in ((o.val_data, "--val-data"), (o.quant_data, "--calib-data")):
                if folder:
                    images, _ = self.load(spread(existing_images(folder, flag), CHECK_IMAGES))
                    if len(images):
                        self._check = (images, f"{flag} photos")
                        break
            else:
                # the run's own validation photos where they are still on disk: stand-in images are
                # off-distribution, where fp16 rounding grows beyond what a photo ever sees
                images, _ = self.load(spread(self.run_photos(), CHECK_IMAGES))
                self._check = ((images, "validation photos of the run") if len(images) else
                               (self.preprocess.batch(synthetic_photos(self.meta)), "synthetic images"))
        return self._check

    def run_photos(self) -> list[str]:
        """The labelled validation photos recorded in the run's split that exist on this machine."""
        from mineralnet.runs import read_split_if_any, split_photos

        return [p for p, _ in split_photos(read_split_if_any(self.run), "val")]

    def load(self, paths: Sequence[str]) -> tuple[np.ndarray, int]:
        """Preprocessed images, skipping files that do not decode -> (array, number skipped)."""
        from mineralnet.data import ImageDecodeError

        arrays, skipped = [], 0
        for p in paths:
            try:
                arrays.append(self.preprocess(p))
            except ImageDecodeError:
                skipped += 1
        if not arrays:
            return np.zeros((0, 3, self.meta["image_size"], self.meta["image_size"]), np.float32), skipped
        return np.stack(arrays), skipped

    def quantization_photos(self) -> tuple[np.ndarray, int]:
        """((N, 3, S, S) quantization photos through the eval preprocessing, skipped): quant_size photos spread
        over quant_data (default: the run's training photos), never the held-out photos the int8 gate judges
        (`quantize.exporting.plan_photos`)."""
        from mineralnet.quantize.exporting import plan_photos

        o = self.options
        plan = plan_photos(self.run, self.meta["classes"], calib_data=o.quant_data, calib_size=o.quant_size,
                           val_data=o.val_data)
        images, skipped = self.load(plan.calib)
        self.quantization_source = plan.calib_source  # e.g. "training photos of the run (512 of 1324)"
        if not len(images):
            raise MineralNetError(f"none of the {len(plan.calib)} quantization photos ({plan.calib_source}) could be "
                                  f"decoded; pass a folder of readable photos with --calib-data DIR")
        return images, skipped

    def batch_info(self) -> dict:
        p = self.options.profile
        return {"dynamic": p.dynamic, "size": None if p.dynamic else p.max, "min": p.min, "opt": p.opt,
                "max": p.max}

    def input_shape(self) -> list:
        s = self.meta["image_size"]
        return ["batch" if self.options.profile.dynamic else self.options.profile.max, 3, s, s]

    def save(self, name: str, data: bytes, record: dict) -> Artifact:
        """Write a checked file atomically and add its record to the manifest (model.json)."""
        from mineralnet.files import atomic_write_bytes

        path = self.path(name)
        atomic_write_bytes(path, data)
        record = metadata.file_record(name, data, record)
        metadata.update_manifest(self.path(metadata.MANIFEST), self.meta, self.run, name, record)
        return Artifact(path, record)
