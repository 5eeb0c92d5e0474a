"""`mineralnet app`: the page's data function against `mineralnet predict --json` and `mineralnet data check`
(no browser), and one slow test that drives the real page in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mineralnet.app.page import Page, answer_html, answers_html, card_markdown, model_crop, percent
from mineralnet.cli import main
from mineralnet.data import build_transforms, make_demo_dataset
from mineralnet.export import ExportOptions, export
from test_openset import _photos, _run  # the tiny 'trained' run of the open-set tests

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", classes=3, per_class=12, size=96)


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos):
    """A calibrated tiny run."""
    run = _run(tmp_path_factory, photos, "apprun")
    assert main(["calibrate", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def onnx_model(run):
    """The run's fp32 ONNX export, RUN/export/model.onnx."""
    export(run, ["onnx"], ExportOptions())
    return run / "export" / "model.onnx"


def _predict_json(capsys, model, paths, coverage=0.9):
    argv = ["predict", str(model), *map(str, paths), "--json", "--topk", "5"]
    assert main(argv + (["--coverage", str(coverage)] if coverage else [])) == 0
    return json.loads(capsys.readouterr().out)["predictions"]


@pytest.mark.parametrize("form", ["run", "onnx"])
def test_page_fields_equal_predict_json(run, photos, capsys, form, request):
    model = run if form == "run" else request.getfixturevalue("onnx_model")
    paths = _photos(photos)[::7]
    page = Page(model)
    expected = _predict_json(capsys, model, paths)
    for path, want in zip(paths, expected):
        got = page.answer(path, coverage=0.9)
        assert got["file"] == Path(path).name and got["reason"] is None
        # the page answers one photo at a time, predict batches them: the same float model at another batch
        # size may differ in the last digits (oneDNN picks kernels by shape), so numbers match to 1e-4
        assert [t["label"] for t in got["top"]] == [t["label"] for t in want["top"]]
        assert [t["prob"] for t in got["top"]] == pytest.approx([t["prob"] for t in want["top"]], abs=1e-4)
        assert got["novelty"] == pytest.approx(want["novelty"], abs=1e-4)
        assert (got["unknown"], got["set"]) == (want["unknown"], want["set"])
        assert got["verdict"].startswith(want["top"][0]["label"]) != want["unknown"]
        block = answer_html(got)
        assert f"<td>{got['top'][0]['label']}</td><td>{100 * got['top'][0]['prob']:.1f}%</td>" in block
        assert "candidate set: " + ", ".join(want["set"]) in block
        if form == "run":  # Grad-CAM of the top candidate, for PyTorch runs only
            assert got["cam"].shape == (320, 320, 3) and got["cam"].dtype == np.uint8 or got["cam_note"]
        else:
            assert got["cam"] is None and "Grad-CAM" not in block


def test_unknown_mineral_is_said_plainly(run, photos, capsys):
    page = Page(run)
    cal = page.predictor.calibration
    cal.thresholds[cal.detector] = -1e9  # every photo is now above the threshold
    fields = page.answer(_photos(photos)[0], coverage=0.9)
    assert fields["unknown"] is True and fields["verdict"].startswith("Unknown mineral: ")
    assert f"the closest is {fields['top'][0]['label']} ({percent(fields['top'][0]['prob'])})" in fields["verdict"]
    assert "Unknown mineral" in answer_html(fields)


def test_uncalibrated_model_answers_without_unknown_or_set(tmp_path_factory, photos, capsys):
    plain = _run(tmp_path_factory, photos, "plain")
    page = Page(plain)
    path = _photos(photos)[0]
    fields = page.answer(path, coverage=0.9)  # the slider's value is ignored without a calibration
    want = _predict_json(capsys, plain, [path], coverage=None)[0]
    assert fields["top"] == want["top"] and fields["unknown"] is None and "set" not in fields
    assert "not calibrated" in fields["verdict"] and "not checked" in card_markdown(page.card)


