"""Upload-to-answer time of `mineralnet app` for one 12-megapixel photo on this CPU (PyTorch, batch 1).

    python bench/app_latency.py RUN --photo ../shared/data/minet7/quartz/X.jpg \
        [--repeat 10] [--browser] [--json bench/results/app.json]

The photo is upscaled to 4000x3000 and written as a JPEG (quality 92) into a temporary folder. Through the
page's data function (`Page.answer`: decode, preprocessing, forward, calibration, Grad-CAM, overlay) it
reports p50/p90 and the parts; with --browser also end to end: headless Chromium uploads a fresh copy of
the photo to `mineralnet app RUN` and the clock stops when the answer shows (upload + server + render).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from mineralnet.app.page import Page
from mineralnet.bench.environment import cpu_info
from mineralnet.data import load_image


def make_photo(src: str, out: Path, size=(4000, 3000)) -> Path:
    img = load_image(src)
    if img.shape[0] > img.shape[1]:
        size = size[::-1]
    big = cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(out), big[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    return out


def stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()),
            "n": len(a)}


def timed(fn, repeat: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return stats(out)


def data_function(run: str, photo: Path, repeat: int) -> dict:
    page = Page(run, device="cpu")
    pre, predictor = page.predictor.preprocess, page.predictor
    image = load_image(photo, min_size=pre.min_size)
    x = pre.batch([image])
    label = predictor.predict(x)[0].top[0][0]
    return {"answer (upload -> fields)": timed(lambda: page.answer(photo, coverage=0.9), repeat),
            "decode (JPEG, DCT-scaled)": timed(lambda: load_image(photo, min_size=pre.min_size), repeat),
            "preprocess": timed(lambda: pre.batch([image]), repeat),
            "forward + calibration": timed(lambda: predictor.predict(x, coverage=None), repeat),
            "Grad-CAM + overlay": timed(lambda: page.grad_cam(image, x, label), repeat),
            "decoded size": list(image.shape[:2])}


def browser(run: str, photo: Path, repeat: int, tmp: Path, shot: Path | None = None) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mineralnet.cli", "app", run, "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1500"):
        options.add_argument(arg)
    driver = None
    try:
        import urllib.request
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        times = []
        for k in range(repeat + 2):  # a fresh page each time, so each answer is for this one photo only
            driver.get(f"http://127.0.0.1:{port}/")
            field = WebDriverWait(driver, 120).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#photos input[type=file]"))
            copy = tmp / f"photo{k}.jpg"
            shutil.copyfile(photo, copy)
            t0 = time.perf_counter()
            field[0].send_keys(str(copy))
            WebDriverWait(driver, 120, poll_frequency=0.02).until(
                lambda d: f"photo{k}.jpg" in d.find_element(By.ID, "answers").text)
            times.append((time.perf_counter() - t0) * 1e3)
        if shot:
            driver.save_screenshot(str(shot))
        return stats(times[2:])
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--photo", required=True, help="a photo to upscale to 4000x3000")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--browser", action="store_true", help="also end to end through headless Chromium")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mineralnet-bench-app-") as tmp:
        photo = make_photo(args.photo, Path(tmp) / "photo12mp.jpg")
        result = {"photo": {"pixels": "4000x3000", "bytes": photo.stat().st_size}, "cpu": cpu_info(),
                  "torch_threads": __import__("torch").get_num_threads(), "load_avg": os.getloadavg(),
                  "data_function": data_function(args.run, photo, args.repeat)}
        if args.browser:
            shot = Path(args.json).with_suffix(".png") if args.json else None  # the page after the last answer
            result["browser"] = browser(args.run, photo, args.repeat, Path(tmp), shot)
        result["load_avg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
