"""Triton model repository (`mineralnet-export RUN --triton DIR`): every written config.pbtxt parses as
Triton's ModelConfig (tritonclient's protobuf) and matches the model's real I/O from an onnxruntime
session, for a fixed and a dynamic batch, fp32 and int8, with and without a TensorRT engine."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("tritonclient")
pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).parent))
from test_export import CLASSES, MEAN, RESIZE, SIZE, STD, _photos, _probe_model  # noqa: E402
from test_openset import _run as _split_run  # noqa: E402

from mineralnet.cli import main  # noqa: E402
from mineralnet.data import make_demo_dataset  # noqa: E402
from mineralnet.errors import MineralNetError  # noqa: E402
from mineralnet.export import BatchProfile, ExportOptions, export  # noqa: E402
from mineralnet.export import tensorrt as xtrt  # noqa: E402
from mineralnet.export import metadata as xmeta  # noqa: E402
from mineralnet.export import triton as xtriton  # noqa: E402
from mineralnet.artifact import model_meta, save_model  # noqa: E402

ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(int64)": "TYPE_INT64"}
DEVICE = {"tensorrt_version": "10.3.0", "gpu": "NVIDIA H200", "compute_capability": "9.0", "cuda": "12.4"}
DYNAMIC = BatchProfile.range(1, 4, 8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", classes=3, per_class=8, size=96)


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("run")
    model = _probe_model(_photos(photos))
    meta = model_meta(model, classes=CLASSES, image_size=SIZE, mean=MEAN, std=STD, resize=RESIZE)
    save_model(folder, model, meta)
    return SimpleNamespace(dir=folder, meta=meta)


def _fake_engine(out_dir: Path, meta: dict, profile: BatchProfile, precision: str = "fp16",
                 outputs=("logits", "probs")) -> Path:
    """A plan file (bytes only) + the `<engine>.json` sidecar the way tensorrt.py writes it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = out_dir / {"fp32": "model.engine", "fp16": "model.fp16.engine", "int8": "model.int8.engine"}[precision]
    engine.write_bytes(b"not a real plan")
    side = xmeta.engine_sidecar(meta, precision=precision, profile=profile, onnx_file=xtrt.ENGINE_SOURCES[precision],
                               onnx_sha256="0" * 64, device=DEVICE, outputs=outputs,
                               workspace_mib=xtrt.DEFAULT_WORKSPACE_MIB)
    xtrt.sidecar_path(engine).write_text(json.dumps(side))
    return engine


@pytest.fixture(scope="module")
def static_repo(run, photos, tmp_path_factory):
    """fp32 + int8 ONNX at a fixed batch of 2, no engine."""
    repo = tmp_path_factory.mktemp("triton_static")
    out = tmp_path_factory.mktemp("export_static")
    opts = ExportOptions(out_dir=out, quant_data=photos, quant_size=16, int8_gate="drop=100,bound=100", profile=BatchProfile.static(2),
                         triton_dir=repo, triton_kind="cpu", triton_instances=2)
    arts = export(run.dir, ["int8"], opts)
    return SimpleNamespace(repo=repo, out=out, arts=arts)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, photos):
    """A calibrated run: its export adds a `novelty` output of shape (B,), one score per image."""
    folder = _split_run(tmp_path_factory, photos, "calibrated")
    assert main(["calibrate", str(folder), "--detector", "mahalanobis"]) == 0
    return folder


@pytest.fixture(scope="module")
def dynamic_repo(run, calibrated, photos, tmp_path_factory):
    """A calibrated run's fp32 + int8 ONNX with a dynamic batch 1..8 (opt 4), logits/probs/embedding/novelty,
    and an fp16 engine."""
    repo = tmp_path_factory.mktemp("triton_dynamic")
    out = tmp_path_factory.mktemp("export_dynamic")
    outputs = ("logits", "probs", "embedding", "novelty")
    _fake_engine(out, run.meta, DYNAMIC, "fp16", outputs)
    opts = ExportOptions(out_dir=out, outputs=outputs, quant_data=photos, quant_size=16, int8_gate="drop=100,bound=100", profile=DYNAMIC,
                         triton_dir=repo)
    arts = export(calibrated, ["int8", "triton"], opts)
    return SimpleNamespace(repo=repo, out=out, arts=arts)


