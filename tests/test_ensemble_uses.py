"""An ensemble folder in `mineralnet calibrate`, the app and `mineralnet bench` (issue 30): the ensemble's
temperature against an independent NLL minimisation, its calibrated answers by hand, and one-line refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from mineralnet import data as mdata
from mineralnet.app.page import Page, card_markdown
from mineralnet.cli import main as cli_main
from mineralnet.ensemble.calibrate import calibrate_arrays
from mineralnet.errors import MineralNetError
from mineralnet.infer import Predictor
from mineralnet.infer.ensemble import average_probs, common_val, log_probs, mutual_information


# ----------------------------------------------------------------------------- the numbers
def _made_up_members(seed=0, m=3, n=300, c=5):
    """(M, N, C) over-confident member probabilities that are right ~60% of the time, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    z = rng.normal(0, 1, (n, c))[None] + 0.3 * rng.normal(0, 1, (m, n, c))  # members that mostly agree
    z[:, np.arange(n), labels] += 1.0
    z *= 4.0  # over-confident: the fitted temperature is well above 1
    return np.exp(log_softmax(z, axis=-1)), labels


def test_ensemble_temperature_equals_scipy_minimising_the_nll_by_hand():
    members, labels = _made_up_members()
    w = np.array([0.5, 0.3, 0.2])
    mean = np.einsum("m,mnc->nc", w, members)  # written differently from average_probs' tensordot
    logp = np.log(mean)

    def nll(log_t):  # NLL of softmax(log p / T), by scipy's log_softmax
        return -log_softmax(logp / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean()

    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-9})
    scores = {"energy": np.linspace(0, 1, len(labels)), "mutual_information": mutual_information(members, w)}
    cal = calibrate_arrays(log_probs(average_probs(members, w)), scores, labels, detector="mutual_information",
                           acceptance=0.9)
    assert cal.temperature > 1.5
    assert cal.temperature == pytest.approx(float(np.exp(best.x)), rel=1e-4)
    assert cal.info["nll"]["after"] == pytest.approx(float(best.fun), abs=1e-7)
    assert cal.info["nll"]["after"] < cal.info["nll"]["before"]
    # every score's threshold accepts the smallest fraction >= 90% of these photos
    for name, s in scores.items():
        accepted = (s <= cal.thresholds[name]).mean()
        assert 0.9 <= accepted < 0.9 + 2 / len(labels)
    # conformal scores: the calibrated probability mass down to the true class, by a loop
    probs = np.exp(log_softmax(logp / cal.temperature, axis=1))
    by_hand = sorted(sum(p for p in row if p >= row[y]) for row, y in zip(probs, labels))
    np.testing.assert_allclose(cal.conformal_scores, by_hand, atol=1e-9)
    with pytest.raises(MineralNetError, match="energy or mutual_information"):
        calibrate_arrays(logp, scores, labels, detector="knn")


