"""Core ML export for iOS/macOS apps: an ML program (.mlpackage) computing in fp16.

    mineralnet-export RUN --coreml                                   # model.mlpackage (+ model.mlpackage.json)

Converted with coremltools from the torch.export program of the same head as the ONNX file (input
`images` (B, 3, S, S) float32 normalised RGB, outputs as --outputs), `compute_precision` FLOAT16,
minimum deployment target iOS 16 / macOS 13. The metadata (mineralnet.export.phone) is in the
package's user_defined_metadata under "mineralnet", and in the sidecar `model.mlpackage.json`.

Core ML predictions need macOS: on Linux the package gets a structural check instead (the spec
loads; it is an ML program; input name, shape and type; output names; the metadata round-trips).
Its numbers are checked only on macOS (`python -c "import coremltools as ct; ct.models.MLModel(...)
.predict(...)"`, see the README's phone section).
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.export import phone

NAME = "model.mlpackage"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return version("coremltools")
    return "?"


def convert(ctx, batch: int, meta: dict):
    """ExportHead -> coremltools MLModel (ML program, fp16 compute) with the metadata set."""
    import coremltools as ct
    import torch

    from mineralnet.export import onnx as xonnx

    s = int(ctx.meta["image_size"])
    head = xonnx.ExportHead(copy.deepcopy(ctx.model).float().eval().cpu(), ctx.options.outputs,
                            novelty=ctx.novelty).eval()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # coremltools' progress bars
            program = torch.export.export(head, (torch.zeros(batch, 3, s, s),)).run_decompositions({})
            # float32 in and out (the same contract as every other format; fp16 inside)
            model = ct.convert(program, inputs=[ct.TensorType(name=xonnx.INPUT_NAME, shape=(batch, 3, s, s),
                                                              dtype=np.float32)],
                               outputs=[ct.TensorType(name=n, dtype=np.float32) for n in ctx.options.outputs],
                               convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                               minimum_deployment_target=ct.target.iOS16)
    except Exception as e:
        raise MineralNetError(f"coremltools could not convert {ctx.model.config()} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); report it with the coremltools "
                              f"version") from None
    model.user_defined_metadata[phone.METADATA_KEY] = json.dumps(meta)
    model.short_description = (f"MineralNet {meta['backbone']} mineral classifier ({len(meta['classes'])} classes); "
                                f"input `images` (B,3,S,S) normalised RGB; preprocessing in metadata '"
                                f"{phone.METADATA_KEY}'")
    return model


def structural_check(path, meta: dict, batch: int) -> dict:
    """What can be checked without macOS: the spec loads, is an ML program, has the promised input
    (name, shape, float32) and outputs, and carries the metadata. Raises one line on a mismatch."""
    import coremltools as ct

    from mineralnet.export import onnx as xonnx

    try:
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    except Exception as e:
        raise MineralNetError(f"Core ML check FAILED: {path} does not load ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    s = int(meta["image_size"])
    inputs = {i.name: i for i in spec.description.input}
    problems = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"type {spec.WhichOneof('Type')} is not mlProgram")
    inp = inputs.get(xonnx.INPUT_NAME)
    if inp is None or len(inputs) != 1:
        problems.append(f"inputs {list(inputs)} are not [{xonnx.INPUT_NAME!r}]")
    else:
        shape = list(inp.type.multiArrayType.shape)
        if shape != [batch, 3, s, s]:
            problems.append(f"input shape {shape} is not {[batch, 3, s, s]}")
        if inp.type.multiArrayType.dataType != ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32:
            problems.append("input is not float32")
    outputs = [o.name for o in spec.description.output]
    if outputs != list(meta["outputs"]):
        problems.append(f"outputs {outputs} are not {meta['outputs']}")
    stored = spec.description.metadata.userDefined.get(phone.METADATA_KEY)
    if stored is None or json.loads(stored) != meta:
        problems.append(f"metadata '{phone.METADATA_KEY}' does not round-trip")
    if problems:
        raise MineralNetError(f"Core ML check FAILED, nothing written: {'; '.join(problems)}")
    return {"checked": "structure only (Core ML predictions need macOS)", "spec_version": spec.specificationVersion,
            "type": "mlProgram", "input": {"name": xonnx.INPUT_NAME, "shape": [batch, 3, s, s], "dtype": "float32"},
            "outputs": outputs}


def check(options, run=None) -> None:
    """The table row's check: coremltools installed and a fixed batch."""
    phone.check_format("coreml", options)


def write(ctx) -> list:
    """The table row: model.mlpackage (ML program, fp16), structurally checked, with its sidecar."""
    from mineralnet.export import metadata
    from mineralnet.export.context import Artifact

    check(ctx.options)
    batch = phone.fixed_batch(ctx)
    meta = phone.metadata(ctx, fmt="coreml", precision="fp16")
    model = convert(ctx, batch, meta)
    final = ctx.path(NAME)
    with tempfile.TemporaryDirectory(prefix="mineralnet-coreml-", dir=_tmp_parent(final)) as tmp:
        candidate = Path(tmp) / NAME
        model.save(str(candidate))
        check_ = structural_check(candidate, meta, batch)
        files = sorted(f for f in candidate.rglob("*") if f.is_file())
        size = sum(f.stat().st_size for f in files)
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
        phone.write_sidecar(final, meta, digest)
        if final.exists():
            shutil.rmtree(final)
        candidate.replace(final)  # same folder tree: a rename, so no half-written package is ever visible
    record = {"file": NAME, "bytes": size, "sha256": digest,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "format": "coreml", "precision": "fp16", "outputs": list(ctx.options.outputs),
              "batch": ctx.batch_info(), "check": check_, "sidecar": phone.sidecar_path(final).name,
              "minimum_deployment_target": "iOS16", "versions": {"coremltools": _version()}}
    metadata.update_manifest(ctx.path(metadata.MANIFEST), ctx.meta, ctx.run, NAME, record)
    return [Artifact(final, record)]


def _tmp_parent(final: Path) -> str:
    final.parent.mkdir(parents=True, exist_ok=True)
    return str(final.parent)
