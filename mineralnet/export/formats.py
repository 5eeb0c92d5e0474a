"""The export pipeline: one small function per format, a table of formats, one `export()` call.

    export("runs/exp1", ["onnx", "int8"], ExportOptions(calib_data="photos/train"))

writes into RUN/export/ (or `out_dir`):

    model.onnx          fp32, parity-gated against PyTorch
    model.fp16.onnx     fp16 inside, float32 in and out, parity-gated with the fp16 tolerance
    model.int8.onnx     static QDQ int8, calibrated through the eval preprocessing; with --trt the
                        TensorRT flavour (symmetric int8 Q/DQ, float parts in fp16, opset 19)
    model[.fp16|.int8].engine (+ .engine.json)   strongly typed TensorRT plans from the file of
                        their precision, built on the NVIDIA device
    model[.int8].xml + .bin   OpenVINO IR from the ONNX files, gated like them (--openvino)
    model.json          the run's metadata plus one record per exported file

Every file is checked before it gets its final name: a failed gate leaves nothing behind.
"""
# Over 500 lines: the export table and every format's gate (fp32, fp16, int8, TensorRT, OpenVINO, Triton) in
# one place, so a reader sees what each file must pass; the format-specific code lives in its own module.
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mineralnet import __version__
from mineralnet.data import list_images
from mineralnet.errors import MineralNetError
from mineralnet.export import onnx as xonnx
from mineralnet.export import openvino as xov
from mineralnet.export import tensorrt as xtrt
from mineralnet.export import triton as xtriton
from mineralnet.export.tensorrt import BatchProfile

MANIFEST = "model.json"
CHECK_IMAGES = 32  # images for the parity gate / int8 agreement when no --val-data is given


@dataclass
class ExportOptions:
    """Knobs of `export()`; the CLI fills them from its flags."""

    out_dir: str | os.PathLike | None = None  # default: RUN/export
    outputs: tuple[str, ...] = xonnx.DEFAULT_OUTPUTS
    profile: BatchProfile = field(default_factory=lambda: BatchProfile.static(1))
    opset: int = xonnx.DEFAULT_OPSET
    calib_data: str | os.PathLike | None = None
    calib_size: int | None = None  # None: every photo up to quantize.exporting.DEFAULT_CALIB_SIZE (512)
    calib_method: str = "minmax"  # the TensorRT flavour's ranges (the CPU flavour chooses by measurement)
    int8_activations: str | None = None  # None: int8 when a TensorRT engine is asked for, else uint8
    int8_gate: str = "drop=1,bound=2"  # quantize.stats.parse_gate: accuracy drop and its upper 95% bound (points)
    int8_fallback: str = "off"  # "auto": sensitive nodes back to float until the gate holds
    int8_search: bool = True  # choose the calibration recipe on the selection photos
    report: bool = False  # add the sensitivity ranking to model.int8.report.*
    val_data: str | os.PathLike | None = None  # held-out labelled photos (default: the run's validation split)
    workspace_mib: int = xtrt.DEFAULT_WORKSPACE_MIB
    timing_cache: str | os.PathLike | None = None  # default: OUT/timing.cache
    openvino_int8: str = "qdq"  # int8 IR from model.int8.onnx ("qdq") or NNCF on the calibration photos
    triton_dir: str | os.PathLike | None = None  # --triton DIR: the model repository
    triton_instances: int = 1  # instances per model in config.pbtxt
    triton_kind: str = "gpu"  # instance kind of the ONNX models (engines always run on the GPU)


