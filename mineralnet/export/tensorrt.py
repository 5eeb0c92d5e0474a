"""TensorRT engines from the exported ONNX files: the strongly typed build and the `--trt` row. The batch
profile, the sidecar, the compatibility check and the runner (`TRTRunner`) are mineralnet/infer/tensorrt.py.

One build path for TensorRT 10 and 11. TensorRT 11 removed weak typing (BuilderFlag.FP16/INT8,
the INT8 calibrator, platform_has_fast_fp16, NetworkDefinitionCreationFlag.EXPLICIT_BATCH; trtexec
--fp16/--int8/--best/--calib), and 10.12+ deprecates it. So every network here is strongly typed
(the STRONGLY_TYPED creation flag: needed on 10.x, accepted and ignored on 11.x) and the builder
gets no precision flag: the precision is the ONNX graph's own.

    fp32  model.onnx        fp32 graph
    fp16  model.fp16.onnx   fp16 compute, fp32 input/outputs, softmax in fp32
    int8  model.int8.onnx   symmetric int8 Q/DQ around Conv/Gemm/Add, the float parts in fp16

The engine file is the plain serialized plan (`IBuilder.build_serialized_network`), with no
header of our own, so `trtexec --loadEngine`, Triton's `tensorrt_plan` backend and C++
`IRuntime::deserializeCudaEngine` read it as is. What the plan cannot hold (class names,
preprocessing, the TensorRT version and GPU that built it) goes into `<engine>.json` beside it.

Engines are tied to the TensorRT version and the GPU they were built on, so they are built on
the target device (`mineralnet-export RUN --trt` there, or the `trtexec` command this module
prints when TensorRT or a GPU is missing).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mineralnet.errors import MineralNetError
from mineralnet.infer.tensorrt import (DEFAULT_WORKSPACE_MIB, ENGINE_PRECISIONS, ENGINE_SOURCES, INPUT_NAME,
                                       TRT_MAJORS, BatchProfile, _tensorrt, device_info, sidecar_path,
                                       tensorrt_missing, trtexec_command)

# ----------------------------------------------------------------------------- build
def check_engine_source(onnx_path, precision: str) -> dict:
    """Raise unless the ONNX file's own precision is `precision` (what a strongly typed build gets).

    Reads the metadata mineralnet-export writes (`precision`, and for int8 `quantization`); a file
    without it (not written by mineralnet-export) is let through. Returns that metadata.
    """
    import onnx

    path = os.fspath(onnx_path)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise MineralNetError(f"cannot read {path!r} as ONNX ({type(e).__name__}); re-export it with "
                              f"`mineralnet-export RUN`") from None
    props = {p.key: p.value for p in proto.metadata_props}
    graph = json.loads(props["precision"]) if "precision" in props else None
    if graph is not None and graph != precision:
        raise MineralNetError(f"{path!r} is a {graph} graph, not {precision}: strongly typed TensorRT takes the "
                              f"precision from the graph, so build the {precision} engine from "
                              f"{ENGINE_SOURCES[precision]} (mineralnet-export RUN --trt --{precision})")
    quant = json.loads(props.get("quantization", "{}"))
    if precision == "int8" and graph is not None and not quant.get("tensorrt_compatible"):
        raise MineralNetError(f"{path!r} has {quant.get('activations')} activations and "
                              f"{quant.get('float_parts', 'fp32')} float layers, which a TensorRT int8 engine cannot "
                              f"use (it needs int8 with zero point 0 and fp16 between the Q/DQ pairs); re-export "
                              f"with `mineralnet-export RUN --trt --int8 --int8-activations int8 --calib-data DIR`")
    return {"precision": graph, "quantization": quant}


def network_flags(trt) -> int:
    """create_network flags: STRONGLY_TYPED where the enum has it (required on 10.x, ignored on 11.x).

    EXPLICIT_BATCH is never used: explicit batch is the only mode since 10.0 and 11.x removed the name.
    """
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path, *, precision: str, profile: BatchProfile, image_size: int,
                 workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache=None) -> bytes:
    """Parse the ONNX file into a strongly typed network and build a serialized TensorRT plan.

    The same calls on TensorRT 10 and 11: no precision flag, no calibrator. `onnx_path` must hold
    `precision` in its graph (ENGINE_SOURCES: model.onnx, model.fp16.onnx, model.int8.onnx; checked
    from its metadata). A timing cache file, when given, is read first and updated after the build.
    """
    from mineralnet.files import atomic_write_bytes

    if precision not in ENGINE_PRECISIONS:
        raise MineralNetError(f"engine precision {precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)}")
    check_engine_source(onnx_path, precision)
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MineralNetError(f"TensorRT cannot parse {os.fspath(onnx_path)!r}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    inp = network.get_input(0)
    if inp.name != INPUT_NAME:
        raise MineralNetError(f"{os.fspath(onnx_path)!r} has input {inp.name!r}, not {INPUT_NAME!r}; "
                              f"build engines from ONNX files written by mineralnet-export")
    shapes = profile.shapes(image_size)
    if -1 in tuple(inp.shape):
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(opt_profile)
    elif tuple(inp.shape)[0] != profile.max:
        raise MineralNetError(f"{os.fspath(onnx_path)!r} has a fixed batch of {tuple(inp.shape)[0]}, not "
                              f"{profile.max}; re-export the ONNX with the batch settings of the engine")
    cache_file = Path(timing_cache) if timing_cache else None
    cached = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise MineralNetError(f"TensorRT {trt.__version__} failed to build a {precision} engine from "
                              f"{os.fspath(onnx_path)!r} (its log above says why; a larger --workspace or smaller "
                              f"--max-batch may help)")
    if cache_file:
        atomic_write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


# ----------------------------------------------------------------------------- the table row
ENGINE_NAMES = {"fp32": "model.engine", "fp16": "model.fp16.engine", "int8": "model.int8.engine"}


def precisions_for(formats) -> list[str]:
    """The engines `--trt` builds: one per precision asked (fp16, int8), fp32 when neither is."""
    return [p for p in ("fp16", "int8") if p in formats] or ["fp32"]


def trt_plans(ctx, precisions, major: int | None = None) -> list[tuple[str, Path, Path, str]]:
    """(precision, ONNX source, engine path, trtexec command for TensorRT `major`) per engine to build.

    Strongly typed builds take the precision from the graph, so each engine has its own source:
    model.onnx (fp32), model.fp16.onnx (fp16), model.int8.onnx (int8; ENGINE_SOURCES).
    """
    o = ctx.options
    cache = Path(o.timing_cache) if o.timing_cache else ctx.path("timing.cache")
    plans = []
    for precision in precisions:
        if precision not in ctx.files:
            raise MineralNetError(f"a {precision} engine is built from {ENGINE_SOURCES[precision]}; export it in "
                                  f"the same call (mineralnet-export RUN --trt --{precision})")
        source = ctx.files[precision]
        engine = ctx.path(ENGINE_NAMES[precision])
        cmd = trtexec_command(source, engine, precision=precision, profile=o.profile,
                              image_size=ctx.meta["image_size"], workspace_mib=o.workspace_mib,
                              timing_cache=cache, major=major)
        plans.append((precision, source, engine, cmd))
    return plans


def _device_command(ctx, precisions) -> str:
    """The mineralnet-export command that builds the same engines on the device (the same on 10.x and 11.x)."""
    p = ctx.options.profile
    flags = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--calib-data", "DIR"]}
    batch = (["--dynamic", "--min-batch", str(p.min), "--opt-batch", str(p.opt), "--max-batch", str(p.max)]
             if p.dynamic else ["--batch", str(p.max)])
    return " ".join(["mineralnet-export", "RUN", "--trt", *(f for pr in precisions for f in flags[pr]), *batch])


def write(ctx) -> list:
    """TensorRT plans (+ sidecars) from the ONNX files of this export, one per precision asked;
    needs TensorRT and a GPU (without them: one error naming the commands to run on the device)."""
    return build_engines(ctx, precisions_for(ctx.formats))


def build_engines(ctx, precisions) -> list:
    """The engines of `precisions`, each from the ONNX file of its precision in ctx.files."""
    from mineralnet.export import metadata
    from mineralnet.files import atomic_write_json

    o = ctx.options
    plans = trt_plans(ctx, precisions)
    for precision, source, _, _ in plans:  # before anything else: a wrong file fails on any machine
        check_engine_source(source, precision)
    missing = tensorrt_missing()
    if missing:
        by_major = {m: " && ".join(cmd for *_, cmd in trt_plans(ctx, precisions, major=m)) for m in TRT_MAJORS}
        raise MineralNetError(f"cannot build TensorRT engines: {missing}; the checked ONNX files are in "
                              f"{ctx.out_dir}; on the NVIDIA device (TensorRT 10 or 11) run "
                              f"`{_device_command(ctx, precisions)}`, or copy the ONNX files there and run "
                              + "; or ".join(f"with TensorRT {m}.x: {cmd}" for m, cmd in by_major.items()))
    device = device_info()
    cache = Path(o.timing_cache) if o.timing_cache else ctx.path("timing.cache")
    artifacts = []
    for precision, source, engine, _ in plans:
        t0 = time.perf_counter()
        plan = build_engine(source, precision=precision, profile=o.profile, image_size=ctx.meta["image_size"],
                            workspace_mib=o.workspace_mib, timing_cache=cache)
        side = metadata.engine_sidecar(ctx.meta, precision=precision, profile=o.profile, onnx_file=source.name,
                                       onnx_sha256=metadata.sha256(Path(source).read_bytes()), device=device,
                                       outputs=o.outputs, workspace_mib=o.workspace_mib)
        side["build_seconds"] = round(time.perf_counter() - t0, 1)
        # sidecar first: an engine without its sidecar would be unusable by `mineralnet predict`
        atomic_write_json(sidecar_path(engine), side)
        keys = ("tensorrt_version", "tensorrt_major", "strongly_typed", "gpu", "compute_capability")
        artifacts.append(ctx.save(engine.name, plan, {"format": "tensorrt", "precision": precision,
                                                      "sidecar": sidecar_path(engine).name,
                                                      "tensorrt": {k: side[k] for k in keys},
                                                      "profile": side["profile"]}))
    return artifacts
