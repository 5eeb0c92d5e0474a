"""Ensembles (`mineralnet ensemble`, `Predictor(ENS)`) and test-time augmentation (mineralnet.infer.tta):
the averaging and the members' mutual information against a by-hand computation, TTA against
by-hand averages, and two tiny demo-preset runs made into an ensemble end to end."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.infer import ensemble as ens
from mineralnet.infer.ensemble import common_val
from mineralnet.errors import MineralNetError
from mineralnet.model import FusionNet
from mineralnet.infer import Predictor
from mineralnet.artifact import model_meta, save_model
from mineralnet.infer.tta import parse_tta, tta_answers, view


# ----------------------------------------------------------------------------- maths, by hand
def _random_probs(rng, m, n, c):
    z = rng.normal(size=(m, n, c)) * 2
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    p[0, 0] = np.eye(c)[1]  # a one-hot row: 0 log 0 must count as 0
    return p


def test_average_and_mutual_information_equal_a_by_hand_loop():
    rng = np.random.default_rng(0)
    m, n, c = 3, 5, 4
    p = _random_probs(rng, m, n, c)
    w_raw = [2.0, 1.0, 1.0]
    w = ens.normalised_weights(w_raw, m)
    avg = ens.average_probs(p, w)
    mi = ens.mutual_information(p, w)
    for i in range(n):
        total = sum(w_raw)
        mean = [sum(w_raw[k] * p[k, i, j] for k in range(m)) / total for j in range(c)]
        assert avg[i] == pytest.approx(mean, abs=1e-12)
        h = lambda q: -sum(x * math.log(x) for x in q if x > 0)  # noqa: E731
        expected = h(mean) - sum(w_raw[k] * h(p[k, i]) for k in range(m)) / total
        assert mi[i] == pytest.approx(expected, abs=1e-12)
    # members that agree have no mutual information; opposite one-hot members have log 2
    same = np.repeat(p[:1], 2, axis=0)
    assert ens.mutual_information(same, ens.normalised_weights(None, 2)) == pytest.approx(np.zeros(n), abs=1e-12)
    opposite = np.stack([np.eye(2)[[0]], np.eye(2)[[1]]])
    assert ens.mutual_information(opposite, ens.normalised_weights(None, 2))[0] == pytest.approx(math.log(2))


@pytest.mark.parametrize("weights", [[1.0], [1.0, 0.0], [1.0, -1.0], [float("nan"), 1.0]])
def test_bad_weights_are_one_line(weights):
    with pytest.raises(MineralNetError, match="weight"):
        ens.normalised_weights(weights, 2)


# ----------------------------------------------------------------------------- TTA
def _mean_colour_model(images):
    """A mirror-symmetric 'model': probabilities from each photo's mean colour (blind to left/right)."""
    x = np.stack([np.asarray(im, np.float64).mean(axis=(0, 1)) for im in images]) / 40.0
    e = np.exp(x - x.max(1, keepdims=True))
    return {"probs": e / e.sum(1, keepdims=True)}