@dataclass
class Artifact:
    path: Path
    record: dict

    def line(self) -> str:
        r = self.record
        size = f"{r['bytes'] / 1e6:.1f} MB"
        notes = [r["precision"], size]
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spread(items: Sequence, n: int) -> list:
    """`n` items evenly spaced over the sorted list (so every class folder is represented)."""
    if n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


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
    """The model, its metadata and the images shared by the format functions of one export."""

    def __init__(self, run, options: ExportOptions):
        from mineralnet.predict import Preprocessor
        from mineralnet.runs import load_model

        self.run = Path(run)
        self.model, self.meta = load_model(run)
        self.options = options
        out = options.out_dir or (self.run / "export" if self.run.is_dir() else self.run.parent / "export")
        self.out_dir = Path(os.path.expanduser(os.fspath(out)))
        self.preprocess = Preprocessor(self.meta)
        self.files: dict[str, Path] = {}  # precision -> written ONNX file
        self.novelty = self._calibration()
        self._check: tuple[np.ndarray, str] | None = None

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def _calibration(self):
        """A calibrated run exports its detector as a `novelty` output and its temperature, threshold
        and conformal scores in the metadata; returns the detector module (or None)."""
        from mineralnet.calibration import Calibration

        cal = Calibration.load(self.run)
        if cal is None:
            if "novelty" in self.options.outputs:
                raise MineralNetError(f"--outputs novelty needs a calibrated run; run `mineralnet calibrate "
                                      f"{self.run}` first")
            return None
        self.meta = {**self.meta, "calibration": cal.public()}
        # a copy: the caller's ExportOptions stay as given
        self.options = dataclasses.replace(self.options, outputs=xonnx.parse_outputs((*self.options.outputs, "novelty")))
        return cal.graph_module()

    def check_images(self) -> tuple[np.ndarray, str]:
        """(N, 3, S, S) images for the parity gate, and where they came from."""
        if self._check is None:
            o = self.options
            for folder, flag in ((o.val_data, "--val-data"), (o.calib_data, "--calib-data")):
                if folder:
                    images, _ = self._load(_spread(_existing_images(folder, flag), CHECK_IMAGES))
                    if len(images):
                        self._check = (images, f"{flag} photos")
                        break
            else:
                self._check = (self.preprocess.batch(synthetic_photos(self.meta)), "synthetic images")
        return self._check

    def _load(self, paths: Sequence[str]) -> tuple[np.ndarray, int]:
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

    def calibration_set(self) -> tuple[np.ndarray, list]:
        """((N, 3, S, S) --calib-size photos spread over --calib-data through the eval preprocessing, skipped)."""
        from mineralnet.quantize.exporting import plan_photos

        o = self.options
        plan = plan_photos(self.run, self.meta["classes"], calib_data=o.calib_data, calib_size=o.calib_size,
                           val_data=o.val_data)  # never the held-out photos the int8 gate judges
        images, skipped = self._load(plan.calib)
        if not len(images):
            raise MineralNetError(f"--calib-data {os.fspath(o.calib_data)!r}: none of its images could be decoded")
        return images, skipped

    def calibration_images(self) -> np.ndarray:
        return self.calibration_set()[0]

    def batch_info(self) -> dict:
        p = self.options.profile
        return {"dynamic": p.dynamic, "size": None if p.dynamic else p.max, "min": p.min, "opt": p.opt,
                "max": p.max}

    def write(self, name: str, data: bytes, record: dict) -> Artifact:
        """Write a checked file atomically and add its record to the manifest."""
        from mineralnet.runs import atomic_write_bytes

        path = self.path(name)
        atomic_write_bytes(path, data)
        record = {"file": name, "bytes": len(data), "sha256": _sha256(data),
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **record}
        self._update_manifest(name, record)
        return Artifact(path, record)

    def _update_manifest(self, name: str, record: dict) -> None:
        from mineralnet.runs import atomic_write_json

        path = self.path(MANIFEST)
        exports = {}
        if path.is_file():
            try:
                exports = json.loads(path.read_text()).get("exports", {})
            except (OSError, ValueError, AttributeError):
                exports = {}
        exports[name] = record
        manifest = {**self.meta, "exported_from": str(self.run), "exports": exports}
        atomic_write_json(path, manifest)


