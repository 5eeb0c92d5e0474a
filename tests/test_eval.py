"""`mineralnet eval RUN --data DIR`: class names matched by name, files written, numbers right, bad input."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.model import FusionNet
from mineralnet.runs import load_model, model_meta, save_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run dir with a random resnet18 F2+F4 for the 3 demo classes (in REVERSED order, so that
    matching folders to classes by name, not by sorted position, is what makes the numbers right)."""
    root = tmp_path_factory.mktemp("eval")
    data = Path(mdata.make_demo_dataset(root / "demo", classes=3, per_class=6, size=40, seed=5))
    classes = sorted(mdata.scan_dataset(data).classes, reverse=True)
    torch.manual_seed(1)
    model = FusionNet("resnet18", (2, 4), len(classes))
    run = root / "run"
    save_model(run, model, model_meta(model, classes=classes, image_size=32, mean=[0.5] * 3, std=[0.25] * 3,
                                      resize=36))
    return run, data, classes


def _independent(run, data):
    """Targets/predictions by a plain loop: label = the run's index of the folder name."""
    model, meta = load_model(run)
    tf = mdata.build_transforms(meta["image_size"], meta["mean"], meta["std"], train=False, resize=meta["resize"])
    targets, preds, probs = [], [], []
    for folder in sorted(p for p in Path(data).iterdir() if p.is_dir()):
        for f in sorted(folder.iterdir()):
            with torch.no_grad():
                p = model(tf(mdata.load_image(f))[None]).softmax(1)[0]
            targets.append(meta["classes"].index(folder.name))
            preds.append(int(p.argmax()))
            probs.append(p.numpy())
    return np.array(targets), np.array(preds), np.array(probs)


def test_eval_writes_metrics_equal_to_an_independent_loop(tiny_run, tmp_path, capsys):
    run, data, classes = tiny_run
    out = tmp_path / "ev"
    assert cli_main(["eval", str(run), "--data", str(data), "--workers", "0", "--batch-size", "4",
                     "--out", str(out)]) == 0
    t, p, probs = _independent(run, data)
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == len(t) == 18
    assert m["classes"] == classes
    assert m["top1"] == pytest.approx(np.mean(t == p))
    per_class = [np.mean(p[t == c] == c) for c in range(3)]
    assert m["per_class_acc"] == pytest.approx(per_class)
    assert m["mean_class_acc"] == pytest.approx(np.mean(per_class))
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (t, p), 1)
    assert m["confusion"] == cm.tolist()
    top3 = np.mean([t[i] in np.argsort(-probs[i])[:3] for i in range(len(t))])
    assert m["top3"] == pytest.approx(top3)
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["class"] for r in rows] == classes and [int(r["support"]) for r in rows] == [6, 6, 6]
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "mean class acc (paper's mAP)" in printed and all(c in printed for c in classes)
    assert not (run / "eval").exists()  # --out was honoured


def test_eval_default_out_and_a_folder_with_some_classes_only(tiny_run, tmp_path):
    run, data, classes = tiny_run
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    part = tmp_path / "part"
    shutil.copytree(data / classes[2], part / classes[2])  # one mineral only
    assert cli_main(["eval", str(run2), "--data", str(part), "--workers", "0"]) == 0
    m = json.loads((run2 / "eval" / "metrics.json").read_text())
    assert m["n"] == 6 and m["classes"] == classes
    assert m["per_class_acc"][0] is None and m["per_class_acc"][1] is None
    assert m["mean_class_acc"] == pytest.approx(m["per_class_acc"][2])


@pytest.mark.parametrize("case, message", [
    ("unknown_class", "amethyst"),
    ("no_weights", "has no model.safetensors"),
    ("missing_data", "does not exist"),
    ("bad_batch", "--batch-size 0 must be at least 1"),
])
def test_eval_bad_input_is_one_line(tiny_run, tmp_path, capsys, case, message):
    run, data, classes = tiny_run
    args = [str(run), "--data", str(data), "--workers", "0"]
    if case == "unknown_class":
        other = tmp_path / "other"
        shutil.copytree(data / classes[0], other / classes[0])
        shutil.copytree(data / classes[1], other / "amethyst")
        args[2] = str(other)
    elif case == "no_weights":
        empty = tmp_path / "run"
        empty.mkdir()
        args[0] = str(empty)
    elif case == "missing_data":
        args[2] = str(tmp_path / "nowhere")
    else:
        args += ["--batch-size", "0"]
    rc = cli_main(["eval", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("mineralnet: error:"), err
    assert message in err