def _ort_io(path):
    """(name, Triton type, shape) of inputs and outputs, from an onnxruntime session over the file."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def rows(values):
        return [(v.name, ORT_TYPES[v.type], [d if isinstance(d, int) else None for d in v.shape]) for v in values]

    return rows(sess.get_inputs()), rows(sess.get_outputs())


def _check_io(cfg: dict, model_file: Path, profile: BatchProfile) -> None:
    """cfg's inputs/outputs == the ONNX session's; batch dim dropped when max_batch_size > 0."""
    inputs, outputs = _ort_io(model_file)
    max_batch = int(cfg.get("max_batch_size", 0))
    if profile.dynamic:
        assert max_batch == profile.max
        assert all(shape[0] is None for _, _, shape in inputs + outputs)  # the ONNX batch really is free
    else:
        assert max_batch == 0
        assert all(shape[0] == profile.max for _, _, shape in inputs + outputs)
    for got, want in ((cfg["input"], inputs), (cfg["output"], outputs)):
        assert [t["name"] for t in got] == [n for n, _, _ in want]
        assert [t["data_type"] for t in got] == [d for _, d, _ in want]
        # one value per image, (B,) with a batch: dims [1] reshaped to a scalar (Triton needs dims)
        assert [[int(x) for x in t["dims"]] for t in got] == [(shape[1:] or [1]) if max_batch else shape
                                                              for _, _, shape in want]
        assert ["reshape" in t for t in got] == [bool(max_batch and not shape[1:]) for _, _, shape in want]
    for t in cfg["output"]:
        assert t.get("label_filename") == ("labels.txt" if t["name"] in ("logits", "probs") else None)


def _check_batching(cfg: dict, profile: BatchProfile) -> None:
    if profile.dynamic:
        want = sorted({b for b in (profile.opt, profile.max) if b > 1})
        assert [int(b) for b in cfg["dynamic_batching"]["preferred_batch_size"]] == want
        assert all(b <= int(cfg["max_batch_size"]) for b in want)
    else:
        assert "dynamic_batching" not in cfg


def _models(repo: Path) -> dict[str, dict]:
    return {p.parent.name: xtriton.read_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def test_static_batch_fp32_and_int8_configs_match_the_onnx_io(static_repo, run):
    cfgs = _models(static_repo.repo)
    assert set(cfgs) == {"mineralnet_onnx_fp32", "mineralnet_onnx_int8"}  # no engine: no tensorrt model
    sources = {"mineralnet_onnx_fp32": "model.onnx", "mineralnet_onnx_int8": "model.int8.onnx"}
    for name, cfg in cfgs.items():
        folder = static_repo.repo / name
        assert cfg["name"] == name and cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
        assert (folder / "1" / "model.onnx").read_bytes() == (static_repo.out / sources[name]).read_bytes()
        _check_io(cfg, folder / "1" / "model.onnx", BatchProfile.static(2))
        _check_batching(cfg, BatchProfile.static(2))
        assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
        assert (folder / "labels.txt").read_text().splitlines() == CLASSES == list(run.meta["classes"])
    records = [a.record for a in static_repo.arts if a.record.get("format") == "triton"]
    assert sorted(r["precision"] for r in records) == ["Triton onnxruntime fp32", "Triton onnxruntime int8"]


def test_dynamic_batch_configs_take_max_batch_and_preferred_sizes_from_the_profile(dynamic_repo):
    cfgs = _models(dynamic_repo.repo)
    assert set(cfgs) == {"mineralnet_onnx_fp32", "mineralnet_onnx_int8", "mineralnet_trt_fp16"}
    for name in ("mineralnet_onnx_fp32", "mineralnet_onnx_int8"):
        cfg = cfgs[name]
        _check_io(cfg, dynamic_repo.repo / name / "1" / "model.onnx", DYNAMIC)
        _check_batching(cfg, DYNAMIC)
        assert [t["name"] for t in cfg["output"]] == ["logits", "probs", "embedding", "novelty"]
        assert cfg["output"][3]["reshape"] == {} and cfg["output"][3]["dims"] == ["1"]  # shape [ ]: a scalar
        assert cfg["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
        assert cfg["dynamic_batching"]["preferred_batch_size"] == [4, 8]


def test_engine_config_matches_the_onnx_it_was_built_from(dynamic_repo):
    cfg = _models(dynamic_repo.repo)["mineralnet_trt_fp16"]
    folder = dynamic_repo.repo / "mineralnet_trt_fp16"
    assert cfg["platform"] == "tensorrt_plan" and cfg["backend"] == "tensorrt"
    assert cfg["default_model_filename"] == "model.plan"
    assert (folder / "1" / "model.plan").read_bytes() == b"not a real plan"
    # the engine was built from model.onnx's graph (fp32 I/O, strongly typed): same names, types, dims
    _check_io(cfg, dynamic_repo.out / "model.onnx", DYNAMIC)
    _check_batching(cfg, DYNAMIC)
    assert cfg["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
    assert (folder / "labels.txt").read_text().splitlines() == CLASSES


def test_static_engine_keeps_its_batch_in_the_dims(tmp_path, run):
    out, repo = tmp_path / "export", tmp_path / "repo"
    _fake_engine(out, run.meta, BatchProfile.static(4), "fp32")
    ctx = _ctx(out, repo, run.meta)
    (folder, record), = xtriton.export_triton(ctx)
    cfg = xtriton.read_config(folder / "config.pbtxt")
    assert folder.name == "mineralnet_trt_fp32" and record["backend"] == "tensorrt"
    assert int(cfg.get("max_batch_size", 0)) == 0 and "dynamic_batching" not in cfg
    assert [[int(d) for d in t["dims"]] for t in cfg["input"]] == [[4, 3, SIZE, SIZE]]
    assert [[int(d) for d in t["dims"]] for t in cfg["output"]] == [[4, len(CLASSES)]] * 2


def _ctx(out: Path, repo: Path, meta: dict, profile: BatchProfile | None = None, **options):
    profile = profile or BatchProfile.static(1)
    opts = ExportOptions(out_dir=out, profile=profile, triton_dir=repo, **options)
    batch = {"dynamic": profile.dynamic, "size": None if profile.dynamic else profile.max, "min": profile.min,
             "opt": profile.opt, "max": profile.max}
    return SimpleNamespace(options=opts, out_dir=out, meta=meta, files={}, batch_info=lambda: batch)


@pytest.mark.parametrize("case, message", [
    ("min_batch", "rebuild it with --dynamic --min-batch 1"),
    ("no_sidecar", "has no model.fp16.engine.json beside it"),
    ("kind", "--triton-kind 'tpu': choose gpu or cpu"),
    ("instances", "--triton-instances 0 must be at least 1"),
    ("file", "is a file; pass a folder"),
])
def test_bad_cases_fail_with_one_line(tmp_path, run, case, message):
    out, repo = tmp_path / "export", tmp_path / "repo"
    options = {}
    if case == "min_batch":
        _fake_engine(out, run.meta, BatchProfile.range(2, 4, 8))
    elif case == "no_sidecar":
        xtrt.sidecar_path(_fake_engine(out, run.meta, DYNAMIC)).unlink()
    elif case == "kind":
        options["triton_kind"] = "tpu"
    elif case == "instances":
        options["triton_instances"] = 0
    elif case == "file":
        repo.write_text("x")
    with pytest.raises(MineralNetError) as err:
        xtriton.export_triton(_ctx(out, repo, run.meta, **options))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not list(repo.glob("*/config.pbtxt")) if repo.is_dir() else True


def test_read_config_rejects_a_field_triton_does_not_have(tmp_path):
    bad = tmp_path / "config.pbtxt"
    bad.write_text('name: "m"\nmax_batch_sizes: 4\n')
    with pytest.raises(MineralNetError, match="max_batch_sizes"):
        xtriton.read_config(bad)


def test_cli_writes_the_repository_and_refuses_an_engine_from_batch_2_in_one_line(tmp_path, run, capsys):
    from mineralnet.cli import export_main

    out, repo = tmp_path / "export", tmp_path / "repo"
    assert export_main([str(run.dir), "--out", str(out), "--dynamic", "--max-batch", "4", "--triton", str(repo),
                        "--triton-kind", "cpu"]) == 0
    cfg = xtriton.read_config(repo / "mineralnet_onnx_fp32" / "config.pbtxt")
    assert int(cfg["max_batch_size"]) == 4 and cfg["instance_group"][0]["kind"] == "KIND_CPU"
    _check_io(cfg, repo / "mineralnet_onnx_fp32" / "1" / "model.onnx", BatchProfile.range(1, 4, 4))
    capsys.readouterr()
    _fake_engine(out, run.meta, BatchProfile.range(2, 4, 4))
    assert export_main([str(run.dir), "--out", str(out), "--dynamic", "--max-batch", "4",
                        "--triton", str(repo)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--min-batch 1" in err and "model.fp16.engine" in err
    assert not (repo / "mineralnet_trt_fp16").exists()
