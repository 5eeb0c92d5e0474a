"""What the phone formats (LiteRT .tflite, ExecuTorch .pte, Core ML .mlpackage) share.

- the metadata every phone file carries: the same fields as the ONNX metadata_props (class names,
  image_size, resize, mean/std, the preprocessing rule, outputs, precision, and for a calibrated run
  the temperature, "unknown" threshold and conformal scores), as one JSON object, embedded in the
  format's own metadata (TFLite Model.metadata, an ExecuTorch constant method, Core ML
  user_defined_metadata) and ALWAYS in a sidecar `<file>.json` beside it, so an app needs nothing else;
- the one-line message when a format's package is missing;
- `check_format` (each phone row's `check(options, run)`): the format's packages and a fixed batch, before
  anything is written;
- `gate`: a phone file's check, through export/gates.py like every other format (fp32/fp16 parity with
  PyTorch; int8: the one int8 gate, top-1 agreement with PyTorch fp32 and with --val-data the accuracy
  drop, with the same minimum and maximum as the int8 ONNX file);
- `precisions`: which files of a format this export writes (fp32 always; fp16/int8 when those rows
  were asked, ctx.formats);
- `save_checked`: the sidecar, then the checked file through ctx.save (atomic, with its manifest record).

Reading them back (metadata, sidecar, the fixed-batch run) and the runners are mineralnet/infer/phone.py,
infer/litert.py and infer/executorch.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from mineralnet.errors import MineralNetError
from mineralnet.infer.phone import METADATA_KEY, require, sidecar_path

SIDECAR_FORMAT = "mineralnet-phone-model/1"

FORMAT_PACKAGES = {"tflite": ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),
                   "executorch": ("executorch",), "coreml": ("coremltools",)}


def check_format(fmt: str, options) -> None:
    """A phone row's `check(options, run)`: the batch is fixed and its packages are installed (one line each;
    the option first, so it is reported whether or not the packages are there)."""
    if options.profile.dynamic:
        raise MineralNetError("--tflite, --executorch and --coreml write fixed-batch models; drop --dynamic "
                              "(and pass --batch N for a batch other than 1)")
    require(*FORMAT_PACKAGES[fmt])


def precisions(ctx, offered: Sequence[str]) -> list[str]:
    """fp32 (always: the conversion source) and those of `offered` whose rows were asked (--fp16, --int8)."""
    return ["fp32", *[p for p in offered if p != "fp32" and p in ctx.formats]]


def fixed_batch(ctx) -> int:
    """Phone formats are fixed-batch files (the apps feed one photo at a time)."""
    return int(ctx.options.profile.max)


def metadata(ctx, *, fmt: str, precision: str) -> dict:
    """The JSON object every phone file carries (the ONNX metadata_props, parsed, plus the format)."""
    from mineralnet.export.metadata import onnx_props

    props = onnx_props(ctx.meta, precision=precision, outputs=ctx.options.outputs, batch=ctx.batch_info())
    return {"format": SIDECAR_FORMAT, "runtime": fmt, **{k: json.loads(v) for k, v in props.items()}}


def write_sidecar(path, meta: dict, data_sha256: str | None = None) -> Path:
    """`<file>.json` beside the model (written before the model: a model without it still has its metadata
    inside, but the app contract is the pair)."""
    from mineralnet.files import atomic_write_json

    side = sidecar_path(path)
    atomic_write_json(side, {**meta, "file": Path(path).name, **({"sha256": data_sha256} if data_sha256 else {})})
    return side


# ----------------------------------------------------------------------------- gate and write
def gate(ctx, runner, *, precision: str, label: str) -> dict:
    """Check a phone file through export/gates.py: fp32/fp16 -> {"parity": ...}, int8 -> {"int8": ...}
    (the int8 gate against PyTorch fp32, the run's model). `runner`: images -> {output: array}."""
    from mineralnet.export import gates

    if precision == "int8":
        # the held-out gate; its report goes beside the file (model.int8.<runtime>.report.{json,md})
        return {"int8": gates.int8_gate(ctx, lambda x: gates.reference(ctx, x), runner, what=f"{label} int8 gate",
                                        stem=f"model.int8.{label.lower().replace(' ', '')}.report")}
    return {"parity": gates.parity(ctx, runner, precision=precision, what=f"{label} parity gate",
                                   hint="the converted model does not reproduce the PyTorch model (report it "
                                        "with the package versions)")}


def check_and_save(ctx, name: str, data: bytes, meta: dict, record: dict, *, runner: Callable, label: str):
    """Write the candidate file to a temporary folder, open it with `runner` (path -> object with
    `.run(images)`), gate it (`gate`), then `save_checked`: a file that fails never gets its name."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mineralnet-phone-") as tmp:
        candidate = Path(tmp) / name
        candidate.write_bytes(data)
        record.update(gate(ctx, runner(candidate).run, precision=record["precision"], label=label))
    return save_checked(ctx, name, data, meta, record)


def save_checked(ctx, name: str, data: bytes, meta: dict, record: dict):
    """Sidecar, then the checked model file (atomically, with its manifest record) -> Artifact."""
    import hashlib

    path = ctx.path(name)
    write_sidecar(path, meta, hashlib.sha256(data).hexdigest())
    return ctx.save(name, data, {**record, "sidecar": sidecar_path(path).name})
