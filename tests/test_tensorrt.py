"""TensorRT: strongly typed builds on TensorRT 10 and 11, the ONNX files they start from, trtexec, sidecars.

TensorRT cannot run here, so the builder is a fake with two API surfaces taken from the TensorRT
docs: 10.x (the weak-typing names exist, but using them is recorded as a failure) and 11.x (the
names the 10.x -> 11.x migration guide lists as removed raise AttributeError; STRONGLY_TYPED is
accepted and ignored). The ONNX files that feed TensorRT are real: exported from the small probe
model of test_export.py and run in ONNX Runtime on this CPU.
"""
from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import numpy as np
import pytest

from mineralnet.errors import MineralNetError
from mineralnet.export import BatchProfile, ExportOptions, export
from mineralnet.export import onnx as xonnx
from mineralnet.export import metadata as xmeta
from mineralnet.export import int8 as xint8
from mineralnet.export import gates as xgates
from mineralnet.export import tensorrt as xtrt
from mineralnet.infer import tensorrt as itrt
from test_export import CLASSES, MEAN, SIZE, STD, _photos, _preprocess, photos, run_dir  # noqa: F401 (fixtures)

# From the TensorRT 11 migration guide: gone from the Python API / from trtexec.
REMOVED_BUILDER_FLAGS = ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                         "PREFER_PRECISION_CONSTRAINTS")
REMOVED_TRTEXEC = ("--fp16", "--int8", "--bf16", "--fp8", "--best", "--calib", "--precisionConstraints",
                   "--layerPrecisions", "--explicitBatch")


class FakeTensorRT:
    """The slice of the `tensorrt` module build_engine uses, as TensorRT `major` exposes it.

    `calls` records builder calls in order; `failures` records any use of weak typing on 10.x
    (11.x cannot record it: the names are gone and raise AttributeError).
    """

    def __init__(self, major: int, input_shape=(-1, 3, SIZE, SIZE)):
        self.__version__ = {10: "10.3.0", 11: "11.4.1"}[major]
        self.calls, self.failures = [], []
        fake = self
        strongly_typed = 1  # enum values as in the 10.x bindings: EXPLICIT_BATCH = 0, STRONGLY_TYPED = 1
        if major == 10:
            self.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=strongly_typed)
            self.BuilderFlag = SimpleNamespace(TF32=0, **{n: n for n in REMOVED_BUILDER_FLAGS})
        else:
            self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=strongly_typed)
            self.BuilderFlag = SimpleNamespace(TF32=0, VERSION_COMPATIBLE=1)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})

        class Network:
            def get_input(self, i):
                return SimpleNamespace(name="images", shape=input_shape)

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", str(path)))
                return True

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                if flag in REMOVED_BUILDER_FLAGS:
                    fake.failures.append(f"weak typing: set_flag({flag})")
                fake.calls.append(("set_flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile",))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                return SimpleNamespace(serialize=lambda: b"cache-bytes")

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", ignore_mismatch))

            def get_timing_cache(self):
                return SimpleNamespace(serialize=lambda: b"cache-bytes")

            def __setattr__(self, name, value):
                if major == 11:
                    raise AttributeError(f"'IBuilderConfig' object has no attribute {name!r}")
                fake.failures.append(f"weak typing: config.{name} = ...")  # int8_calibrator and friends

        class Builder:
            def __init__(self, logger):
                pass

            def __getattr__(self, name):
                if name.startswith("platform_has") and major == 10:
                    fake.failures.append(f"weak typing: builder.{name}")
                    return True
                raise AttributeError(f"'Builder' object has no attribute {name!r}")

            def create_network(self, flags=0):
                if major == 10 and flags & (1 << 0):
                    fake.failures.append("EXPLICIT_BATCH is deprecated (and removed in 11.x)")
                fake.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network",))
                return b"PLAN"

        self.Builder, self.OnnxParser = Builder, Parser


