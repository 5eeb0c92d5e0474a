"""A Triton Inference Server model repository from an export: `mineralnet-export RUN --triton DIR`.

    DIR/
      mineralnet_onnx_fp32/   config.pbtxt, labels.txt, 1/model.onnx   (onnxruntime backend)
      mineralnet_onnx_int8/   ...                                      (when --int8 was exported)
      mineralnet_trt_fp16/    config.pbtxt, labels.txt, 1/model.plan   (tensorrt backend, when the
                                                                         engine is in the export folder)

Every config.pbtxt is written from the model itself: input/output names, data types and dims are
read from the ONNX graph (an engine's from its JSON sidecar, which records the ONNX it was built
from and its optimisation profile). A dynamic-batch model gets `max_batch_size` = the profile's
maximum and dynamic batching with the profile's opt and max as preferred sizes; a fixed-batch
model gets `max_batch_size: 0` and its batch in the dims (Triton cannot batch it further). The
class names go into labels.txt, referenced by the logits and probs outputs, so Triton's
classification extension (`class_count` in a request) answers with mineral names.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mineralnet.errors import MineralNetError

PREFIX = "mineralnet"
LABELS = "labels.txt"
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
# ONNX TensorProto element types -> Triton data types
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 6: "TYPE_INT32", 7: "TYPE_INT64", 3: "TYPE_INT8",
              2: "TYPE_UINT8", 9: "TYPE_BOOL"}
SIDECAR_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
QUEUE_DELAY_US = 100  # how long the dynamic batcher waits to fill a preferred batch


@dataclass
class Tensor:
    name: str
    dtype: str  # Triton TYPE_*
    shape: list  # full shape; the batch dimension is None when dynamic


@dataclass
class ModelIO:
    inputs: list[Tensor]
    outputs: list[Tensor]
    dynamic: bool  # first dimension is free

    def batch(self) -> int | None:
        return None if self.dynamic else self.inputs[0].shape[0]


def onnx_io(path) -> ModelIO:
    """Names, Triton types and shapes of an ONNX file's graph inputs and outputs."""
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)

    def tensors(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TYPES:
                raise MineralNetError(f"{os.fspath(path)!r}: tensor {v.name!r} has ONNX type {t.elem_type}, which "
                                      f"has no Triton data type here; re-export with mineralnet-export")
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            out.append(Tensor(v.name, ONNX_TYPES[t.elem_type], dims))
        return out

    inputs, outputs = tensors(proto.graph.input), tensors(proto.graph.output)
    if any(None in t.shape[1:] for t in inputs + outputs):
        raise MineralNetError(f"{os.fspath(path)!r} has a free dimension besides the batch; Triton needs fixed "
                              f"dims: re-export with mineralnet-export")
    return ModelIO(inputs, outputs, dynamic=inputs[0].shape[0] is None)


def engine_io(sidecar: dict) -> ModelIO:
    """The I/O of a TensorRT engine built by mineralnet-export, from its sidecar (`<engine>.json`)."""
    profile, s = sidecar["profile"], int(sidecar["image_size"])
    dynamic = bool(profile["dynamic"])
    batch = None if dynamic else int(profile["max"])
    dims = {"logits": [int(sidecar["num_classes"])], "probs": [int(sidecar["num_classes"])],
            "embedding": [int(sidecar.get("feature_dim") or 0)], "novelty": []}  # novelty: one score (B,)
    unknown = [o for o in sidecar["outputs"] if o not in dims or 0 in dims[o]]
    if unknown:
        raise MineralNetError(f"engine sidecar lists output(s) {unknown} without a known size; rebuild the "
                              f"engine with `mineralnet-export RUN --trt`")
    dtype = SIDECAR_TYPES[sidecar["input"].get("dtype", "float32")]
    return ModelIO([Tensor(sidecar["input"]["name"], dtype, [batch, 3, s, s])],
                   [Tensor(o, "TYPE_FP32", [batch, *dims[o]]) for o in sidecar["outputs"]], dynamic)


def config_text(name: str, backend: str, io: ModelIO, *, profile: dict, kind: str, instances: int,
                labels: bool = True) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for one model.

    Args:
        backend: "onnxruntime" or "tensorrt".
        profile: the batch profile ({"min", "opt", "max", "dynamic"}) the model was exported with.
        kind: "gpu" or "cpu" (instance_group kind).
    """
    platform = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[backend]
    filename = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}[backend]
    max_batch = int(profile["max"]) if io.dynamic else 0

    def dims(t: Tensor) -> str:
        shape = t.shape[1:] if io.dynamic else t.shape
        if not shape:  # one value per image, e.g. novelty (B,): Triton needs dims, so [1] reshaped to a scalar
            return "[ 1 ]\n    reshape: { shape: [ ] }"
        return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"

    def block(t: Tensor) -> str:
        label = f'\n    label_filename: "{LABELS}"' if labels and t.name in ("logits", "probs") else ""
        return f'  {{\n    name: "{t.name}"\n    data_type: {t.dtype}\n    dims: {dims(t)}{label}\n  }}'

    lines = [f'name: "{name}"', f'backend: "{backend}"', f'platform: "{platform}"',
             f'default_model_filename: "{filename}"', f"max_batch_size: {max_batch}",
             "input [\n" + ",\n".join(block(t) for t in io.inputs) + "\n]",
             "output [\n" + ",\n".join(block(t) for t in io.outputs) + "\n]"]
    if io.dynamic:
        preferred = sorted({b for b in (int(profile["opt"]), int(profile["max"])) if b > 1})
        pref = f"\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else ""
        lines.append(f"dynamic_batching {{{pref}\n  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {int(instances)}\n    kind: {KINDS[kind]}\n  }}\n]")
    return "\n".join(lines) + "\n"


def _write_model(repo: Path, name: str, model_file: Path, target: str, config: str, classes) -> Path:
    """repo/name/{config.pbtxt, labels.txt, 1/target}; the model copied first, the config last."""
    from mineralnet.files import atomic_write_text

    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    tmp = folder / "1" / f".{target}.tmp"
    shutil.copyfile(model_file, tmp)
    os.replace(tmp, folder / "1" / target)
    atomic_write_text(folder / LABELS, "".join(f"{c}\n" for c in classes))
    atomic_write_text(folder / "config.pbtxt", config)
    return folder


def export_triton(ctx) -> list[tuple[Path, dict]]:
    """The model repository at ctx.options.triton_dir: one model per ONNX file written by this export,
    one per TensorRT engine (with its sidecar) in the export folder. Returns (model folder, record)."""
    from mineralnet.infer.tensorrt import read_sidecar

    o = ctx.options
    if o.triton_kind not in KINDS:
        raise MineralNetError(f"--triton-kind {o.triton_kind!r}: choose gpu or cpu")
    if o.triton_instances < 1:
        raise MineralNetError(f"--triton-instances {o.triton_instances} must be at least 1")
    repo = Path(os.path.expanduser(os.fspath(o.triton_dir)))
    if repo.exists() and not repo.is_dir():
        raise MineralNetError(f"--triton {os.fspath(o.triton_dir)!r} is a file; pass a folder for the model repository")
    profile = ctx.batch_info()
    classes = list(ctx.meta["classes"])
    written = []
    for precision, path in ctx.files.items():
        name = f"{PREFIX}_onnx_{precision}"
        text = config_text(name, "onnxruntime", onnx_io(path), profile=profile, kind=o.triton_kind,
                           instances=o.triton_instances)
        written.append((_write_model(repo, name, Path(path), "model.onnx", text, classes), "onnxruntime", precision))
    for engine in sorted(Path(ctx.out_dir).glob("model*.engine")):
        side = read_sidecar(engine)
        _check_engine_profile(engine, side)
        precision = side.get("precision", "fp32")
        name = f"{PREFIX}_trt_{precision}"
        text = config_text(name, "tensorrt", engine_io(side), profile=side["profile"], kind="gpu",
                           instances=o.triton_instances)
        written.append((_write_model(repo, name, engine, "model.plan", text, side["classes"]), "tensorrt", precision))
    return [(folder, {"format": "triton", "backend": backend, "precision": f"Triton {backend} {precision}",
                      "bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())})
            for folder, backend, precision in written]


def check(options, run=None) -> None:
    if not options.triton_dir:
        raise MineralNetError("the triton format needs a repository folder: --triton DIR (ExportOptions.triton_dir)")


def write(ctx) -> list:
    """The table row: the model repository of `export_triton`, as artifacts (one per model folder)."""
    from mineralnet.export.context import Artifact

    check(ctx.options)
    return [Artifact(path, record) for path, record in export_triton(ctx)]


def _check_engine_profile(engine: Path, side: dict) -> None:
    p = side.get("profile") or {}
    if p.get("dynamic") and int(p.get("min", 1)) > 1:
        raise MineralNetError(f"{str(engine)!r} accepts batches {p['min']}..{p['max']}, but Triton's batcher sends "
                              f"any batch from 1; rebuild it with --dynamic --min-batch 1")


def read_config(path) -> dict:
    """A written config.pbtxt parsed with tritonclient's ModelConfig message (for tests and checks)."""
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MineralNetError("reading config.pbtxt needs tritonclient (pip install tritonclient)") from None
    try:
        msg = text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise MineralNetError(f"{os.fspath(path)!r} is not a Triton model config ({e}); rewrite it with "
                              f"mineralnet-export RUN --triton DIR") from None
    return json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True))
