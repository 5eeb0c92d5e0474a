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
from mineralnet.artifact import load_model, model_meta, save_model


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
    assert not (run2 / "eval").exists()  # RUN/eval is training's; other data goes next to it
    m = json.loads((run2 / "eval-part" / "metrics.json").read_text())
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


def _run_with_split(tiny_run, tmp_path):
    """A copy of the tiny run with a split.json (12 training, 6 validation photos) and a training-time eval/."""
    run, data, classes = tiny_run
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    index = mdata.scan_dataset(data, classes=classes)
    val = [i for i, (_, label) in enumerate(index.samples) if i % 3 == 0]
    train = [i for i in range(len(index.samples)) if i % 3 != 0]
    mdata.save_splits(run2 / "split.json", index, {"train": train, "val": val}, {"kind": "test"})
    (run2 / "eval").mkdir()
    (run2 / "eval" / "metrics.json").write_text('{"top1": 0.889}')
    return run2, data


def test_eval_on_training_photos_warns_and_keeps_the_training_eval(tiny_run, tmp_path, capsys):
    run, data = _run_with_split(tiny_run, tmp_path)
    assert cli_main(["eval", str(run), "--data", str(data), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "warning: 12 of the 18 photos (67%) are training photos of this run" in out
    assert json.loads((run / "eval" / "metrics.json").read_text()) == {"top1": 0.889}
    assert json.loads((run / f"eval-{data.name}" / "metrics.json").read_text())["n"] == 18
    assert cli_main(["eval", str(run), "--split", "val", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and f"replacing the previous evaluation in {run / 'eval'}" in out
    assert json.loads((run / "eval" / "metrics.json").read_text())["n"] == 6


def test_explain_val_only_without_data_and_overlap_warning(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    run, data = _run_with_split(tiny_run, tmp_path)
    common = ["--workers", "0", "--per-class", "2", "--cams", "2", "--gallery", "2"]
    assert cli_main(["explain", str(run), "--val-only", *common, "--out", str(tmp_path / "x1")]) == 0
    out = capsys.readouterr().out
    assert "on 6 photos" in out and "warning" not in out
    assert cli_main(["explain", str(run), "--data", str(data), *common, "--out", str(tmp_path / "x2")]) == 0
    assert "warning: 12 of the 18 photos (67%) are training photos" in capsys.readouterr().out
    assert cli_main(["explain", str(run), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--val-only" in err


def test_eval_without_data_is_one_line_without_usage(tiny_run, capsys):
    run, _, _ = tiny_run
    assert cli_main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data DIR" in err and "usage" not in err


def test_a_folder_one_level_above_the_classes_names_the_right_one(tiny_run, tmp_path, capsys):
    run, data, _ = tiny_run
    shutil.copytree(data, tmp_path / "cache" / "demo-v1-x")
    assert cli_main(["eval", str(run), "--data", str(tmp_path / "cache"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pass --data {tmp_path / 'cache' / 'demo-v1-x'}" in err
    assert "remove or rename" not in err