def _asymmetric_model(images):
    """Probabilities from the mean colour of each photo's left half: changes under a flip."""
    return _mean_colour_model([np.asarray(im)[:, : im.shape[1] // 2] for im in images])


def test_parse_tta():
    assert parse_tta(None) is None and parse_tta("none") is None
    assert parse_tta("flip") == ("original", "flip")
    assert parse_tta("flip,scales") == ("original", "flip", "zoom0.875", "zoom1.125")
    for bad in ("mirror", "flip,flip", "flip;scales"):
        with pytest.raises(MineralNetError, match="--tta"):
            parse_tta(bad)


def test_flip_tta_of_a_mirror_symmetric_model_is_the_model():
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8) for _ in range(4)]
    plain = _mean_colour_model(photos)["probs"]
    np.testing.assert_allclose(tta_answers(_mean_colour_model, photos, parse_tta("flip"))["probs"], plain, atol=1e-6)
    # and for a model that is not symmetric the flip changes the answer, by the by-hand average
    asym = tta_answers(_asymmetric_model, photos, parse_tta("flip"))["probs"]
    flipped = [p[:, ::-1] for p in photos]
    by_hand = (_asymmetric_model(photos)["probs"] + _asymmetric_model(flipped)["probs"]) / 2
    np.testing.assert_allclose(asym, by_hand, atol=1e-6)
    assert not np.allclose(asym, _asymmetric_model(photos)["probs"], atol=1e-4)


def test_views_zoom_in_crops_the_centre_and_zoom_out_pads():
    img = np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3)
    zin = view(img, "zoom1.125")
    assert zin.shape == (14, 21, 3)
    np.testing.assert_array_equal(zin, img[1:15, 1:22])
    zout = view(img, "zoom0.875")
    assert zout.shape == (18, 27, 3)
    np.testing.assert_array_equal(zout[1:17, 1:25], img)  # the photo whole in the middle
    np.testing.assert_array_equal(view(img, "flip"), img[:, ::-1])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = mdata.make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", classes=3, per_class=2, size=64)
    return sorted(str(p) for p in Path(root).rglob("*.jpg"))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    torch.manual_seed(4)
    model = FusionNet("resnet18", (2, 4), 3)
    with torch.no_grad():
        model.head.weight.mul_(40)
    run = tmp_path_factory.mktemp("run")
    save_model(run, model, model_meta(model, classes=["a", "b", "c"], image_size=40, mean=[0.5] * 3,
                                      std=[0.25] * 3, resize=46))
    return run


def test_predictor_tta_is_the_mean_over_views_by_hand(plain_run, photos):
    plain = Predictor(plain_run)
    tta = Predictor(plain_run, tta="flip,scales")
    arrays = [mdata.load_image(p) for p in photos]
    by_hand = np.mean([plain.probabilities(photos)] +
                      [plain.probabilities([view(a, v) for a in arrays]) for v in ("flip", "zoom0.875", "zoom1.125")],
                      axis=0)
    np.testing.assert_allclose(tta.probabilities(photos), by_hand, atol=1e-6)
    preds = tta.predict(photos, topk=1)
    assert [p.top[0][0] for p in preds] == [tta.classes[i] for i in by_hand.argmax(1)]
    with pytest.raises(MineralNetError, match="--coverage with --tta"):
        tta.answers(photos, coverage=0.9)


