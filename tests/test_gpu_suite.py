"""bench/gpu_suite.py started as it would be on a GPU machine: a fresh `python3 bench/gpu_suite.py --out DIR`
from the repository root, nothing installed and no PYTHONPATH; here it takes its CPU path at tiny sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch", "8", "--photos", "48", "--photo-side", "48",
        "--workers", "1", "--warmup-s", "0.1", "--duration-s", "0.2", "--budget-s", "3000"]


@pytest.mark.slow
def test_gpu_suite_cpu_path_from_a_bare_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "suite"
    p = subprocess.run([sys.executable, "bench/gpu_suite.py", "--out", str(out), *TINY], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    assert data["environment"]["mineralnet_from"] == str(ROOT / "mineralnet")  # this checkout, not an install
    rows = {(r["kind"], r["name"], r["precision"], r["batch"]): r for r in data["rows"]}
    # fp16 (and compile, off on a CPU by default) are skipped with their reason, not errors
    ref = rows[("train", "reference: bare step, GradScaler", "fp16", 8)]
    assert ref["status"] == "skipped" and "CUDA" in ref["reason"]
    assert rows[("train", "bare step, torch.compile", "bf16", 8)]["status"] == "skipped"
    for key in [("train", "bare step", "bf16", 8), ("train", "mineralnet train_one_epoch", "bf16", 8),
                ("train", "pipeline: augmentation on workers", "bf16", 8),
                ("infer", "eager, channels_last", "bf16", 1), ("infer", "eager, channels_last", "bf16", 32),
                ("infer", "eager, channels_last, TF32", "fp32", 8)]:
        r = rows[key]
        assert r["status"] == "ok", (key, r.get("reason"))
        assert r["img_s"] > 0 and r["tflops"] > 0 and r["pct_peak"] is None  # no GPU peak for a CPU
    # the device-side pipeline either runs or is one error row (a checkout without it), never the end
    device = rows[("train", "pipeline: augmentation on device", "bf16", 8)]
    assert device["status"] in ("ok", "error")
    assert rows[("infer", "TensorRT engines", "fp16/int8", 0)]["status"] == "skipped"
    md = (out / "gpu_suite.md").read_text()
    assert "### Training" in md and "### Inference" in md and md.index("### Training") < md.index("### Inference")
    assert md.count("| bare step | resident | bf16 | 8 |") == 1


def _suite_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peaks_and_the_fraction_of_peak_against_a_direct_computation(tmp_path):
    gs = _suite_module()
    assert gs.peak_tflops("NVIDIA H200", "bf16") == 989.0 and gs.peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.0
    assert gs.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 495.0  # fp32 rows run as TF32
    assert gs.peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert gs.peak_tflops("Tesla T4", "fp16") is None and gs.peak_tflops(None, "bf16") is None

    class Args:
        budget_s = 100.0
    suite = gs.Suite(tmp_path, Args())
    suite.env.update(gpu={"name": "NVIDIA H200"}, backbone="resnet50")
    ref = suite.add(dict(kind="train", name="reference: bare step, GradScaler", precision="fp16", batch=256,
                         image_size=224, status="ok", img_s=3000.0, ms_per_batch=85.3, gflop_per_image=24.6))
    suite.add(dict(kind="train", name="bare step", precision="bf16", batch=256, image_size=224, status="ok",
                   img_s=1500.0, ms_per_batch=170.6, gflop_per_image=24.6))
    suite.add(dict(kind="infer", name="eager", precision="fp16", batch=1, image_size=224, status="error",
                   reason="OutOfMemoryError: x"))
    assert ref["tflops"] == pytest.approx(3000 * 24.6 / 1000)
    assert ref["pct_peak"] == pytest.approx(100 * 3000 * 24.6 / 1000 / 989)
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| 1.00x |" in md and "| 0.50x |" in md and "error: OutOfMemoryError: x" in md
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["rows"][2]["status"] == "error"