def _existing_images(folder, flag: str) -> list[str]:
    p = Path(os.path.expanduser(os.fspath(folder)))
    if not p.is_dir():
        raise MineralNetError(f"{flag} {os.fspath(folder)!r} is not a folder; pass a folder of photos "
                              f"(class sub-folders are fine)")
    found = list_images(p)
    if not found:
        raise MineralNetError(f"{flag} {os.fspath(folder)!r} holds no images; pass a folder of photos")
    return found


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"mineralnet": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


# ----------------------------------------------------------------------------- formats
def _onnx_float(ctx: ExportContext, precision: str) -> Artifact:
    o = ctx.options
    name = "model.onnx" if precision == "fp32" else "model.fp16.onnx"
    proto = xonnx.onnx_proto(ctx.model, image_size=ctx.meta["image_size"], outputs=o.outputs,
                             batch=o.profile.max, dynamic=o.profile.dynamic, opset=o.opset,
                             half=precision == "fp16", novelty=ctx.novelty)
    xonnx.set_metadata(proto, xonnx.metadata_props(ctx.meta, precision=precision, outputs=o.outputs,
                                                   batch=ctx.batch_info()))
    xonnx.check_proto(proto)
    data = proto.SerializeToString()
    images, source = ctx.check_images()
    report = xonnx.parity_gate(ctx.model, data, images, o.outputs, precision=precision, source=source,
                               novelty=ctx.novelty)
    art = ctx.write(name, data, {"format": "onnx", "precision": precision, "opset": o.opset,
                                 "input": {"name": xonnx.INPUT_NAME, "shape": _input_shape(ctx)},
                                 "outputs": list(o.outputs), "batch": ctx.batch_info(),
                                 "parity": report.to_dict(), "versions": _versions()})
    ctx.files[precision] = art.path
    return art


def _input_shape(ctx: ExportContext) -> list:
    s = ctx.meta["image_size"]
    return ["batch" if ctx.options.profile.dynamic else ctx.options.profile.max, 3, s, s]


def export_fp32(ctx: ExportContext) -> Artifact:
    """model.onnx: the fp32 graph, parity-gated (max |logit diff| <= 1e-4, identical top-1)."""
    return _onnx_float(ctx, "fp32")


def export_fp16(ctx: ExportContext) -> Artifact:
    """model.fp16.onnx: fp16 weights and compute, float32 input/outputs, fp16 parity tolerance."""
    return _onnx_float(ctx, "fp16")


def _int8_activations(ctx: ExportContext, formats: Sequence[str]) -> str:
    if ctx.options.int8_activations:
        return ctx.options.int8_activations
    return "int8" if "trt" in formats else "uint8"


def export_int8(ctx: ExportContext, activations: str = "uint8", for_tensorrt: bool = False) -> Artifact:
    """model.int8.onnx, gated on held-out photos with its report beside it (`quantize.exporting.export_int8`)."""
    from mineralnet.quantize import exporting

    return exporting.export_int8(ctx, activations, for_tensorrt)


ENGINE_NAMES = {"fp32": "model.engine", "fp16": "model.fp16.engine", "int8": "model.int8.engine"}


def trt_plans(ctx: ExportContext, precisions: Sequence[str], major: int | None = None
              ) -> list[tuple[str, Path, Path, str]]:
    """(precision, ONNX source, engine path, trtexec command for TensorRT `major`) per engine to build.

    Strongly typed builds take the precision from the graph, so each engine has its own source:
    model.onnx (fp32), model.fp16.onnx (fp16), model.int8.onnx (int8; xtrt.ENGINE_SOURCES).
    """
    o = ctx.options
    cache = Path(o.timing_cache) if o.timing_cache else ctx.path("timing.cache")
    plans = []
    for precision in precisions:
        if precision not in ctx.files:
            raise MineralNetError(f"a {precision} engine is built from {xtrt.ENGINE_SOURCES[precision]}; export it in "
                                  f"the same call (mineralnet-export RUN --trt --{precision})")
        source = ctx.files[precision]
        engine = ctx.path(ENGINE_NAMES[precision])
        cmd = xtrt.trtexec_command(source, engine, precision=precision, profile=o.profile,
                                   image_size=ctx.meta["image_size"], workspace_mib=o.workspace_mib,
                                   timing_cache=cache, major=major)
        plans.append((precision, source, engine, cmd))
    return plans