# ----------------------------------------------------------------------------- end to end
TINY = ["--config", "demo", "--backbone", "resnet18", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--precision", "fp32", "--split-seed", "0", "--val-split", "0.3"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two demo-preset runs on the same split: different seeds and resolutions."""
    root = tmp_path_factory.mktemp("ens")
    data = str(mdata.make_demo_dataset(root / "demo", classes=3, per_class=10, size=48, seed=3))
    runs = []
    for seed, size in ((0, "32"), (1, "40")):
        run = root / f"m{seed}"
        assert cli_main(["train", "--data", data, "--out", str(run), "--seed", str(seed), "--image-size", size,
                         *TINY]) == 0
        runs.append(run)
    return root, data, runs


def _member_probs_by_hand(run, paths):
    """Calibrated probabilities of one run: its own Predictor's logits / its own temperature."""
    p = Predictor(run)
    z = p.outputs(paths)["logits"].astype(np.float64)
    t = p.calibration.temperature if p.calibration is not None else 1.0
    e = np.exp(z / t - (z / t).max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ensemble_end_to_end(two_runs, tmp_path, capsys):
    root, data, runs = two_runs
    out = tmp_path / "ens"
    assert cli_main(["ensemble", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    spec = json.loads((out / "ensemble.json").read_text())
    assert [m["path"] for m in spec["members"]] == [os.path.relpath(r.resolve(), out.resolve()) for r in runs]
    assert spec["members"][0]["image_size"] == 32 and spec["members"][1]["image_size"] == 40
    assert all(m["calibrated"] for m in spec["members"])  # so each member's own temperature is exercised
    n = spec["common_val_photos"]
    assert n > 0 and f"the {n} photos held out by every member" in printed

    # the ensemble's probabilities are the mean of the members' calibrated ones, each at its own resolution
    samples = common_val(runs)
    assert len(samples) == n
    paths = [p for p, _ in samples]
    pred = Predictor(out)
    assert pred.kind == "ensemble" and pred.classes == spec["classes"] and len(pred.ensemble.members) == 2
    members = np.stack([_member_probs_by_hand(r, paths) for r in runs])
    np.testing.assert_allclose(pred.probabilities(paths), members.mean(0), atol=1e-5)
    ans = pred.answers(paths)
    h = lambda q: -(q * np.log(np.clip(q, 1e-300, None))).sum(-1)  # noqa: E731
    np.testing.assert_allclose(ans["scores"]["mutual_information"], h(members.mean(0)) - h(members).mean(0),
                               atol=1e-5)
    thr = spec["novelty"]["thresholds"]["energy"]
    np.testing.assert_array_equal(ans["unknown"], ans["scores"]["energy"] > thr)

    # eval/ has the ensemble's and each member's metrics, by hand
    targets = np.array([y for _, y in samples])
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["n"] == n and m["top1"] == pytest.approx(np.mean(members.mean(0).argmax(1) == targets))
    for r, p in zip(runs, members):
        mm = json.loads((out / "eval" / "members" / r.name / "metrics.json").read_text())
        assert mm["top1"] == pytest.approx(np.mean(p.argmax(1) == targets))
    assert (out / "eval" / "summary.md").read_text().count("\n") == 2 + 1 + len(runs)

    # `mineralnet eval ENS --split val` and `predict ENS` work like for a run
    assert cli_main(["eval", str(out), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["top1"] == pytest.approx(m["top1"])
    capsys.readouterr()
    assert cli_main(["predict", str(out), paths[0], "--json", "--tta", "flip"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["runtime"] == "ensemble" and doc["tta"] == ["original", "flip"]
    assert doc["predictions"][0]["top"][0]["label"] in spec["classes"]


def test_ensemble_refuses_incompatible_members(two_runs, tmp_path, capsys):
    root, data, runs = two_runs
    odd = tmp_path / "odd"
    torch.manual_seed(0)
    model = FusionNet("resnet18", (2, 4), 3)
    classes = json.loads((runs[0] / "model.json").read_text())["classes"]
    save_model(odd, model, model_meta(model, classes=classes[::-1], image_size=32, mean=[0.5] * 3, std=[0.25] * 3,
                                      resize=36))
    assert cli_main(["ensemble", str(runs[0]), str(odd), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(odd) in err and "another order" in err
    assert cli_main(["ensemble", str(runs[0]), "--out", str(tmp_path / "e")]) == 2
    assert "at least 2 runs" in capsys.readouterr().err


def test_ensemble_refuses_members_without_common_held_out_photos(two_runs, tmp_path, capsys):
    root, data, runs = two_runs
    other = tmp_path / "other"
    split = json.loads((runs[1] / "split.json").read_text())
    # the same run, with its validation photos swapped for its training photos: nothing in common
    shutil.copytree(runs[1], other)
    split["splits"] = {"train": split["splits"]["val"], "val": split["splits"]["train"]}
    (other / "split.json").write_text(json.dumps(split))
    code = cli_main(["ensemble", str(runs[0]), str(other), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no photo is held out by every member" in err


def test_eval_tta_on_a_run_writes_its_own_folder(two_runs, capsys):
    root, data, runs = two_runs
    before = (runs[0] / "eval" / "metrics.json").read_text()
    assert cli_main(["eval", str(runs[0]), "--split", "val", "--tta", "flip"]) == 0
    assert "ms/photo (2 views" in capsys.readouterr().out
    assert (runs[0] / "eval" / "metrics.json").read_text() == before  # training's evaluation stays
    m = json.loads((runs[0] / "eval-tta-flip" / "metrics.json").read_text())
    samples = common_val(runs[:1])
    targets = np.array([y for _, y in samples])
    probs = Predictor(runs[0], tta="flip").probabilities([p for p, _ in samples])
    assert m["tta"] == ["original", "flip"] and m["ms_per_photo"] > 0
    assert m["top1"] == pytest.approx(np.mean(probs.argmax(1) == targets))