# ----------------------------------------------------------------------------- end to end
TINY = ["--config", "demo", "--backbone", "resnet18", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--precision", "fp32", "--split-seed", "0", "--val-split", "0.3"]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Two tiny runs on one split (different seeds and sizes) and their ensemble folder."""
    root = tmp_path_factory.mktemp("ensuse")
    data = str(mdata.make_demo_dataset(root / "demo", classes=3, per_class=10, size=48, seed=3))
    runs = []
    for seed, size in ((0, "32"), (1, "40")):
        runs.append(root / f"m{seed}")
        assert cli_main(["train", "--data", data, "--out", str(runs[-1]), "--seed", str(seed), "--image-size", size,
                         *TINY]) == 0
    ens = root / "ens"
    assert cli_main(["ensemble", *map(str, runs), "--out", str(ens)]) == 0
    return root, data, runs, ens


def test_calibrate_an_ensemble_and_predict_eval_use_it(ensemble, tmp_path, capsys):
    root, data, runs, ens = ensemble
    work = tmp_path / "ens"
    import shutil

    shutil.copytree(ens, work)  # the relative member paths still resolve from a sibling folder
    (work / "ensemble.json").write_text((ens / "ensemble.json").read_text().replace('"../m', '"' + str(root) + "/m"))
    samples = common_val(runs)
    paths, targets = [p for p, _ in samples], np.array([y for _, y in samples])
    before = Predictor(work).answers(paths)
    assert Predictor(work).calibration is None
    with pytest.raises(MineralNetError, match="not calibrated"):
        Predictor(work).answers(paths, coverage=0.9)

    assert cli_main(["calibrate", str(work), "--detector", "mutual_information", "--acceptance", "0.9"]) == 0
    assert "calibrated the ensemble" in capsys.readouterr().out
    spec = json.loads((work / "ensemble.json").read_text())
    doc = spec["calibration"]
    assert doc["detector"] == "mutual_information" and spec["novelty"]["detector"] == "mutual_information"
    assert set(doc["thresholds"]) == {"energy", "mutual_information"} and doc["info"]["val_photos"] == len(samples)
    assert all("resolved" not in m for m in spec["members"])  # written as the user's file was

    # the calibrated answers, by hand from the uncalibrated mean: softmax(log mean / T), unknown = MI > threshold
    t = doc["temperature"]
    pred = Predictor(work)
    assert pred.calibration is not None and pred.calibration.temperature == pytest.approx(t)
    ans = pred.answers(paths, coverage=0.9)
    np.testing.assert_allclose(ans["probs"], np.exp(log_softmax(np.log(before["probs"].astype(np.float64)) / t,
                                                                axis=1)), atol=1e-5)
    mi = before["scores"]["mutual_information"]
    np.testing.assert_array_equal(ans["unknown"], mi > doc["thresholds"]["mutual_information"])
    assert len(ans["sets"]) == len(paths) and all(s for s in ans["sets"])
    nll_t = -log_softmax(np.log(before["probs"].astype(np.float64)) / t, axis=1)[np.arange(len(targets)), targets]
    assert doc["info"]["nll"]["after"] == pytest.approx(nll_t.mean(), abs=1e-4)

    # predict --coverage and eval on the calibrated ensemble
    assert cli_main(["predict", str(work), paths[0], "--json", "--coverage", "0.9"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["calibrated"] is True and rec["predictions"][0]["set"]
    assert cli_main(["eval", str(work), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["top1"] == pytest.approx(np.mean(ans["probs"].argmax(1) == targets))


@pytest.mark.parametrize("flags, needle", [
    (["--detector", "knn"], "--detector knn: the ensemble"),
    (["--knn-k", "5"], "--knn-k: "),
    (["--shrinkage", "0.2"], "--shrinkage: "),
])
def test_calibrate_refusals_for_an_ensemble_are_one_line(ensemble, flags, needle, capsys):
    root, data, runs, ens = ensemble
    capsys.readouterr()
    assert cli_main(["calibrate", str(ens), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_mutual_information_on_a_run_is_one_line(ensemble, capsys):
    root, data, runs, ens = ensemble
    capsys.readouterr()
    assert cli_main(["calibrate", str(runs[0]), "--detector", "mutual_information"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "an ensemble's score" in err


def test_the_app_page_answers_with_an_ensemble_as_predict_does(ensemble, capsys):
    root, data, runs, ens = ensemble
    page = Page(ens)
    path = common_val(runs)[0][0]
    fields = page.answer(path, coverage=0.9)
    capsys.readouterr()
    assert cli_main(["predict", str(ens), path, "--json", "--topk", "5"]) == 0
    rec = json.loads(capsys.readouterr().out)["predictions"][0]
    assert [c["label"] for c in fields["top"]] == [c["label"] for c in rec["top"]]
    np.testing.assert_allclose([c["prob"] for c in fields["top"]], [c["prob"] for c in rec["top"]], atol=1e-5)
    assert fields["unknown"] == rec["unknown"] and fields["novelty"] == pytest.approx(rec["novelty"], abs=1e-5)
    assert fields["cam"] is None and "ensemble" in fields["cam_note"] and fields["verdict"]
    card = card_markdown(page.card)
    assert "ensemble of 2: resnet18 + resnet18" in card and "32/40 px" in card and "flagged" in card


def test_bench_times_the_whole_ensemble_and_scores_it(ensemble, tmp_path, capsys):
    root, data, runs, ens = ensemble
    js = tmp_path / "b.json"
    assert cli_main(["bench", str(ens), str(runs[0]), "--runtimes", "ensemble,torch", "--precision", "fp32",
                     "--batch-sizes", "1,2", "--warmup", "0", "--duration", "0.01", "--min-runs", "2",
                     "--data", data, "--split", "val", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    ens_rows = [r for r in rows if r["runtime"] == "ensemble"]
    assert [(r["batch"], r["status"], r["precision"]) for r in ens_rows] == [(1, "ok", "fp32"), (2, "ok", "fp32")]
    assert {r["runtime"] for r in rows} == {"ensemble", "torch"}  # a run gets no ensemble row, and vice versa
    # its accuracy is the ensemble's on the photos every member held out, by hand
    samples = common_val(runs, root=data)
    probs = Predictor(ens).probabilities([p for p, _ in samples])
    want = np.mean(probs.argmax(1) == np.array([y for _, y in samples]))
    assert ens_rows[0]["images"] == len(samples) and ens_rows[0]["top1"] == pytest.approx(want)
    assert ens_rows[0]["agreement"] is None
    # its FLOPs per photo are the two members' at their own sizes
    run_rows = [r for r in rows if r["runtime"] == "torch"]
    assert ens_rows[0]["gflop_per_image"] > run_rows[0]["gflop_per_image"]
    capsys.readouterr()
    assert cli_main(["bench", str(ens), "--image-size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its own size" in err
    assert cli_main(["bench", str(ens), "--data", data, "--split", "train", "--duration", "0.01",
                     "--warmup", "0", "--min-runs", "1", "--batch-sizes", "1"]) == 2
    assert "use --split val" in capsys.readouterr().err