def _onnx_with_metadata(path, precision: str, quantization: dict | None = None):
    """A tiny valid ONNX file carrying mineralnet-export's precision metadata."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    props = {"precision": json.dumps(precision)}
    if quantization is not None:
        props["quantization"] = json.dumps(quantization)
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return path


@pytest.fixture
def sources(tmp_path):
    return {"fp32": _onnx_with_metadata(tmp_path / "model.onnx", "fp32"),
            "fp16": _onnx_with_metadata(tmp_path / "model.fp16.onnx", "fp16"),
            "int8": _onnx_with_metadata(tmp_path / "model.int8.onnx", "int8",
                                        {"activations": "int8 symmetric", "float_parts": "fp16",
                                         "tensorrt_compatible": True})}


# ----------------------------------------------------------------------------- build_engine
@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_engine_is_strongly_typed_and_uses_no_removed_api(major, precision, sources, tmp_path, monkeypatch):
    fake = FakeTensorRT(major)
    monkeypatch.setattr(xtrt, "_tensorrt", lambda: fake)
    cache = tmp_path / "timing.cache"
    plan = xtrt.build_engine(sources[precision], precision=precision, profile=BatchProfile.range(1, 2, 4),
                             image_size=SIZE, workspace_mib=512, timing_cache=cache)
    assert plan == b"PLAN" and cache.read_bytes() == b"cache-bytes"
    assert fake.failures == []  # no weak typing on 10.x; and on 11.x a removed name would have raised
    assert ("create_network", 1 << 1) in fake.calls  # STRONGLY_TYPED (bit 1), required on 10.x, ignored on 11.x
    assert not [c for c in fake.calls if c[0] == "set_flag"]  # the precision is the graph's
    assert ("parse_from_file", str(sources[precision])) in fake.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 512 << 20) in fake.calls
    assert ("set_shape", "images", (1, 3, SIZE, SIZE), (2, 3, SIZE, SIZE), (4, 3, SIZE, SIZE)) in fake.calls
    assert fake.calls.index(("add_optimization_profile",)) < fake.calls.index(("build_serialized_network",))


def test_the_fakes_catch_weak_typing():
    """The fakes can fail: the TensorRT 10 way of asking for fp16 is caught on both surfaces."""
    ten, eleven = FakeTensorRT(10), FakeTensorRT(11)
    ten.Builder(None).create_builder_config().set_flag(ten.BuilderFlag.FP16)
    ten.Builder(None).create_network(1 << int(ten.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    assert ten.Builder(None).platform_has_fast_fp16
    assert len(ten.failures) == 3
    for name in ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"):
        with pytest.raises(AttributeError):
            getattr(eleven.BuilderFlag, name)
    with pytest.raises(AttributeError):
        eleven.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    with pytest.raises(AttributeError):
        eleven.Builder(None).platform_has_fast_fp16
    with pytest.raises(AttributeError):
        eleven.Builder(None).create_builder_config().int8_calibrator = object()


def test_network_flags_follow_the_installed_enum():
    assert xtrt.network_flags(FakeTensorRT(10)) == xtrt.network_flags(FakeTensorRT(11)) == 2
    assert xtrt.network_flags(SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace())) == 0


def test_build_engine_refuses_a_file_of_another_precision(sources, tmp_path, monkeypatch):
    fake = FakeTensorRT(11)
    monkeypatch.setattr(xtrt, "_tensorrt", lambda: fake)
    kw = {"profile": BatchProfile.static(1), "image_size": SIZE}
    with pytest.raises(MineralNetError, match=r"is a fp32 graph, not fp16.*from model\.fp16\.onnx"):
        xtrt.build_engine(sources["fp32"], precision="fp16", **kw)
    cpu_int8 = _onnx_with_metadata(tmp_path / "cpu.int8.onnx", "int8", {"activations": "uint8 asymmetric",
                                                                         "tensorrt_compatible": False})
    with pytest.raises(MineralNetError, match="uint8 asymmetric activations and fp32 float layers"):
        xtrt.build_engine(cpu_int8, precision="int8", **kw)
    assert fake.calls == []  # refused before TensorRT was touched
    fake = FakeTensorRT(10, input_shape=(1, 3, SIZE, SIZE))  # static ONNX: no profile
    monkeypatch.setattr(xtrt, "_tensorrt", lambda: fake)
    xtrt.build_engine(sources["fp32"], precision="fp32", **kw)
    assert not [c for c in fake.calls if c[0] in ("set_flag", "set_shape", "add_optimization_profile")]
    with pytest.raises(MineralNetError, match="fixed batch of 1, not 8"):
        xtrt.build_engine(sources["fp32"], precision="fp32", profile=BatchProfile.static(8), image_size=SIZE)


# ----------------------------------------------------------------------------- trtexec
def test_batch_profiles_and_their_shapes():
    assert BatchProfile.static(4).shapes(224) == {k: [4, 3, 224, 224] for k in ("min", "opt", "max")}
    p = BatchProfile.range(1, None, 32)
    assert (p.min, p.opt, p.max, p.dynamic) == (1, 8, 32, True)
    assert p.shapes(64)["max"] == [32, 3, 64, 64]
    assert BatchProfile.range(1, None, 4).opt == 4  # default opt never exceeds max
    for bad in ((0, 1, 2), (4, 2, 8), (1, 9, 8)):
        with pytest.raises(MineralNetError, match="min <= opt <= max"):
            BatchProfile.range(*bad)


def test_trtexec_commands_for_both_majors_have_no_removed_option(monkeypatch):
    p = BatchProfile.range(1, 8, 32)
    kw = {"profile": p, "image_size": 224, "workspace_mib": 2048, "timing_cache": "out/timing.cache"}
    ten = xtrt.trtexec_command("out/model.fp16.onnx", "out/model.fp16.engine", precision="fp16", major=10, **kw)
    assert shlex.split(ten) == ["trtexec", "--onnx=out/model.fp16.onnx", "--saveEngine=out/model.fp16.engine",
                                "--stronglyTyped", "--minShapes=images:1x3x224x224", "--optShapes=images:8x3x224x224",
                                "--maxShapes=images:32x3x224x224", "--memPoolSize=workspace:2048M",
                                "--timingCacheFile=out/timing.cache"]
    eleven = xtrt.trtexec_command("out/model.fp16.onnx", "out/model.fp16.engine", precision="fp16", major=11, **kw)
    assert shlex.split(eleven) == [a for a in shlex.split(ten) if a != "--stronglyTyped"]  # always strongly typed
    for major in (10, 11):
        for precision in xtrt.ENGINE_PRECISIONS:
            cmd = shlex.split(xtrt.trtexec_command(xtrt.ENGINE_SOURCES[precision], "m.engine", precision=precision,
                                                   profile=BatchProfile.static(1), image_size=64, major=major))
            assert not [a for a in cmd if a.split("=")[0] in REMOVED_TRTEXEC], cmd
            assert "Shapes" not in " ".join(cmd)  # static: the ONNX fixes the shape
    # default major: the installed TensorRT's, else 10
    monkeypatch.setattr(itrt, "tensorrt_version", lambda: None)
    assert "--stronglyTyped" in xtrt.trtexec_command("m.onnx", "m.engine", precision="fp32", **kw)
    monkeypatch.setattr(itrt, "tensorrt_version", lambda: "11.4.1.3")
    assert "--stronglyTyped" not in xtrt.trtexec_command("m.onnx", "m.engine", precision="fp32", **kw)
    with pytest.raises(MineralNetError, match="TensorRT 9.x"):
        xtrt.trtexec_command("m.onnx", "m.engine", precision="fp32", major=9, **kw)
    with pytest.raises(MineralNetError, match="int4"):
        xtrt.trtexec_command("a", "b", precision="int4", **kw)


# ----------------------------------------------------------------------------- sidecar
META = {"classes": CLASSES, "num_classes": 3, "image_size": 224, "resize": 256, "mean": MEAN, "std": STD,
        "backbone": "resnet50", "stages": [2, 4], "feature_dim": 2560}
DEVICE = {"tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "cuda": "12.6"}


def _sidecar(precision="int8", device=DEVICE):
    return xmeta.engine_sidecar(META, precision=precision, profile=BatchProfile.range(1, 4, 8),
                               onnx_file=xtrt.ENGINE_SOURCES[precision], onnx_sha256="ab" * 32, device=device,
                               outputs=("logits", "probs"), workspace_mib=1024)


def test_engine_sidecar_records_the_tensorrt_that_built_it():
    side = _sidecar()
    assert side["classes"] == CLASSES and side["mean"] == MEAN and side["resize"] == 256
    assert side["profile"]["shapes"] == {"min": [1, 3, 224, 224], "opt": [4, 3, 224, 224], "max": [8, 3, 224, 224]}
    assert (side["tensorrt_version"], side["tensorrt_major"], side["strongly_typed"]) == ("10.3.0", 10, True)
    assert (side["gpu"], side["compute_capability"]) == ("Orin", "8.7")
    assert side["precision"] == "int8" and side["onnx"]["file"] == "model.int8.onnx"
    json.dumps(side)  # plain JSON
    itrt.check_compatible(side, DEVICE, "m.engine")  # same device: fine
    itrt.check_compatible(side, {**DEVICE, "gpu": "Jetson AGX Orin 64GB"}, "m.engine")  # same family (sm_87)


@pytest.mark.parametrize("here_version,major", [("11.4.1", 11), ("10.8.0", 10)])
def test_an_engine_from_another_tensorrt_version_is_refused_in_one_line(here_version, major):
    with pytest.raises(MineralNetError) as e:
        itrt.check_compatible(_sidecar("fp16"), {**DEVICE, "tensorrt_version": here_version}, "out/m.fp16.engine")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert f"was built by TensorRT 10.3.0 and this machine has TensorRT {here_version}" in msg
    assert "mineralnet-export RUN --trt --fp16 --dynamic --min-batch 1 --opt-batch 4 --max-batch 8" in msg
    assert "trtexec --onnx=out/model.fp16.onnx --saveEngine=out/m.fp16.engine" in msg  # this machine's major:
    trtexec = msg[msg.index("trtexec "):]
    assert ("--stronglyTyped" in trtexec) == (major == 10)
    assert not [f for f in REMOVED_TRTEXEC if f in trtexec.rstrip("`").split()]


def test_an_engine_from_another_gpu_family_is_refused_in_one_line():
    with pytest.raises(MineralNetError, match=r"built for GPU Orin sm_87 and this machine has NVIDIA H100 sm_90.*"
                                              r"rebuild it here with `mineralnet-export RUN --trt --int8 --calib-data"):
        itrt.check_compatible(_sidecar(), {**DEVICE, "gpu": "NVIDIA H100", "compute_capability": "9.0"}, "m.engine")


# ----------------------------------------------------------------------------- the ONNX files that feed TensorRT
@pytest.fixture(scope="module")
def trt_export(run_dir, photos, tmp_path_factory):
    """fp32 + fp16 + int8-for-TensorRT ONNX from `mineralnet-export --trt --fp16 --int8` (dynamic, batch <= 4).

    Without TensorRT the export writes and checks the ONNX files, then fails naming trtexec."""
    out = tmp_path_factory.mktemp("trt")
    opts = ExportOptions(out_dir=out, quant_data=photos, quant_size=24, profile=BatchProfile.range(1, 2, 4),
                         int8_gate="drop=100,bound=100")
    try:
        export(run_dir, ["fp16", "int8", "trt"], opts)
        error = None
    except MineralNetError as e:
        error = str(e)
    return out, error


def test_fp16_onnx_for_tensorrt_computes_in_fp16_with_fp32_io_and_passes_its_gate(trt_export, photos):
    import onnx

    out, _ = trt_export
    proto = onnx.load(str(out / "model.fp16.onnx"))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]] == [f32, f32, f32]
    weights = [t for t in proto.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == f16 for t in weights)  # conv weights (and so the convs) are fp16
    record = json.loads((out / "model.json").read_text())["exports"]["model.fp16.onnx"]
    assert record["precision"] == "fp16" and record["parity"]["passed"]
    x = _preprocess(_photos(photos)).numpy()  # ORT on this CPU: fp16 file vs fp32 file, the stated tolerance
    ref = xonnx.run_session(xonnx.ort_session(out / "model.onnx"), x)["logits"]
    got = xonnx.run_session(xonnx.ort_session(out / "model.fp16.onnx"), x)["logits"]
    assert 0 < np.abs(got - ref).max() <= xgates.FP16_RTOL * max(1.0, np.abs(ref).max())


def test_int8_onnx_for_tensorrt_is_symmetric_qdq_with_fp16_float_parts(trt_export, photos):
    import onnx

    out, _ = trt_export
    proto = onnx.load(str(out / "model.int8.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert next(o.version for o in proto.opset_import if o.domain == "") == xint8.TRT_INT8_OPSET
    assert [v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]] == [f32, f32, f32]
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    tail = set(xint8.float_tail_nodes(proto))  # pooling, head, softmax, novelty: float by design (issue 16)
    head = [n for n in proto.graph.node if n.op_type == "Gemm" and n.name in tail]
    assert head and all(producer.get(n.input[1]) is None or producer[n.input[1]].op_type != "DequantizeLinear"
                        for n in head)  # logits come from a float head
    for n in (n for n in proto.graph.node if n.op_type in ("Conv", "Gemm") and n.name not in tail):
        x, w = producer[n.input[0]], producer[n.input[1]]
        assert x.op_type == w.op_type == "DequantizeLinear"  # int8 in, fused by TensorRT
        assert inits[w.input[0]].data_type == onnx.TensorProto.INT8
        assert inits[w.input[1]].data_type == f16 and inits[x.input[1]].data_type == f16  # DQ yields fp16
        if len(n.input) > 2:
            assert inits[n.input[2]].data_type == f16  # float bias, fp16: no fp32 layer between Q/DQ pairs
    qs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(not onnx.numpy_helper.to_array(inits[q.input[2]]).any() for q in qs)  # zero point 0
    quantized_outputs = {producer[q.input[0]].op_type for q in qs if q.input[0] in producer}
    assert "Gemm" not in quantized_outputs and "Cast" in quantized_outputs  # logits stay float; input quantized
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    assert producer[softmax.input[0]].op_type == "Cast"  # probs computed in fp32 ...
    assert [n.op_type for n in proto.graph.node if softmax.output[0] in n.input] == ["Identity"]  # ... and kept
    float_ops = {n.op_type for n in proto.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")}
    assert float_ops <= {"Conv", "Gemm", "Relu", "Add", "MaxPool", "ReduceMean", "Concat", "Softmax", "Cast",
                         "Identity", "Flatten", "Reshape"}
    quant = json.loads({p.key: p.value for p in proto.metadata_props}["quantization"])
    assert quant["tensorrt_compatible"] and quant["float_parts"] == "fp16"
    assert xtrt.check_engine_source(out / "model.int8.onnx", "int8")["precision"] == "int8"


def test_int8_onnx_for_tensorrt_runs_in_onnx_runtime_and_passes_its_gate(trt_export, run_dir, photos):
    out, _ = trt_export
    x = _preprocess(_photos(photos)).numpy()
    fp32 = xonnx.run_session(xonnx.ort_session(out / "model.onnx"), x)
    level = json.loads((out / "model.json").read_text())["exports"]["model.int8.onnx"]["quantization"][
        "onnxruntime_optimization"]
    assert level == "disable"  # ORT 1.32's CPU optimiser miscomputes fp16 Q/DQ graphs (bench/RESULTS.md)
    got = xonnx.run_session(xonnx.ort_session(out / "model.int8.onnx", optimization=level), x)
    assert xgates.agreement(fp32["logits"], got["logits"]) >= 0.8
    assert not np.allclose(fp32["logits"], got["logits"], atol=1e-3)  # really quantized
    np.testing.assert_allclose(got["probs"].sum(1), 1.0, atol=1e-5)  # the softmax runs in fp32
    record = json.loads((out / "model.json").read_text())["exports"]["model.int8.onnx"]
    assert record["opset"] == xint8.TRT_INT8_OPSET and record["quantization"]["float_parts"] == "fp16"
    assert record["int8"]["agreement"]["top1"] >= 0.8 and record["int8"]["seconds"] > 0
    assert record["int8"]["coverage"]["quantized"] == record["int8"]["coverage"]["conv_gemm_matmul"]


@pytest.mark.skipif(xtrt.tensorrt_missing() is None, reason="TensorRT is usable here")
def test_trt_without_tensorrt_fails_in_one_line_naming_the_commands_for_both_majors(trt_export, run_dir,
                                                                                    monkeypatch, capsys, tmp_path):
    out, error = trt_export
    assert error is not None and len(error.splitlines()) == 1
    assert "cannot build TensorRT engines:" in error and ("not installed" in error or "no CUDA GPU" in error)
    assert ("`mineralnet-export RUN --trt --fp16 --int8 --calib-data DIR --dynamic --min-batch 1 --opt-batch 2 "
            "--max-batch 4`") in error
    shapes = "--minShapes=images:1x3x64x64 --optShapes=images:2x3x64x64 --maxShapes=images:4x3x64x64"
    for name in ("fp16", "int8"):
        ten = f"trtexec --onnx={out / f'model.{name}.onnx'} --saveEngine={out / f'model.{name}.engine'} --stronglyTyped "
        assert f"with TensorRT 10.x: " in error and ten + shapes in error
        assert ten.replace("--stronglyTyped ", "") + shapes in error.split("with TensorRT 11.x: ")[1]
    trtexec = error[error.index("trtexec "):]
    assert not [f for f in REMOVED_TRTEXEC if f in trtexec.replace(";", " ").split()]
    assert not list(out.glob("*.engine"))
    # through the CLI: exit code 2, one line
    import onnx

    good = onnx.load(str(out / "model.onnx"))
    monkeypatch.setattr(xonnx, "onnx_proto", lambda *a, **k: good)  # skip the slow re-export
    from mineralnet.cli import export_main

    rc = export_main([str(run_dir), "--trt", "--out", str(tmp_path), "--dynamic", "--max-batch", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--onnx=" + str(tmp_path / "model.onnx") in err


def test_trt_refuses_an_int8_model_tensorrt_cannot_build(run_dir, photos, tmp_path, monkeypatch, capsys):
    import onnx

    from mineralnet.cli import export_main

    rc = export_main([str(run_dir), "--trt", "--int8", "--int8-activations", "uint8", "--calib-data", str(photos),
                      "--calib-size", "8", "--int8-gate", "drop=100,bound=100", "--outputs", "logits", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "uint8 asymmetric activations and fp32 float layers" in err and "--int8-activations int8" in err
    assert onnx.load(str(tmp_path / "model.int8.onnx")).opset_import  # the CPU model itself was fine


def test_export_drives_the_fake_builder_on_tensorrt_11(trt_export, run_dir, monkeypatch, tmp_path):
    """The whole --trt path with TensorRT 11 faked: each engine from the file of its precision."""
    out, _ = trt_export
    fake = FakeTensorRT(11)
    monkeypatch.setattr(xtrt, "_tensorrt", lambda: fake)
    monkeypatch.setattr(xtrt, "tensorrt_missing", lambda: None)
    monkeypatch.setattr(xtrt, "device_info", lambda: {**DEVICE, "tensorrt_version": fake.__version__})
    from mineralnet.export.context import ExportContext

    ctx = ExportContext(run_dir, ExportOptions(out_dir=tmp_path, profile=BatchProfile.range(1, 2, 4)))
    ctx.files = {p: out / xtrt.ENGINE_SOURCES[p] for p in xtrt.ENGINE_PRECISIONS}
    arts = xtrt.build_engines(ctx, ["fp32", "fp16", "int8"])
    assert [a.path.name for a in arts] == ["model.engine", "model.fp16.engine", "model.int8.engine"]
    assert [c[1] for c in fake.calls if c[0] == "parse_from_file"] == [str(ctx.files[p]) for p in ("fp32", "fp16",
                                                                                                   "int8")]
    assert fake.failures == [] and not [c for c in fake.calls if c[0] == "set_flag"]
    side = json.loads((tmp_path / "model.int8.engine.json").read_text())
    assert (side["tensorrt_version"], side["tensorrt_major"], side["strongly_typed"]) == ("11.4.1", 11, True)
    assert side["onnx"]["file"] == "model.int8.onnx" and (tmp_path / "model.int8.engine").read_bytes() == b"PLAN"


# ----------------------------------------------------------------------------- on a GPU with TensorRT
@pytest.mark.trt
def test_tensorrt_engines_build_and_match_onnx_runtime(run_dir, photos, tmp_path):
    from mineralnet.infer import Predictor

    opts = ExportOptions(out_dir=tmp_path, quant_data=photos, quant_size=24, profile=BatchProfile.range(1, 2, 4),
                         int8_gate="drop=100,bound=100")
    arts = export(run_dir, ["fp16", "int8", "trt"], opts)
    assert {"model.fp16.engine", "model.int8.engine"} <= {a.path.name for a in arts}
    side = json.loads((tmp_path / "model.fp16.engine.json").read_text())
    assert side["classes"] == CLASSES and side["profile"]["max"] == 4 and side["strongly_typed"]
    import tensorrt

    assert side["tensorrt_version"] == tensorrt.__version__
    paths = _photos(photos)[:5]  # 5 > max batch 4: the runner splits
    ref = Predictor(tmp_path / "model.onnx").probabilities(paths)
    for engine, tol in (("model.fp16.engine", 2e-2), ("model.int8.engine", 1e-1)):
        got = Predictor(tmp_path / engine).probabilities(paths)
        assert np.abs(got - ref).max() <= tol
    broken = tmp_path / "broken.engine"
    broken.write_bytes(b"not a plan")
    (tmp_path / "broken.engine.json").write_text(json.dumps(side))
    with pytest.raises(MineralNetError, match="cannot deserialize"):
        Predictor(broken)


def test_ort_session_follows_the_files_optimisation_metadata(tmp_path):
    # The int8 model for TensorRT says "onnxruntime_optimization": "disable": every ONNX Runtime session of
    # the toolkit (predict, edge runner, bench) must honour it, or ORT's optimiser miscomputes the graph.
    import json as _json

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mineralnet.export.onnx import ort_session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    for wanted, level in (("disable", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                          ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        helper.set_model_props(model, {"quantization": _json.dumps({"onnxruntime_optimization": wanted})})
        path = tmp_path / f"{wanted}.onnx"
        onnx.save(model, str(path))
        assert ort_session(path).get_session_options().graph_optimization_level == level
