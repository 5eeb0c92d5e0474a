"""`mineralnet predict` and `Predictor`: the same answers from a run, an ONNX file (static batch
here) and the command line; every bad input is one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mineralnet.cli import main
from mineralnet.data import build_transforms, load_image, make_demo_dataset
from mineralnet.errors import MineralNetError
from mineralnet.model import FusionNet
from mineralnet.infer import Predictor
from mineralnet.artifact import load_model, model_meta, save_model

CLASSES = ["pyrite", "malachite", "quartz"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", classes=3, per_class=3, size=80)
    return sorted(str(p) for p in Path(root).rglob("*.jpg"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(3)
    model = FusionNet("resnet18", (2, 4), 3)
    with torch.no_grad():
        model.head.weight.mul_(40)  # spread the logits so photos get different answers
    run = tmp_path_factory.mktemp("run")
    save_model(run, model, model_meta(model, classes=CLASSES, image_size=48, mean=[0.5, 0.5, 0.5],
                                      std=[0.2, 0.2, 0.2], resize=60))
    return run


@pytest.fixture(scope="module")
def onnx_b2(run_dir, tmp_path_factory):
    """Through the real command line: fixed batch 2, logits only."""
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", str(run_dir), "--batch", "2", "--outputs", "logits", "--out", str(out)]) == 0
    return out / "model.onnx"


def _manual_probs(run_dir, paths):
    model, meta = load_model(run_dir)
    t = build_transforms(meta["image_size"], meta["mean"], meta["std"], train=False, resize=meta["resize"])
    x = torch.stack([t(load_image(p)) for p in paths])
    with torch.no_grad():
        return torch.softmax(model(x), 1).numpy()


def test_predictor_on_a_run_is_the_model_with_its_own_preprocessing(run_dir, photos):
    p = Predictor(run_dir)
    assert p.kind == "pytorch" and p.classes == CLASSES
    probs = p.probabilities(photos)
    np.testing.assert_allclose(probs, _manual_probs(run_dir, photos), atol=1e-6)
    assert len(set(probs.argmax(1))) > 1
    top = p.predict(photos, topk=2)
    assert [t.top[0][0] for t in top] == [CLASSES[i] for i in probs.argmax(1)]
    assert all(len(t.top) == 2 and t.top[0][1] >= t.top[1][1] for t in top)


def test_onnx_predictor_with_a_fixed_batch_pads_and_agrees(run_dir, photos, onnx_b2):
    p = Predictor(onnx_b2)
    assert p.kind == "onnx" and p.classes == CLASSES and p.meta["image_size"] == 48
    assert p.backend.session.get_inputs()[0].shape[0] == 2
    paths = photos[:5]  # odd count: the last chunk is padded
    np.testing.assert_allclose(p.probabilities(paths), _manual_probs(run_dir, paths), atol=1e-5)
    # arrays and PIL images go through the same preprocessing as files
    from PIL import Image

    arr = load_image(paths[0])
    np.testing.assert_allclose(p.probabilities([arr, Image.fromarray(arr)]),
                               np.repeat(p.probabilities(paths[:1]), 2, axis=0), atol=1e-6)


def test_predict_command_prints_names_and_json(run_dir, photos, onnx_b2, capsys):
    folder = str(Path(photos[0]).parent)
    assert main(["predict", str(onnx_b2), photos[0], folder, "--topk", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 3  # the file, then the 3 photos of its folder
    for line in lines:
        words = line.split()[1:]  # after the image path: name, probability, name, probability
        assert len(words) == 4 and words[0] in CLASSES and words[2] in CLASSES and words[1].endswith("%")
    assert main(["predict", str(run_dir), *photos[:2], "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["runtime"] == "pytorch" and [r["file"] for r in doc["predictions"]] == photos[:2]
    want = _manual_probs(run_dir, photos[:2])
    for r, row in zip(doc["predictions"], want):
        assert len(r["top"]) == 3 and r["top"][0]["label"] == CLASSES[row.argmax()]
        assert r["top"][0]["prob"] == pytest.approx(row.max(), abs=1e-5)


def test_bad_inputs_are_one_clear_line_each(run_dir, photos, onnx_b2, tmp_path, capsys):
    empty_run = tmp_path / "run_without_weights"
    empty_run.mkdir()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    bad_image = tmp_path / "broken.jpg"
    bad_image.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    import onnx

    bare = onnx.load(str(onnx_b2))
    del bare.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(bare, str(foreign))
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    cases = [
        ([str(run_dir), str(tmp_path / "nope.jpg")], "image '" + str(tmp_path / "nope.jpg") + "' does not exist"),
        ([str(empty_run), photos[0]], "has no model.safetensors"),
        ([str(corrupt), photos[0]], "ONNX Runtime cannot load"),
        ([str(foreign), photos[0]], "not written by mineralnet-export"),
        ([str(run_dir), str(bad_image)], "cannot read image"),
        ([str(engine), photos[0]], "model.engine.json"),
        ([str(tmp_path / "missing_model"), photos[0]], "does not exist"),
        ([str(run_dir), photos[0], "--topk", "0"], "--topk 0"),
    ]
    for argv, expected in cases:
        rc = main(["predict", *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("mineralnet: error:"), (argv, err)
        assert expected in err, (argv, err)


def test_engine_without_tensorrt_says_what_is_missing(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT is usable here")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    (tmp_path / "model.engine.json").write_text(json.dumps({"classes": CLASSES}))
    with pytest.raises(MineralNetError, match="TensorRT is not installed|no CUDA GPU"):
        Predictor(engine)


# ----------------------------------------------------------------------------- the inference layer (issue 27)
def test_one_table_names_every_model_file_and_bench_reads_it(run_dir, onnx_b2, tmp_path):
    from mineralnet.bench.runtimes import open_model
    from mineralnet.infer import BACKENDS, model_kind

    expected = {"x.onnx": "onnx", "x.ENGINE": "tensorrt", "x.plan": "tensorrt", "x.trt": "tensorrt",
                "x.xml": "openvino", "x.tflite": "litert", "x.pte": "executorch", "x.mlpackage": "coreml",
                "model.safetensors": "pytorch", "model.json": "pytorch"}
    assert {name: model_kind(tmp_path / name).name for name in expected} == expected
    assert model_kind(run_dir).name == "pytorch" and model_kind(tmp_path / "x.pt") is None
    suffixes = [s for k in BACKENDS for s in k.suffixes]
    assert len(suffixes) == len(set(suffixes))  # one row per suffix
    assert open_model(str(run_dir)).kind == "pytorch" and open_model(str(onnx_b2)).kind == "onnx"
    with pytest.raises(MineralNetError, match="Core ML models run only on macOS"):
        Predictor(_touch(tmp_path / "m.mlmodel"))
    (tmp_path / "m.mlpackage").mkdir()  # a folder, yet not a run directory
    assert model_kind(tmp_path / "m.mlpackage").name == "coreml"
    with pytest.raises(MineralNetError, match="unknown kind; pass a run directory, an .onnx file"):
        Predictor(_touch(tmp_path / "m.pt"))
    with pytest.raises(MineralNetError, match="not a model `mineralnet bench` measures"):
        open_model(str(_touch(tmp_path / "m.pt")))


def _touch(path):
    path.write_bytes(b"x")
    return path


def test_predict_loader_gives_the_same_logits_for_a_model_and_its_onnx_file(run_dir, photos, tmp_path):
    from torch.utils.data import DataLoader

    from mineralnet.data import PhotoDataset
    from mineralnet.infer import open_backend, predict_loader
    from mineralnet.infer.loop import evaluate

    out = tmp_path / "onnx"
    assert main(["export", str(run_dir), "--dynamic", "--outputs", "logits,embedding", "--out", str(out)]) == 0
    model, meta = load_model(run_dir)
    t = build_transforms(meta["image_size"], meta["mean"], meta["std"], train=False, resize=meta["resize"])
    labels = [i % len(CLASSES) for i in range(len(photos))]
    loader = DataLoader(PhotoDataset(list(zip(photos, labels)), t), batch_size=4)
    torch_out = predict_loader(model, loader, embeddings=True)
    onnx_out = predict_loader(open_backend(out / "model.onnx"), loader, embeddings=True)
    # independent computation: the whole batch through the model at once
    x = torch.stack([t(load_image(p)) for p in photos])
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
    np.testing.assert_allclose(torch_out["logits"], logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(torch_out["embeddings"], feats.numpy(), atol=1e-5)
    assert torch_out["labels"].tolist() == labels == onnx_out["labels"].tolist()
    np.testing.assert_allclose(onnx_out["logits"], torch_out["logits"], atol=1e-4)
    np.testing.assert_allclose(onnx_out["embeddings"], torch_out["embeddings"], atol=1e-4)
    ev = evaluate(model, loader)
    np.testing.assert_allclose(ev["probs"], torch.softmax(logits, 1).numpy(), atol=1e-6)
    ce = -np.log(ev["probs"][np.arange(len(labels)), labels]).mean()
    assert ev["loss"] == pytest.approx(ce, rel=1e-4) and ev["preds"].tolist() == logits.argmax(1).tolist()
    with pytest.raises(MineralNetError, match="re-export it with --outputs"):
        predict_loader(_OnlyProbs(), [(x[:1], torch.zeros(1))])


class _OnlyProbs:
    kind = "onnx"
    meta: dict = {}

    def run(self, x):
        return {"probs": np.ones((len(x), 3), np.float32) / 3}
