"""mineralnet bench: timing harness, batch sweep, JSON/Markdown, skipped runtimes, FLOP counts, --compare.

No timing thresholds beyond what a sleep guarantees: the machine is shared and noisy.
"""
import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from mineralnet import bench
from mineralnet.cli import main
from mineralnet.model import FusionNet
from mineralnet.artifact import model_meta, save_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP barriers stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = FusionNet("resnet18", stages=(2, 4), num_classes=3)
    save_model(run, model, model_meta(model, classes=["a", "b", "c"], image_size=32, mean=[0.5] * 3,
                                      std=[0.25] * 3, resize=36))
    return run


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A one-Conv ONNX model with a dynamic batch, written with onnx.helper (no exporter needed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["p"]),
         helper.make_node("Flatten", ["p"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------ timing harness
def test_measure_sleep_latency_and_percentile_order():
    seen = []

    def fake_model(x):
        seen.append(x)
        time.sleep(0.02)

    stats = bench.measure(fake_model, ["a", "b", "c"], warmup_s=0.03, duration_s=0.25, min_runs=6)
    lat = stats["latency_ms"]
    assert stats["runs"] >= 6 and len(stats["samples_ms"]) == stats["runs"]
    assert lat["min"] >= 19.9  # a sleep never returns early
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert stats["warmup_runs"] >= 1
    assert set(seen) == {"a", "b", "c"}  # inputs rotate among every buffer


def test_measure_with_a_fake_clock_matches_numpy():
    """Each call advances a fake clock by a known latency; the statistics must be numpy's."""
    now = [0.0]
    durations = iter([0.5] + [0.001 * (1 + (i * 7) % 13) for i in range(1000)])
    taken = []

    def fn(_):
        d = next(durations)
        taken.append(d)
        now[0] += d

    stats = bench.measure(fn, [0], warmup_s=0.6, duration_s=0.05, min_runs=3, clock=lambda: now[0])
    timed = np.array(taken[stats["warmup_runs"]:]) * 1e3
    assert stats["first_call_ms"] == pytest.approx(500)
    assert stats["runs"] == len(timed) and timed.sum() >= 50 and timed[:-1].sum() < 50
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert stats["latency_ms"][key] == pytest.approx(np.percentile(timed, q))
    assert stats["latency_ms"]["mean"] == pytest.approx(timed.mean())


def test_interleaved_variants_share_rounds_and_report_their_own_latency():
    now, order = [0.0], []

    def variant(name, ms):
        def fn(_):
            order.append(name)
            now[0] += ms / 1e3
        return fn

    def broken(_):
        raise RuntimeError("engine built for batch <= 8")

    variants = {"fast": (variant("fast", 2.0), [0, 1], None), "slow": (variant("slow", 6.0), [0], None),
                "broken": (broken, [0], None)}
    out = bench.measure_interleaved(variants, warmup_s=0.01, duration_s=0.1, min_runs=3, clock=lambda: now[0])
    assert isinstance(out["broken"], RuntimeError)
    fast, slow = out["fast"], out["slow"]
    assert fast["runs"] == slow["runs"] >= 3  # one call each per round
    assert fast["latency_ms"]["p50"] == pytest.approx(2.0) and slow["latency_ms"]["p99"] == pytest.approx(6.0)
    assert (fast["runs"] - 1) * 8.0 < 0.1 * 2 * 1e3 <= fast["runs"] * 8.0  # duration x number of variants
    timed = order[-2 * fast["runs"]:]
    assert timed[:2] == ["fast", "slow"] and timed[2:4] == ["slow", "fast"]  # the order rotates


def test_result_row_throughput_and_gflops():
    stats = {"runs": 4, "first_call_ms": 1.0,
             "latency_ms": {"mean": 50.0, "p50": 40.0, "p90": 60.0, "p99": 70.0, "min": 30.0, "max": 80.0}}
    row = bench.result_row(model="m", runtime="torch", precision="fp32", device="cpu", batch=8, image_size=32,
                           stats=stats, gflop_per_image=2.0, peak_gflops=640.0)
    assert row["throughput_img_s"] == pytest.approx(8 / 0.05)
    assert row["gflops"] == pytest.approx(2.0 * 160)
    assert row["fraction_of_peak"] == pytest.approx(0.5)
    assert set(bench.ROW_KEYS) <= set(row)


# ------------------------------------------------------------------ FLOPs and peak
def test_flops_of_conv_and_linear_equal_the_formula():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, stride=2)  # 16x16 -> 8x8
    assert bench.count_flops(conv, 16, batch=2) == 2 * 8 * 8 * 8 * 3 * 3 * 3
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    assert bench.count_flops(head, 16) == 2 * 3 * 5


def test_cpu_peak_derivation():
    zen4 = {"vendor": "AuthenticAMD", "family": 25, "physical_cores": 2, "mhz": 2600.0, "mhz_source": "x",
            "simd": ["avx2", "fma", "avx512f"]}
    peak, how = bench.cpu_peak_gflops(zen4)
    assert peak == pytest.approx(2 * 2.6 * 1 * 32) and "Zen 4" in how
    intel = dict(zen4, vendor="GenuineIntel", family=6)
    assert bench.cpu_peak_gflops(intel)[0] == pytest.approx(2 * 2.6 * 2 * 32)
    avx2 = dict(zen4, simd=["avx2", "fma"])
    assert bench.cpu_peak_gflops(avx2)[0] == pytest.approx(2 * 2.6 * 2 * 16)
    assert bench.cpu_peak_gflops(dict(zen4, mhz=None))[0] is None


# ------------------------------------------------------------------ sweep, skipped runtimes, report
def test_batch_sweep_rows_json_and_markdown(tiny_run, tiny_onnx, tmp_path):
    rows = bench.run_inference([str(tiny_run), str(tiny_onnx)], runtimes=["torch", "ort-cpu", "ort-cuda"],
                               precisions=["fp32", "fp16"], batch_sizes=[1, 3], warmup_s=0, duration_s=0.01,
                               min_runs=2, buffers=2, device="cpu", log=lambda *_: None)
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["runtime"], r["batch"]) for r in ok] == [("torch", 1), ("torch", 3), ("ort-cpu", 1), ("ort-cpu", 3)]
    # fp16 autocast and the CUDA execution provider cannot run on this CPU: rows with reasons
    skipped = {(r["runtime"], r["precision"], r["batch"]): r["reason"] for r in rows if r["status"] == "skipped"}
    assert set(skipped) == {("torch", "fp16", 1), ("torch", "fp16", 3), ("ort-cuda", "fp32", 1), ("ort-cuda", "fp32", 3)}
    assert "CUDA" in skipped[("torch", "fp16", 1)] and "CUDAExecutionProvider" in skipped[("ort-cuda", "fp32", 1)]

    torch_row = ok[0]
    model = FusionNet("resnet18", (2, 4), 3).eval()
    assert torch_row["gflop_per_image"] == pytest.approx(bench.count_flops(model, 32) / 1e9)
    assert torch_row["gflops"] == pytest.approx(torch_row["gflop_per_image"] * torch_row["throughput_img_s"])
    assert torch_row["baseline"] and ok[2]["group"] == "batch 1" and ok[2]["gflop_per_image"] is None

    report = bench.make_report(rows, kind="inference", settings={"warmup_s": 0, "duration_s": 0.01, "min_runs": 2})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    back = bench.load_report(str(path))
    assert back["schema"] == bench.SCHEMA and len(back["rows"]) == len(rows)
    for key in ("cpu", "gpu", "versions", "torch_threads", "load_average"):
        assert key in back["environment"]
    assert back["environment"]["versions"]["torch"] == torch.__version__

    md = bench.render_markdown(back)
    table = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| model")]
    assert len(table) == len(ok)
    assert f"| {ok[2]['latency_ms']['p50']:.2f} |" in table[2]
    ratio = ok[2]["latency_ms"]["p50"] / ok[0]["latency_ms"]["p50"]
    assert f"| {ratio:.2f}x |" in table[2]  # ratio to PyTorch eager fp32 at the same batch
    assert ok[2]["load_1min"] is None or table[2].endswith(f"| {ok[2]['load_1min']:.1f} |")
    assert "ort-cuda / fp32 (batch 1,3): skipped:" in md