def _device_command(ctx: ExportContext, precisions: Sequence[str]) -> str:
    """The mineralnet-export command that builds the same engines on the device (the same on 10.x and 11.x)."""
    p = ctx.options.profile
    flags = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--calib-data", "DIR"]}
    batch = (["--dynamic", "--min-batch", str(p.min), "--opt-batch", str(p.opt), "--max-batch", str(p.max)]
             if p.dynamic else ["--batch", str(p.max)])
    return " ".join(["mineralnet-export", "RUN", "--trt", *(f for pr in precisions for f in flags[pr]), *batch])


def export_trt(ctx: ExportContext, precisions: Sequence[str]) -> list[Artifact]:
    """TensorRT plans (+ sidecars) from the ONNX files written above; needs TensorRT and a GPU."""
    o = ctx.options
    plans = trt_plans(ctx, precisions)
    for precision, source, _, _ in plans:  # before anything else: a wrong file fails on any machine
        xtrt.check_engine_source(source, precision)
    missing = xtrt.tensorrt_missing()
    if missing:
        by_major = {m: " && ".join(cmd for *_, cmd in trt_plans(ctx, precisions, major=m)) for m in xtrt.TRT_MAJORS}
        raise MineralNetError(f"cannot build TensorRT engines: {missing}; the checked ONNX files are in "
                              f"{ctx.out_dir}; on the NVIDIA device (TensorRT 10 or 11) run "
                              f"`{_device_command(ctx, precisions)}`, or copy the ONNX files there and run "
                              + "; or ".join(f"with TensorRT {m}.x: {cmd}" for m, cmd in by_major.items()))
    device = xtrt.device_info()
    cache = Path(o.timing_cache) if o.timing_cache else ctx.path("timing.cache")
    artifacts = []
    for precision, source, engine, _ in plans:
        t0 = time.perf_counter()
        plan = xtrt.build_engine(source, precision=precision, profile=o.profile, image_size=ctx.meta["image_size"],
                                 workspace_mib=o.workspace_mib, timing_cache=cache)
        build_s = time.perf_counter() - t0
        source_bytes = Path(source).read_bytes()
        side = xtrt.engine_sidecar(ctx.meta, precision=precision, profile=o.profile, onnx_file=source.name,
                                   onnx_sha256=_sha256(source_bytes), device=device, outputs=o.outputs,
                                   workspace_mib=o.workspace_mib)
        side["build_seconds"] = round(build_s, 1)
        if "calibration" in ctx.meta:  # temperature, threshold, conformal scores for `mineralnet predict`
            side["calibration"] = ctx.meta["calibration"]
        from mineralnet.runs import atomic_write_json

        # sidecar first: an engine without its sidecar would be unusable by `mineralnet predict`
        atomic_write_json(xtrt.sidecar_path(engine), side)
        art = ctx.write(engine.name, plan, {"format": "tensorrt", "precision": precision,
                                            "sidecar": xtrt.sidecar_path(engine).name,
                                            "tensorrt": {k: side[k] for k in ("tensorrt_version", "tensorrt_major",
                                                                              "strongly_typed", "gpu",
                                                                              "compute_capability")},
                                            "profile": side["profile"]})
        artifacts.append(art)
    return artifacts


@dataclass(frozen=True)
class Format:
    """One row of the format table: the flag that asks for it and the function that writes it."""

    name: str
    files: str
    help: str
    write: Callable[..., object]
    metavar: str | None = None  # the flag takes a value (e.g. --triton DIR) instead of being a switch


