"""Unknown / novelty / candidate sets everywhere a prediction is made, on a tiny calibrated run:
PyTorch, ONNX (fp32, int8) and the numpy edge runner agree; a run without calibration still predicts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mineralnet.calibration import Calibration, calibrate_run, core
from mineralnet.cli import main
from mineralnet.data import build_transforms, load_image, make_demo_dataset
from mineralnet.export import ExportOptions, export
from mineralnet.model import FusionNet
from mineralnet.infer import Predictor
from mineralnet.artifact import model_meta, save_model
from mineralnet.files import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["pyrite", "malachite", "quartz"]
SIZE, RESIZE, MEAN, STD = 64, 73, [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]
NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['mineralnet'] = None; "


def _photos(folder):
    return sorted(str(p) for p in Path(folder).rglob("*.jpg"))


def _trained_model(paths) -> FusionNet:
    """Random backbone + a ridge-regression head fitted on its own features (a 'trained' run in seconds)."""
    torch.manual_seed(0)
    model = FusionNet("resnet18", (2, 4), len(CLASSES)).eval()
    t = build_transforms(SIZE, MEAN, STD, train=False, resize=RESIZE)
    labels = torch.tensor([CLASSES.index(Path(p).parent.name) for p in paths])
    with torch.no_grad():
        f = model.embed(torch.stack([t(load_image(p)) for p in paths])).double()
        f1 = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
        target = torch.nn.functional.one_hot(labels, len(CLASSES)).double() * 6 - 3
        w = torch.linalg.solve(f1.T @ f1 + 1e-1 * torch.eye(f1.shape[1], dtype=f.dtype), f1.T @ target)
        model.head.weight.copy_(w[:-1].T.float())
        model.head.bias.copy_(w[-1].float())
    return model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", classes=3, per_class=12, size=96)


def _run(tmp_path_factory, photos, name):
    paths = _photos(photos)
    run = tmp_path_factory.mktemp(name)
    train, val = paths[0::3] + paths[1::3], paths[2::3]
    model = _trained_model(train)
    save_model(run, model, model_meta(model, classes=CLASSES, image_size=SIZE, mean=MEAN, std=STD, resize=RESIZE))
    rel = lambda ps: [str(Path(p).relative_to(photos)) for p in ps]  # noqa: E731
    atomic_write_json(run / "split.json", {"kind": "val_split", "root": str(photos), "classes": CLASSES,
                                           "train": rel(train), "val": rel(val)})
    return run


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, photos):
    """A calibrated run exported to fp32 and int8 ONNX (the detector in the graph)."""
    run = _run(tmp_path_factory, photos, "calibrated")
    # relmaha: its graph computes both distances of the feature detectors (class Gaussians, class-blind one)
    assert main(["calibrate", str(run), "--detector", "relmaha"]) == 0
    export(run, ["int8"], ExportOptions(quant_data=photos, quant_size=12, int8_gate="drop=100,bound=100"))
    return run


def test_calibrate_writes_safetensors_and_json_and_the_threshold_accepts_95pct(calibrated):
    assert (calibrated / "calibration.json").is_file() and (calibrated / "calibration.safetensors").is_file()
    cal = Calibration.load(calibrated)
    assert cal.detector == "relmaha" and cal.acceptance == 0.95 and set(cal.thresholds) == {
        "msp", "energy", "maxlogit", "mahalanobis", "relmaha", "knn"}
    assert cal.info["val_photos"] == 12 and cal.info["train_photos"] == 24
    assert cal.info["nll"]["after"] <= cal.info["nll"]["before"] + 1e-12


def test_onnx_and_edge_give_the_same_unknown_novelty_and_set_as_pytorch(calibrated, photos):
    import onnx

    paths = _photos(photos)
    # strange photos: colour noise is less like the training minerals than the minerals are
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (90, 90, 3), dtype=np.uint8) for _ in range(4)]
    ref = Predictor(calibrated).predict(paths + noise, coverage=0.9)
    onnx_path = calibrated / "export" / "model.onnx"
    assert [o.name for o in onnx.load(str(onnx_path)).graph.output] == ["logits", "probs", "novelty"]
    got = Predictor(onnx_path).predict(paths + noise, coverage=0.9)
    for a, b in zip(ref, got):
        assert a.unknown == b.unknown and a.set == b.set and [n for n, _ in a.top] == [n for n, _ in b.top]
        assert b.novelty == pytest.approx(a.novelty, rel=1e-4, abs=1e-4)
        assert np.abs(a.probs - b.probs).max() < 1e-5
    assert any(r.unknown for r in ref) and not all(r.unknown for r in ref)
    assert np.mean([r.novelty for r in ref[-4:]]) > np.median([r.novelty for r in ref[:-4]])
    assert any(len(r.set) > 1 for r in ref) or all(len(r.set) == 1 for r in ref)
    # the numpy edge runner, without torch and without mineralnet
    code = (NO_TORCH + "import runpy; sys.argv = ['edge_predict.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(REPO / 'export' / 'edge_predict.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(onnx_path), *paths, "--json", "--coverage", "0.9"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    edge = json.loads(proc.stdout)["predictions"]
    for a, e in zip(ref, edge):
        assert e["unknown"] == a.unknown and e["set"] == a.set and e["top"][0]["label"] == a.top[0][0]
        assert e["novelty"] == pytest.approx(a.novelty, rel=1e-4, abs=1e-4)
        assert e["top"][0]["prob"] == pytest.approx(a.top[0][1], abs=1e-5)


def test_int8_keeps_the_head_softmax_and_novelty_in_float(calibrated, photos):
    import onnx

    proto = onnx.load(str(calibrated / "export" / "model.int8.onnx"))
    producer = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type in ("Gemm", "Softmax", "MatMul") or node.output[0] in ("novelty", "probs", "logits"):
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear"
                       for i in node.input), node.name
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("logits", "probs") for n in proto.graph.node)
    probs = Predictor(calibrated / "export" / "model.int8.onnx").probabilities(_photos(photos))
    assert not np.allclose(probs * 255, np.round(probs * 255), atol=1e-3)  # not multiples of 1/255


def test_predict_json_schema(calibrated, photos, capsys):
    paths = _photos(photos)[:3]
    assert main(["predict", str(calibrated), *paths, "--json", "--coverage", "0.9", "--topk", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["calibrated"] is True and doc["coverage"] == 0.9 and "note" not in doc
    for r, path in zip(doc["predictions"], paths):
        assert set(r) == {"file", "top", "unknown", "novelty", "set"} and r["file"] == path
        assert [set(t) for t in r["top"]] == [{"label", "prob"}] * 2 and r["top"][0]["prob"] >= r["top"][1]["prob"]
        assert isinstance(r["unknown"], bool) and isinstance(r["novelty"], float)
        assert r["set"][0] == r["top"][0]["label"] and set(r["set"]) <= set(CLASSES)
    assert main(["predict", str(calibrated), paths[0]]) == 0
    line = capsys.readouterr().out
    assert ("known" in line or "UNKNOWN?" in line) and "novelty" in line


def test_a_run_without_calibration_still_predicts_with_unknown_null(tmp_path_factory, photos, capsys):
    run = _run(tmp_path_factory, photos, "plain")
    assert main(["predict", str(run), _photos(photos)[0], "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (r,) = doc["predictions"]
    assert doc["calibrated"] is False and "mineralnet calibrate" in doc["note"] and "\n" not in doc["note"]
    assert r["unknown"] is None and r["novelty"] is None and "set" not in r
    assert main(["predict", str(run), _photos(photos)[0], "--coverage", "0.9"]) == 2
    assert "calibrat" in capsys.readouterr().err


def test_eval_reports_ece_coverage_and_draws_the_reliability_diagram(calibrated, capsys):
    assert main(["eval", str(calibrated), "--split", "val", "--workers", "0"]) == 0
    m = json.loads((calibrated / "eval" / "metrics.json").read_text())
    c = m["calibration"]
    assert c["ece_after"] >= 0 and c["coverage_target"] == 0.9 and len(c["per_class"]) == 3
    assert 0 <= c["coverage"] <= 1 and 1 <= c["mean_set_size"] <= 3
    assert (calibrated / "eval" / "reliability.png").stat().st_size > 1000
    assert "ECE" in capsys.readouterr().out


def test_openset_bench_reports_every_detector_for_each_shrinkage(calibrated, tmp_path):
    """studies/openset.py on a run that knows 3 demo minerals, with a 4th (amethyst) as the unknown one."""
    import runpy

    data = make_demo_dataset(tmp_path / "all", classes=4, per_class=6, size=96)
    out = tmp_path / "openset.json"
    bench = runpy.run_path(str(REPO / "studies" / "openset.py"), run_name="openset_study")
    assert bench["main"]([str(calibrated), "--data", str(data), "--shrinkage", "0.1", "0.5", "--out", str(out)]) == 0
    reports = json.loads(out.read_text())
    assert [r["shrinkage"] for r in reports] == [0.1, 0.5]
    for r in reports:
        assert r["held_out"] == ["amethyst"] and r["unknown_photos"] == 6
        assert set(r["detectors"]) == set(core.DETECTORS)
        assert all(0.0 <= d["auroc"] <= 1.0 for d in r["detectors"].values())
    # shrinkage moves only the covariance-based detectors
    for det in ("msp", "energy", "maxlogit", "knn"):
        assert reports[0]["detectors"][det] == reports[1]["detectors"][det]


def test_calibrate_refuses_a_shrinkage_outside_0_1_in_one_line(calibrated, capsys):
    before = (calibrated / "calibration.json").read_bytes()
    assert main(["calibrate", str(calibrated), "--shrinkage", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--shrinkage 1.5" in err and "\n" not in err
    assert (calibrated / "calibration.json").read_bytes() == before  # nothing was rewritten