def test_a_fixed_batch_onnx_file_gets_one_line_at_other_batch_sizes(tiny_onnx, tmp_path):
    import onnx

    model = onnx.load(str(tiny_onnx))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    rows = bench.run_inference([str(path)], runtimes=["ort-cpu"], precisions=["fp32"], batch_sizes=[1, 8],
                               warmup_s=0, duration_s=0.01, min_runs=2, buffers=2, device="cpu", log=lambda *_: None)
    by_batch = {r["batch"]: r for r in rows}
    assert by_batch[1]["status"] == "ok" and by_batch[8]["status"] == "error"
    assert "has a fixed batch of 1, not 8; export with --dynamic" in by_batch[8]["reason"]


def test_runtime_that_raises_skip_is_reported(tiny_run, monkeypatch):
    def unavailable(bm, precision, device):
        raise bench.Skip("the fake accelerator is not installed")
    monkeypatch.setitem(bench.RUNTIMES, "torch", bench.Runtime("torch", "fake", "pytorch", unavailable))
    rows = bench.run_inference([str(tiny_run)], runtimes=["torch", "tensorrt"], precisions=["fp32"],
                               batch_sizes=[1], log=lambda *_: None)
    assert [(r["runtime"], r["status"], r["reason"]) for r in rows] == [
        ("torch", "skipped", "the fake accelerator is not installed")]