FORMATS: dict[str, Format] = {
    "onnx": Format("onnx", "model.onnx", "fp32 ONNX (always written: the other formats start from it)", export_fp32),
    "fp16": Format("fp16", "model.fp16.onnx", "fp16 ONNX for GPU runtimes; with --trt also an fp16 engine",
                   export_fp16),
    "int8": Format("int8", "model.int8.onnx", "int8 QDQ ONNX for edge CPUs (needs --calib-data); with --trt "
                                              "also an int8 engine", export_int8),
    "trt": Format("trt", "model[.fp16|.int8].engine", "strongly typed TensorRT 10/11 engine(s) for the precisions "
                                                       "asked, each from the ONNX file of its precision", export_trt),
    "openvino": Format("openvino", "model[.int8].xml + .bin", "OpenVINO IR for CPUs (fp32; with --int8 also "
                                                             "int8), gated like the ONNX files", xov.export_openvino),
    "triton": Format("triton", "DIR/mineralnet_*/", "Triton model repository: every ONNX file written and the "
                                                   "TensorRT engines in the output folder, with config.pbtxt",
                     lambda ctx: [Artifact(path, record) for path, record in xtriton.export_triton(ctx)],
                     metavar="DIR"),
}


def export(run, formats: Sequence[str], options: ExportOptions | None = None,
           log: Callable[[str], None] | None = None) -> list[Artifact]:
    """Export the run at `run` to `formats` (keys of FORMATS); returns the written files.

    fp32 ONNX is always written first (everything else is derived from or checked against it).
    `trt` builds one engine per precision asked (fp32 when neither fp16 nor int8 is).
    """
    options = options or ExportOptions()
    formats = list(dict.fromkeys(["onnx", *formats]))
    if options.triton_dir:  # --triton DIR
        formats = list(dict.fromkeys([*formats, "triton"]))
    if "triton" in formats and not options.triton_dir:
        raise MineralNetError("the triton format needs a repository folder: --triton DIR (ExportOptions.triton_dir)")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise MineralNetError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if "int8" in formats:  # fail before spending minutes on the fp32 export
        from mineralnet.quantize.stats import parse_gate

        parse_gate(options.int8_gate)
        if options.int8_fallback not in ("off", "auto"):
            raise MineralNetError(f"--int8-fallback {options.int8_fallback!r}: choose auto or off")
        if options.calib_size is not None and options.calib_size < 1:
            raise MineralNetError(f"--calib-size {options.calib_size} must be at least 1")
        if not options.calib_data and not (Path(run if Path(run).is_dir() else Path(run).parent) / "split.json").is_file():
            raise MineralNetError("--int8 needs --calib-data DIR: a folder of representative photos (e.g. the "
                                  "training set) to calibrate the int8 ranges (a run with its split.json uses its "
                                  "training photos)")
    for flag, folder in (("--calib-data", options.calib_data), ("--val-data", options.val_data)):
        if folder:
            _existing_images(folder, flag)
    ctx = ExportContext(run, options)
    log = log or (lambda line: None)
    ctx.log = log
    artifacts = [FORMATS["onnx"].write(ctx)]
    log(artifacts[-1].line())
    if "fp16" in formats:
        artifacts.append(FORMATS["fp16"].write(ctx))
        log(artifacts[-1].line())
    if "int8" in formats:
        activations = _int8_activations(ctx, formats)
        artifacts.append(FORMATS["int8"].write(ctx, activations, "trt" in formats and activations == "int8"))
        ctx.files["int8"] = artifacts[-1].path
        log(artifacts[-1].line())
    if "trt" in formats:
        precisions = [p for p in ("fp16", "int8") if p in formats] or ["fp32"]
        for art in FORMATS["trt"].write(ctx, precisions):
            artifacts.append(art)
            log(art.line())
    if "openvino" in formats:
        for art in FORMATS["openvino"].write(ctx, ["fp32", *(["int8"] if "int8" in formats else [])],
                                             options.openvino_int8):
            artifacts.append(art)
            log(art.line())
    if "triton" in formats:
        for art in FORMATS["triton"].write(ctx):
            artifacts.append(art)
            log(art.line())
    return artifacts