def test_non_image_uploads_get_the_data_check_reasons(run, tmp_path, capsys):
    bad = tmp_path / "set" / "quartz"
    bad.mkdir(parents=True)
    (bad / "notes.jpg").write_text("field notes, not a photo\n")
    (bad / "empty.png").write_bytes(b"")
    (bad / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")
    main(["data", "check", str(tmp_path / "set")])
    listed = capsys.readouterr().out
    page = Page(run)
    for f in sorted(bad.iterdir()):
        fields = page.answer(f)
        assert set(fields) == {"file", "reason"} and f"  {f}: {fields['reason']}\n" in listed
        assert fields["reason"] in answer_html(fields)


def test_photo_count_is_capped(run, photos):
    paths = _photos(photos)[:3]
    out = Page(run).answer_all(paths, max_photos=2)
    assert [a["file"] for a in out[:2]] == [Path(p).name for p in paths[:2]] and len(out) == 3
    assert out[2]["file"] == "1 more photo(s)" and "only 2 photos" in out[2]["reason"]


def test_model_card_counts_training_photos_from_the_split(run, onnx_model):
    split = json.loads((run / "split.json").read_text())
    want = {c: sum(Path(p).parent.name == c for p in split["train"]) for c in split["classes"]}
    for model in (run, onnx_model):
        card = Page(model).card
        assert card["train_photos"] == want and sum(want.values()) == 24
        assert card["backbone"] == "resnet18" and card["stages"] == [2, 4] and card["calibrated"]
        assert card["date"] == time.strftime("%Y-%m-%d", time.gmtime(Path(
            run / "model.safetensors" if model == run else model).stat().st_mtime))
        md = card_markdown(card)
        assert "pyrite (8)" in md and "Top1 not recorded" in md  # the tiny run's model.json has no metrics


def test_model_crop_is_the_region_the_model_sees():
    rng = np.random.default_rng(0)
    import cv2

    image = cv2.GaussianBlur(rng.integers(0, 256, (300, 460, 3), dtype=np.uint8), (0, 0), 6)
    size, resize = 64, 73
    t = build_transforms(size, [0, 0, 0], [1, 1, 1], train=False, resize=resize)
    seen = t(image).numpy().transpose(1, 2, 0) * 255  # (64, 64, 3), what the model gets (mean 0, std 1)
    crop = model_crop(image, size, resize)
    assert abs(crop.shape[0] - 300 * size / resize) <= 1 and crop.shape[0] == crop.shape[1]
    small = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.abs(small - seen).mean() < 3  # same region (a shifted crop differs by far more)
    shifted = cv2.resize(image[:crop.shape[0], :crop.shape[1]], (size, size), interpolation=cv2.INTER_AREA)
    assert np.abs(shifted.astype(np.float32) - seen).mean() > 3 * np.abs(small - seen).mean()


def test_uploaded_names_are_escaped():
    block = answer_html({"file": "<img src=x onerror=alert(1)>.jpg", "reason": "a <b>reason</b>"})
    assert "<img" not in block and "&lt;img" in block and "<b>reason" not in block
    assert "Drop one or several photos" in answers_html([])


def test_upload_folder_is_removed_and_env_restored(monkeypatch, tmp_path):
    from mineralnet.app.ui import upload_folder

    monkeypatch.setenv("GRADIO_TEMP_DIR", "before")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with upload_folder() as folder:
            assert os.environ["GRADIO_TEMP_DIR"] == folder and Path(folder).parent == tmp_path
            (Path(folder) / "upload.jpg").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGTERM)  # the server's stop signal: becomes KeyboardInterrupt
    assert not Path(folder).exists() and os.environ["GRADIO_TEMP_DIR"] == "before"
    assert signal.getsignal(signal.SIGTERM) is before


def test_app_command_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["app", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["app", str(tmp_path), "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if Gradio were not installed
    assert main(["app", str(tmp_path)]) == 2
    assert 'pip install "mineralnet[app]"' in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real page, in Chromium
def _browser():
    """(chromium, chromedriver) paths, or a skip when the browser test cannot run here."""
    pytest.importorskip("gradio")
    pytest.importorskip("selenium")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chrome and driver):
        pytest.skip("no chromium + chromedriver (apt-get install -y chromium chromium-driver)")
    return chrome, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(proc, url: str, timeout: float = 600) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited: {proc.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer at {url} within {timeout} s")


def _upload(driver, path, expect: str, timeout: float = 300) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # the page is built by JavaScript after it loads
    field = WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photos input[type=file]"))
    field[0].send_keys(str(path))
    answers = lambda d: d.find_element(By.ID, "answers").text  # noqa: E731
    WebDriverWait(driver, timeout).until(lambda d: expect in answers(d))
    return answers(driver)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # importing torch and Gradio in the server takes minutes on a busy 2-core machine
def test_the_page_in_headless_chromium_answers_as_predict_does(run, photos, tmp_path, capsys):
    chrome, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    photo = _photos(photos)[-1]
    want = _predict_json(capsys, run, [photo])[0]
    name, prob = want["top"][0]["label"], f"{100 * want['top'][0]['prob']:.1f}%"
    port, tmp = _free_port(), tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "mineralnet.cli", "app", str(run), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(arg)
    driver = None
    try:
        _wait_for_server(proc, f"http://127.0.0.1:{port}/")
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        driver.get(f"http://127.0.0.1:{port}/")
        text = _upload(driver, photo, prob)
        assert any(f"{name}{sep}{prob}" in text for sep in (" ", "\t", "\n")), text  # its table row
        assert "candidate set: " + ", ".join(want["set"]) in text
        cams = driver.find_elements(By.CSS_SELECTOR, "#answers img.mn-cam")  # the Grad-CAM overlay, drawn
        assert len(cams) == 1 and driver.execute_script("return arguments[0].naturalWidth", cams[0]) == 320
        assert any(Path(p).name.startswith("mineralnet-app-") for p in tmp.iterdir())  # uploads go here
        notes = tmp_path / "notes.jpg"
        notes.write_text("field notes, not a photo\n")
        text = _upload(driver, notes, "notes.jpg: not an image")
        assert "only JPEG, PNG, WEBP, BMP, TIFF or GIF photos are read" in text
    finally:
        if driver is not None:
            driver.quit()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert not list(tmp.glob("mineralnet-app-*")), "the upload folder outlived the server"