def test_engine_without_gpu_is_skipped(tmp_path):
    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(b"not a plan")
    rows = bench.run_inference([str(engine)], batch_sizes=[1, 2], log=lambda *_: None)
    if torch.cuda.is_available():
        pytest.skip("this test checks the no-GPU path")
    assert [(r["runtime"], r["precision"], r["status"]) for r in rows] == [("tensorrt", "fp16", "skipped")] * 2
    assert "CUDA" in rows[0]["reason"]


def test_compare_prints_ratios(tmp_path, capsys):
    def report(p50, thr):
        row = bench.result_row(model="m", runtime="ort-cpu", precision="fp32", device="cpu", batch=1, image_size=8,
                               stats={"runs": 3, "latency_ms": {k: p50 for k in bench.LATENCY_KEYS}})
        row["throughput_img_s"] = thr
        only = bench.result_row(model="m", runtime="torch", precision="bf16", device="cpu", batch=1, image_size=8,
                                stats={"runs": 3, "latency_ms": {k: 1.0 for k in bench.LATENCY_KEYS}})
        return bench.make_report([row] + ([only] if p50 == 10 else []), kind="inference", settings={})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report(10.0, 100.0)))
    b.write_text(json.dumps(report(25.0, 40.0)))
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| m | ort-cpu | fp32 | 1 | 10.00 | 25.00 | 2.50x | 100.0 | 40.0 | 0.40x |" in out
    assert "A: m/torch/bf16/1" in out


def test_cli_writes_json_and_markdown(tiny_run, tmp_path, capsys):
    js, md = tmp_path / "out.json", tmp_path / "out.md"
    rc = main(["bench", str(tiny_run), "--runtimes", "torch", "--precision", "fp32,bf16",
               "--batch-sizes", "1,2", "--warmup", "0", "--duration", "0.01", "--min-runs", "2",
               "--peak-gflops", "100", "--json", str(js), "--markdown", str(md)])
    assert rc == 0
    rep = json.loads(js.read_text())
    assert [(r["runtime"], r["batch"], r["status"]) for r in rep["rows"]] == [
        ("torch", 1, "ok"), ("torch", 2, "ok"), ("torch", 1, "ok"), ("torch", 2, "ok")]
    assert [r["precision"] for r in rep["rows"]] == ["fp32", "fp32", "bf16", "bf16"]
    r = rep["rows"][1]
    assert r["fraction_of_peak"] == pytest.approx(r["gflops"] / 100)
    assert rep["command"].startswith("mineralnet bench ") and "--batch-sizes 1,2" in rep["command"]
    assert md.read_text().count("| torch") == 4


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing")]) == 2
    assert main(["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    (tmp_path / "x.json").write_text("{}")
    assert main(["bench", "--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(l.startswith("mineralnet: error: ") for l in err)


def test_train_step_rows(tiny_run):
    rows = bench.run_train_step(str(tiny_run), loops=["mineralnet", "bare"], precisions=["fp32", "fp16"],
                                batch_sizes=[4], warmup_s=0, duration_s=0.01, min_runs=2, steps_per_epoch=2,
                                log=lambda *_: None)
    by = {(r["runtime"], r["precision"]): r for r in rows}
    assert by[("mineralnet", "fp32")]["status"] == by[("bare", "fp32")]["status"] == "ok"
    assert by[("mineralnet", "fp32")]["runs"] >= 2 and by[("bare", "fp32")]["baseline"]
    assert by[("mineralnet", "fp16")]["status"] == "skipped" or torch.cuda.is_available()
    # forward + backward FLOPs are about 3x the forward's
    fwd = bench.count_flops(FusionNet("resnet18", (2, 4), 3).eval(), 32)
    assert 2.5 < by[("bare", "fp32")]["gflop_per_image"] * 1e9 / fwd < 3.5


def test_bench_data_script_writes_its_markdown_section(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from mineralnet.data import make_demo_dataset

    root = Path(__file__).resolve().parents[1]
    demo = make_demo_dataset(tmp_path / "demo", classes=2, per_class=4, size=48, seed=0)
    md, js = tmp_path / "data.md", tmp_path / "data.json"
    p = subprocess.run([sys.executable, str(root / "bench" / "data_pipeline.py"), "--data", str(demo), "--image-size", "32",
                        "--n", "6", "--repeats", "2", "--md", str(md), "--json", str(js)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    text = md.read_text()
    assert text.startswith("# Data pipeline throughput") and "python bench/data_pipeline.py --data" in text
    assert "Load average" in text and "Target (ours >= 1.5x torchvision)" in text
    rows = json.loads(js.read_text())["results"]
    ours = next(r for r in rows if r["pipeline"] == "ours")
    assert f"| 32 | ours | {ours['img_per_s']:.0f} | {ours['ratio']:.2f}x vs torchvision |" in text


def test_recipe_table_lists_changes_and_best_epochs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from mineralnet.config import load_config

    root = Path(__file__).resolve().parents[1]
    runs = []
    for name, changes, tops in (("base", {}, [0.5, 0.6, 0.55]), ("mix", {"cutmix": 1.0}, [0.4, 0.7, 0.7])):
        run = tmp_path / name
        run.mkdir()
        cfg = load_config(None, epochs=3, **changes)
        (run / "config.yaml").write_text(cfg.to_yaml())
        (run / "metrics.jsonl").write_text("".join(json.dumps(
            {"epoch": i + 1, "val_top1": t, "val_mean_class_acc": t - 0.05, "seconds": 60.0}) + "\n"
            for i, t in enumerate(tops)))
        (run / "split.json").write_text(json.dumps({"val": ["a.jpg", "b.jpg"]}))
        runs.append(str(run))
    out = tmp_path / "recipe.md"
    p = subprocess.run([sys.executable, str(root / "studies" / "recipe_table.py"), *runs, "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert "| base | (base) | 3 | 3.0 | 60.0 | 55.0 | 2 | 55.0 | - |" in text
    assert "| mix | cutmix=1.0 | 3 | 3.0 | 70.0 | 65.0 | 2 | 70.0 | - |" in text  # first epoch at the best
    assert "same photos" in text
    p = subprocess.run([sys.executable, str(root / "studies" / "recipe_table.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "not a training run" in p.stderr
    assert yaml.safe_load((tmp_path / "base" / "config.yaml").read_text())["epochs"] == 3


def test_recipe_table_by_fold_groups_runs_into_recipes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from mineralnet.config import load_config

    root = Path(__file__).resolve().parents[1]
    runs = []
    # (name, changes, fold, per-epoch val top1)
    specs = (("a0", {}, 0, [0.5, 0.6]), ("a1", {}, 1, [0.7, 0.65]),
             ("b0", {"epochs": 2, "lr": 0.01}, 0, [0.8, 0.9]), ("b2", {"epochs": 2, "lr": 0.01}, 2, [0.6, 0.5]))
    for name, changes, fold, tops in specs:
        run = tmp_path / name
        run.mkdir()
        cfg = load_config(None, **{"epochs": 2, "folds": 5, "fold": fold, "out": str(run), **changes})
        text = cfg.to_yaml()
        if name == "a1":  # a run made before a field existed still groups with its recipe
            text = "\n".join(l for l in text.splitlines() if not l.startswith("split_seed:")) + "\n"
        (run / "config.yaml").write_text(text)
        (run / "metrics.jsonl").write_text("".join(json.dumps(
            {"epoch": i + 1, "val_top1": t, "val_mean_class_acc": t - 0.1, "seconds": 30.0}) + "\n"
            for i, t in enumerate(tops)))
        runs.append(str(run))
    p = subprocess.run([sys.executable, str(root / "studies" / "recipe_table.py"), "--by-fold", *runs],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [l for l in p.stdout.splitlines() if l.startswith("| ")]
    assert lines[0].startswith("| recipe | fold 0 Top1 / mean class acc | fold 1 Top1 / mean class acc | fold 2 ")
    # recipe a: best 60 (fold 0) and 70 (fold 1); last epochs 60 and 65; 1 minute each
    # the recipes were run on different folds: a last column compares them on the folds both have (0)
    assert lines[0].endswith("| mean train min | best Top1 on the common folds (0) |")
    assert lines[1] == "| (base) (a0, a1) | 60.0 / 50.0 | 70.0 / 60.0 | - | **65.0** | 55.0 | 62.5 | 1.0 | 60.0 |"
    assert lines[2] == "| lr=0.01 (b0, b2) | 90.0 / 80.0 | - | 60.0 / 50.0 | **75.0** | 65.0 | 70.0 | 1.0 | 90.0 |"
    p = subprocess.run([sys.executable, str(root / "studies" / "recipe_table.py"), "--by-fold", *runs[:2]],
                       capture_output=True, text=True, timeout=120)
    assert "common folds" not in p.stdout  # one recipe: nothing to line up
    # the same recipe twice on one fold is refused
    p = subprocess.run([sys.executable, str(root / "studies" / "recipe_table.py"), "--by-fold", runs[0], runs[0]],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "same recipe on the same fold 0" in p.stderr


def test_openvino_reads_onnx_when_named_and_same_named_files_get_their_folder(tiny_onnx, tmp_path):
    import shutil

    pytest.importorskip("openvino")
    paths = []
    for folder in ("export", "export-nncf"):
        (tmp_path / folder).mkdir()
        paths.append(str(shutil.copy(tiny_onnx, tmp_path / folder / "tiny.onnx")))
    rows = bench.run_inference(paths, runtimes=["ort-cpu", "openvino"], precisions=["fp32"], batch_sizes=[1],
                               warmup_s=0, duration_s=0.01, min_runs=2, buffers=1, threads=1, log=lambda *_: None)
    assert [(r["model"], r["runtime"], r["precision"], r["status"]) for r in rows] == [
        ("export/tiny.onnx", "ort-cpu", "fp32", "ok"), ("export/tiny.onnx", "openvino", "fp32", "ok"),
        ("export-nncf/tiny.onnx", "ort-cpu", "fp32", "ok"), ("export-nncf/tiny.onnx", "openvino", "fp32", "ok")]
    # without --runtimes an .onnx file gets the ONNX Runtime rows only (OpenVINO must be asked for)
    default = bench.run_inference(paths[:1], batch_sizes=[1], warmup_s=0, duration_s=0.01, min_runs=2, buffers=1,
                                  threads=1, log=lambda *_: None)
    assert "openvino" not in {r["runtime"] for r in default}
