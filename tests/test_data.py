"""mineralnet.data: decoding odd and broken photos, scanning, `data check`, splits, stats,
transforms and the demo set. Every odd image is generated here; no data is committed."""
from __future__ import annotations

import io
import itertools
import json
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mineralnet import cli
from mineralnet import data as D
from mineralnet.errors import MineralNetError
from mineralnet.sizes import eval_resize

EXIF_ROT6 = Image.Exif()
EXIF_ROT6[0x0112] = 6
EXIF_ROT6 = EXIF_ROT6.tobytes()
MINET7 = Path(__file__).resolve().parents[2] / "shared" / "data" / "minet7"


def pattern(h=40, w=60, seed=0) -> np.ndarray:
    """An asymmetric RGB test card: 10-px blocks of random colour (survives JPEG well)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (h // 10, w // 10, 3), dtype=np.uint8)
    return cv2.resize(blocks, (w, h), interpolation=cv2.INTER_NEAREST)


def save(path: Path, im: Image.Image, fmt: str, **kw) -> Path:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())
    return path


def centre_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean abs difference away from block edges (JPEG rings there)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# ----------------------------------------------------------------------------- odd images
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, fmt, orientation):
    im = Image.fromarray(pattern())
    exif = im.getexif()
    exif[0x0112] = orientation
    p = save(tmp_path / f"o.{fmt.lower()}", im, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    ref = np.array(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    got = D.load_image(p)
    assert got.shape == ref.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref).max() <= 1


def test_exif_orientation_6_gives_upright_content_on_fast_path(tmp_path):
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:10, :10] = (255, 0, 0)  # red block at the top-left of the upright photo
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # camera stored it turned 90 deg anticlockwise
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 deg clockwise to display"
    p = save(tmp_path / "o6.jpg", im, "JPEG", exif=exif.tobytes(), quality=95)
    data = p.read_bytes()
    fast = D._decode_jpeg_fast(str(p), data, None)  # OpenCV must apply EXIF orientation itself
    assert fast is not None and fast.shape == (40, 20, 3)
    for img in (fast, D.load_image(p), D._decode_pil(str(p), data)):
        assert img.shape == (40, 20, 3)
        assert img[:8, :8].mean(axis=(0, 1)) == pytest.approx([255, 0, 0], abs=12)
        assert img[30:, 12:].max() < 20


def test_palette_and_transparent_palette(tmp_path):
    rgb = pattern()
    pal = Image.fromarray(rgb).quantize(colors=16)
    got = D.load_image(save(tmp_path / "p.png", pal, "PNG"))
    np.testing.assert_array_equal(got, np.array(pal.convert("RGB")))
    pal.info["transparency"] = int(np.array(pal)[0, 0])  # palette entry of the top-left block
    got = D.load_image(save(tmp_path / "pt.png", pal, "PNG", transparency=pal.info["transparency"]))
    assert (got[0, 0] == 255).all()  # transparent -> white
    opaque = np.array(pal) != pal.info["transparency"]
    np.testing.assert_array_equal(got[opaque], np.array(pal.convert("RGB"))[opaque])


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (10, 200, 40)
    rgba[:, :10, 3] = 0  # transparent
    rgba[:, 10:20, 3] = 128  # half
    rgba[:, 20:, 3] = 255  # opaque
    got = D.load_image(save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (got[:, :10] == 255).all()
    np.testing.assert_array_equal(got[:, 20:], np.broadcast_to([10, 200, 40], (20, 10, 3)))
    expect = np.round(np.array([10, 200, 40]) * 128 / 255 + 255 * 127 / 255)
    assert np.abs(got[:, 10:20].astype(int) - expect).max() <= 1


def test_la_greyscale_with_alpha(tmp_path):
    la = np.zeros((10, 10, 2), np.uint8)
    la[..., 0] = 60
    la[:, :5, 1] = 0
    la[:, 5:, 1] = 255
    got = D.load_image(save(tmp_path / "la.png", Image.fromarray(la, "LA"), "PNG"))
    assert (got[:, :5] == 255).all() and (got[:, 5:] == 60).all()


def test_png_colour_key_transparency(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[:, 3:] = (9, 99, 199)
    got = D.load_image(save(tmp_path / "k.png", Image.fromarray(rgb), "PNG", transparency=(0, 0, 0)))
    assert (got[:, :3] == 255).all() and (got[:, 3:] == (9, 99, 199)).all()


def test_cmyk_jpeg_and_tiff(tmp_path):
    rgb = pattern()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    ref = np.array(cmyk.convert("RGB"))
    np.testing.assert_array_equal(D.load_image(save(tmp_path / "c.tif", cmyk, "TIFF")), ref)
    got = D.load_image(save(tmp_path / "c.jpg", cmyk, "JPEG", quality=95))
    assert got.shape == rgb.shape and centre_diff(got, ref) < 4  # not inverted, not garbage


def test_16bit_grey_and_rgb_png_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 257, 128 * 257, 65535, 1000, 30000]], np.uint16).repeat(3, 0)
    p = save(tmp_path / "g16.png", Image.fromarray(grey), "PNG")
    assert Image.open(p).mode.startswith("I")
    got = D.load_image(p)
    expect = np.round(grey / 257).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(expect[:, :, None], 3, 2))
    rgb16 = (np.random.default_rng(1).integers(0, 65536, (8, 9, 3))).astype(np.uint16)
    rgb16[0, 0] = (65535, 0, 32768)
    assert cv2.imwrite(str(tmp_path / "c16.png"), rgb16[:, :, ::-1])  # OpenCV writes BGR
    got = D.load_image(tmp_path / "c16.png")
    assert got.dtype == np.uint8 and tuple(got[0, 0]) == (255, 0, 128)
    assert np.abs(got.astype(int) - rgb16 / 257).max() <= 1


def test_greyscale_jpeg_and_png(tmp_path):
    g = pattern()[:, :, 1]
    got = D.load_image(save(tmp_path / "g.png", Image.fromarray(g), "PNG"))
    np.testing.assert_array_equal(got, np.repeat(g[:, :, None], 3, 2))
    got = D.load_image(save(tmp_path / "g.jpg", Image.fromarray(g), "JPEG", quality=95))
    assert got.shape == (40, 60, 3) and (got[..., 0] == got[..., 2]).all() and centre_diff(got[..., 0], g) < 3


@pytest.mark.parametrize("fmt,kw", [("WEBP", {"lossless": True}), ("PNG", {}), ("BMP", {})])
def test_other_format_under_jpg_name_is_detected_by_content(tmp_path, fmt, kw):
    rgb = pattern()
    got = D.load_image(save(tmp_path / "photo.jpg", Image.fromarray(rgb), fmt, **kw))
    np.testing.assert_array_equal(got, rgb)


def test_jpeg_with_trailing_bytes_still_loads(tmp_path):
    rgb = pattern()
    p = save(tmp_path / "t.jpg", Image.fromarray(rgb), "JPEG", quality=95)
    ref = D.load_image(p)
    p.write_bytes(p.read_bytes() + b"camera trailer data")
    np.testing.assert_array_equal(D.load_image(p), ref)


def test_jpeg_header_parser_matches_pillow(tmp_path):
    im = Image.fromarray(pattern(30, 50))
    for name, kw in [("base", {}), ("prog", {"progressive": True}), ("grey", {})]:
        src = im.convert("L") if name == "grey" else im
        data = save(tmp_path / f"{name}.jpg", src, "JPEG", **kw).read_bytes()
        assert D._jpeg_header(data) == (50, 30, 1 if name == "grey" else 3)


def test_reduced_decode_keeps_min_size(tmp_path):
    p = save(tmp_path / "big.jpg", Image.fromarray(pattern(400, 600)), "JPEG", quality=90)
    assert D.load_image(p).shape == (400, 600, 3)
    assert D.load_image(p, min_size=100).shape == (100, 150, 3)  # 1/4: 400/8 = 50 < 100
    small = D.load_image(p, min_size=100)
    full = cv2.resize(D.load_image(p), (150, 100), interpolation=cv2.INTER_AREA)
    assert centre_diff(small, full) < 6


def broken_files(folder: Path) -> dict[str, Path]:
    """name -> path of files that must be refused."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(pattern()).save(buf, "JPEG", quality=90)
    good = buf.getvalue()
    files = {
        "truncated": folder / "truncated.jpg",
        "empty": folder / "empty.jpg",
        "text": folder / "notes.jpg",
    }
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a photo\n")
    return files


@pytest.mark.parametrize("kind,words", [("truncated", "truncated"), ("empty", "empty"), ("text", "not an image")])
def test_broken_files_are_refused_with_reason(tmp_path, kind, words):
    p = broken_files(tmp_path)[kind]
    with pytest.raises(D.ImageDecodeError) as e:
        D.load_image(p)
    assert e.value.path == str(p) and words in e.value.reason
    assert isinstance(e.value, MineralNetError) and str(p) in str(e.value) and "\n" not in str(e.value)
    assert words in D.verify_image(p)


def test_truncated_jpeg_refused_even_if_opencv_is_lenient(tmp_path, monkeypatch):
    # OpenCV 4.x returns a grey-filled image for a truncated JPEG; 5.x returns None. Either way
    # the file must be refused.
    p = broken_files(tmp_path)["truncated"]
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: np.full((40, 60, 3), 128, np.uint8))
    with pytest.raises(D.ImageDecodeError, match="truncated"):
        D.load_image(p)


@pytest.mark.parametrize("fmt,kw", [("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("WEBP", {"lossless": True}),
                                    ("WEBP", {"exif": EXIF_ROT6})])
def test_decompression_bomb_is_an_error_not_a_warning(tmp_path, monkeypatch, fmt, kw):
    p = save(tmp_path / f"bomb.{fmt.lower()}", Image.fromarray(pattern(100, 120)), fmt, **kw)
    assert D.verify_image(p) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 120 - 1)
    with pytest.raises(D.ImageDecodeError, match="decompression bomb: 120x100"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the size is read from the header before Pillow could warn
            D.load_image(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 120)
    assert D.verify_image(p) is None


def test_scan_puts_broken_files_into_bad(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    files = broken_files(root / "quartz")
    save(root / "quartz" / "huge.png", Image.fromarray(pattern(100, 120)), "PNG")
    save(root / "quartz" / "fine.png", Image.fromarray(pattern(20, 30)), "PNG")
    (root / "pyrite").mkdir()
    save(root / "pyrite" / "p.jpg", Image.fromarray(pattern(seed=3)), "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    index = D.scan_dataset(root)
    bad = dict(index.bad)
    assert set(bad) == {str(p) for p in files.values()} | {str(root / "quartz" / "huge.png")}
    assert "decompression bomb" in bad[str(root / "quartz" / "huge.png")]
    assert index.counts() == {"pyrite": 1, "quartz": 1}
    assert not set(bad) & {p for p, _ in index.samples}


# ----------------------------------------------------------------------------- scanning
def make_tree(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            save(root / name / f"{name}_{i}.jpg", Image.fromarray(pattern(20, 20, seed=c * 100 + i)), "JPEG")
    return root


def test_scan_folder_layout_and_ignored_files(tmp_path):
    root = make_tree(tmp_path / "d", {"quartz": 2, "Azurite": 3})
    (root / "MANIFEST.csv").write_text("class,file\n")
    (root / ".hidden").mkdir()
    save(root / ".hidden" / "x.jpg", Image.fromarray(pattern()), "JPEG")
    save(root / "quartz" / ".x.jpg", Image.fromarray(pattern()), "JPEG")
    (root / "quartz" / "readme.txt").write_text("not an image")
    (root / "quartz" / "sub").mkdir()
    save(root / "quartz" / "sub" / "DEEP.JPEG", Image.fromarray(pattern()), "JPEG")
    index = D.scan_dataset(root)
    assert index.classes == ["Azurite", "quartz"] and index.bad == []
    assert index.counts() == {"Azurite": 3, "quartz": 3}
    assert index.labels() == [0, 0, 0, 1, 1, 1]
    assert all(os.path.isabs(p) for p, _ in index.samples)
    assert index.samples == sorted(index.samples, key=lambda s: (s[1], s[0]))
    assert str(root / "quartz" / "sub" / "DEEP.JPEG") in [p for p, _ in index.samples]
    assert D.scan_dataset(root, verify=False).samples == index.samples


def test_scan_csv_manifest(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 2, "b": 1})
    csv = tmp_path / "d" / "list.csv"
    csv.write_text("path,label,note\na/a_0.jpg,x,1\nb/b_0.jpg,y,\na/a_1.jpg,y,\n")
    index = D.scan_dataset(csv)
    assert index.classes == ["x", "y"]
    assert index.samples == [(str(root / "a" / "a_0.jpg"), 0), (str(root / "a" / "a_1.jpg"), 1),
                             (str(root / "b" / "b_0.jpg"), 1)]
    (tmp_path / "bad1.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(MineralNetError, match="path"):
        D.scan_dataset(tmp_path / "bad1.csv")
    (tmp_path / "bad2.csv").write_text("path,label\nd/a/missing.jpg,x\n")
    with pytest.raises(MineralNetError, match="missing.jpg"):
        D.scan_dataset(tmp_path / "bad2.csv")


def test_scan_with_known_classes(tmp_path):
    root = make_tree(tmp_path / "d", {"b": 1, "c": 1})
    index = D.scan_dataset(root, classes=["a", "b", "c"])
    assert index.classes == ["a", "b", "c"] and index.labels() == [1, 2]
    with pytest.raises(MineralNetError, match="'?c'?.*remove or rename|c that"):
        D.scan_dataset(root, classes=["a", "b"])


def test_scan_errors_name_the_path(tmp_path):
    for target, words in [(tmp_path / "nope", "does not exist"), (tmp_path, "no class folders")]:
        with pytest.raises(MineralNetError, match=words) as e:
            D.scan_dataset(target)
        assert str(target) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(MineralNetError, match="neither a folder nor"):
        D.scan_dataset(tmp_path / "x.txt")


def test_empty_class_is_an_error_unless_allowed(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 2})
    (root / "empty").mkdir()
    with pytest.raises(MineralNetError, match="without readable photos.*: empty;"):
        D.scan_dataset(root)
    index = D.scan_dataset(root, allow_empty=True)
    assert index.empty == ["empty"] and index.counts() == {"a": 2, "empty": 0}
    one = make_tree(tmp_path / "one", {"a": 2})  # a single class is training's business, not the scan's
    assert D.scan_dataset(one).classes == ["a"]


# ----------------------------------------------------------------------------- data check
def test_data_check_reports_counts_and_bad_files(tmp_path, capsys):
    root = make_tree(tmp_path / "d", {"quartz": 3, "pyrite": 2})
    bad = broken_files(root / "quartz")["truncated"]
    assert cli.main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "quartz" in out and "pyrite" in out and str(bad) in out and "truncated" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("quartz"))
    assert line.split()[1] == "3"  # readable ones only
    for p in (root / "quartz").glob("*.jpg"):
        if p.name in {"truncated.jpg", "empty.jpg", "notes.jpg"}:
            p.unlink()
    assert cli.main(["data", "check", str(root), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "mean" in out
    (root / "empty_class").mkdir()
    assert cli.main(["data", "check", str(root)]) == 1
    assert "empty_class" in capsys.readouterr().out


def test_data_check_missing_path_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["data", "check", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mineralnet: error:") and "missing" in err and "\n" not in err


# ----------------------------------------------------------------------------- splits
def test_stratified_kfold_properties():
    labels = [0] * 23 + [1] * 10 + [2] * 7 + [3] * 5
    folds = D.stratified_kfold(labels, 5, seed=1)
    flat = sorted(i for f in folds for i in f)
    assert flat == list(range(len(labels)))  # disjoint and covering
    for c in range(4):
        per_fold = [sum(labels[i] == c for i in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    assert folds == D.stratified_kfold(labels, 5, seed=1)
    assert folds != D.stratified_kfold(labels, 5, seed=2)


def test_stratified_kfold_errors():
    with pytest.raises(MineralNetError, match="at least 2"):
        D.stratified_kfold([0, 1], 1)
    with pytest.raises(MineralNetError) as e:  # a class smaller than K is fine (issue 20), a single photo is not
        D.stratified_kfold([0] * 10 + [1] * 1, 5, classes=["quartz", "azurite"])
    assert "azurite" in str(e.value) and "1 photo" in str(e.value) and "--drop-rare" in str(e.value)
    with pytest.raises(MineralNetError, match="biotite.*1 photo"):
        D.stratified_kfold(["quartz"] * 10 + ["biotite"] * 1, 4)


def test_stratified_split():
    labels = [0] * 20 + [1] * 2 + [2] * 1 + [3] * 7
    tr, va = D.stratified_split(labels, 0.2, seed=0)
    assert sorted(tr + va) == list(range(len(labels))) and not set(tr) & set(va)
    per_class = {c: sum(labels[i] == c for i in va) for c in range(4)}
    assert per_class == {0: 4, 1: 1, 2: 0, 3: 1}
    assert (tr, va) == D.stratified_split(labels, 0.2, seed=0)
    with pytest.raises(MineralNetError):
        D.stratified_split(labels, 1.0)


def test_save_and_load_splits_are_relative_and_portable(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 3, "b": 2})
    index = D.scan_dataset(root)
    tr, va = D.stratified_split(index.labels(), 0.4)
    D.save_splits(tmp_path / "s.json", index, {"train": tr, "val": [index.samples[i] for i in va]})
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["classes"] == ["a", "b"]
    assert all(not os.path.isabs(r) and r.startswith(("a/", "b/")) for r, _ in doc["splits"]["train"])
    loaded = D.load_splits(tmp_path / "s.json")
    assert loaded["splits"]["train"] == [index.samples[i] for i in tr]
    assert loaded["splits"]["val"] == [index.samples[i] for i in va]
    moved = tmp_path / "moved"
    root.rename(moved)
    with pytest.raises(MineralNetError, match="does not exist"):
        D.load_splits(tmp_path / "s.json")
    again = D.load_splits(tmp_path / "s.json", root=moved)
    assert [os.path.relpath(p, moved) for p, _ in again["splits"]["val"]] == \
        [os.path.relpath(index.samples[i][0], root) for i in va]


# ----------------------------------------------------------------------------- statistics
def test_channel_stats_equals_numpy(tmp_path):
    paths = []
    for i in range(5):
        rgb = pattern(30 + 10 * i, 40, seed=i)
        paths.append(save(tmp_path / f"{i}.png", Image.fromarray(rgb), "PNG"))
    mean, std = D.channel_stats(paths, size=16)
    stack = np.stack([cv2.resize(np.array(Image.open(p).convert("RGB")), (16, 16), interpolation=cv2.INTER_AREA)
                      for p in paths]).astype(np.float64) / 255
    np.testing.assert_allclose(mean, stack.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, stack.std(axis=(0, 1, 2)), rtol=1e-12)
    sub = D.channel_stats(paths, size=16, max_images=2, seed=5)
    assert sub == D.channel_stats(paths, size=16, max_images=2, seed=5)  # deterministic
    pairs = [pair for pair in itertools.combinations(range(5), 2)
             if np.allclose(sub[0], stack[list(pair)].mean(axis=(0, 1, 2)), rtol=1e-12)]
    assert len(pairs) == 1  # the statistics of exactly one pair of photos


# ----------------------------------------------------------------------------- transforms
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def test_transform_shapes_dtypes_and_determinism():
    img = pattern(90, 120)
    train = D.build_transforms(64, MEAN, STD, train=True)
    ev = D.build_transforms(64, MEAN, STD, train=False)
    for t in (train, ev):
        out = t(img)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32 and out.is_contiguous()
        assert t(image=img)["image"].shape == (3, 64, 64)  # albumentations-style call
    assert torch.equal(ev(img), ev(img)) and torch.equal(ev(img), ev(image=img)["image"])
    outs = [train(img) for _ in range(4)]
    assert all(not torch.equal(outs[0], o) for o in outs[1:])
    train.set_random_seed(7)
    a = train(img)
    train.set_random_seed(7)
    assert torch.equal(a, train(img))
    assert eval_resize(224) == 256 and ev.resize == eval_resize(64) == 73


def test_normalisation_equals_torchvision():
    import torchvision.transforms.functional as TF

    img = pattern(64, 64)
    ev = D.build_transforms(64, MEAN, STD, train=False, resize=64)
    ref = TF.normalize(TF.to_tensor(img), MEAN, STD)
    assert torch.allclose(ev(img), ref, atol=1e-6)


def test_eval_transform_is_resize_then_centre_crop():
    img = pattern(90, 130)  # shorter side 90 -> 73: bilinear, no integer pre-shrink
    ev = D.build_transforms(64, MEAN, STD, train=False)
    resized = cv2.resize(img, (round(130 * 73 / 90), 73), interpolation=cv2.INTER_LINEAR)
    top, left = (73 - 64) // 2, (resized.shape[1] - 64) // 2
    crop = resized[top:top + 64, left:left + 64].astype(np.float32) / 255
    ref = torch.from_numpy(((crop - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))
    assert torch.allclose(ev(img), ref, atol=1e-5)
    alb = D.build_transforms(64, MEAN, STD, train=False, backend="albumentations")
    assert (alb(image=img)["image"] - ref).abs().mean() < 0.05  # it shrinks with INTER_AREA instead
    big = cv2.GaussianBlur(pattern(400, 300), (0, 0), 6)  # 300 -> 73: 4x INTER_AREA shrink, then bilinear
    ref_big = cv2.resize(big, (73, round(400 * 73 / 300)), interpolation=cv2.INTER_AREA)
    got = ev(big)
    t, l = (ref_big.shape[0] - 64) // 2, 4
    ref_t = torch.from_numpy(((ref_big[t:t + 64, l:l + 64] / 255 - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))
    assert (got - ref_t).abs().mean() < 0.03  # a 1-pixel misalignment would give ~0.15


def test_warp_crop_geometry():
    img = pattern(200, 300)
    box = (20, 10, 150, 120)
    ref = cv2.resize(img[10:130, 20:170], (100, 100), interpolation=cv2.INTER_LINEAR)
    out = D.warp_crop(img, box, 0, False, 100)
    assert out.shape == (100, 100, 3) and np.abs(out.astype(int) - ref).max() <= 2
    assert np.abs(D.warp_crop(img, box, 0, True, 100).astype(int) - ref[:, ::-1]).max() <= 2
    soft = cv2.GaussianBlur(img, (0, 0), 2)  # double interpolation differs at sharp edges only
    ref = cv2.resize(soft[10:130, 20:170], (100, 100), interpolation=cv2.INTER_LINEAR)
    rot = cv2.warpAffine(ref, cv2.getRotationMatrix2D((49.5, 49.5), 20, 1.0), (100, 100), flags=cv2.INTER_LINEAR)
    assert np.abs(D.warp_crop(soft, box, 20, False, 100).astype(int) - rot)[25:75, 25:75].mean() < 1.5
    up = D.warp_crop(img[:20, :30], (0, 0, 30, 20), 10, True, 64)  # upsampling
    assert up.shape == (64, 64, 3)
    smooth = cv2.GaussianBlur(img, (0, 0), 6)  # 4.7x / 3.1x downsampling: aligned with INTER_AREA ...
    area = cv2.resize(smooth, (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(D.warp_crop(smooth, (0, 0, 300, 200), 0, False, 64).astype(int) - area).mean() < 1.5
    checker = np.repeat(((np.indices((200, 300)).sum(0) % 2) * 255).astype(np.uint8)[:, :, None], 3, 2)
    aliased = cv2.resize(checker, (64, 64), interpolation=cv2.INTER_LINEAR)
    ours = D.warp_crop(checker, (0, 0, 300, 200), 0, False, 64)
    assert aliased.std() > 30 and ours.std() < 10  # ... and anti-aliased: 1-px checks average to grey


def test_train_transform_crop_scale_and_limits():
    t = D.build_transforms(32, MEAN, STD, train=True, scale=(0.35, 1.0), rotate_limit=30)
    t.set_random_seed(0)
    params = [t.params(100, 150) for _ in range(300)]
    fractions = [w * h / 15000 for (x, y, w, h), _, _ in params]
    assert 0.35 <= min(fractions) and max(fractions) <= 1.0
    assert all(0 <= x and x + w <= 150 + 1e-9 and 0 <= y and y + h <= 100 + 1e-9 for (x, y, w, h), _, _ in params)
    angles = [a for _, a, _ in params]
    assert -30 <= min(angles) < -20 and 20 < max(angles) <= 30
    assert 0.35 < np.mean([f for _, _, f in params]) < 0.65
    off = D.build_transforms(32, MEAN, STD, train=True, rotate_limit=0, hflip=False)
    assert all(a == 0 and not f for _, a, f in (off.params(50, 50) for _ in range(50)))


def test_image_dataset_and_loader_with_workers(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 2, "b": 2})
    index = D.scan_dataset(root)
    ds = D.ImageDataset(index.samples, D.build_transforms(32, MEAN, STD, train=True))
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y == 1 and isinstance(y, int)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, timeout=60)
    xs, ys = zip(*loader)
    assert torch.cat(ys).tolist() == [0, 0, 1, 1] and torch.cat(xs).shape == (4, 3, 32, 32)
    alb = D.ImageDataset(index.samples, D.build_transforms(32, MEAN, STD, train=False, backend="albumentations"))
    assert alb[0][0].shape == (3, 32, 32)
    bad = broken_files(tmp_path / "b")["text"]
    with pytest.raises(D.ImageDecodeError, match="notes.jpg"):
        D.ImageDataset([(str(bad), 0)], ds.transform)[0]


class _ThreadCount(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return cv2.getNumThreads()


def test_forked_workers_use_one_opencv_thread_and_parent_keeps_its_pool():
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        cv2.resize(pattern(400, 600), (300, 200))  # the pool is busy and alive before the fork
        loader = torch.utils.data.DataLoader(_ThreadCount(), batch_size=1, num_workers=2, timeout=60,
                                             multiprocessing_context="fork")
        assert [int(n) for n in loader] == [1, 1]
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)


# ----------------------------------------------------------------------------- demo set
def test_demo_dataset_deterministic_reused_and_distinct(tmp_path, monkeypatch):
    a = D.make_demo_dataset(tmp_path / "a", classes=4, per_class=5, size=48, seed=3)
    b = D.make_demo_dataset(tmp_path / "b", classes=4, per_class=5, size=48, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 20 and sorted(p.name for p in a.iterdir() if p.is_dir()) == sorted(D.DEMO_MINERALS[:4])
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    stamp = (a / files[0]).stat().st_mtime_ns
    assert D.make_demo_dataset(tmp_path / "a", classes=4, per_class=5, size=48, seed=3) == a
    assert (a / files[0]).stat().st_mtime_ns == stamp
    c = D.make_demo_dataset(tmp_path / "c", classes=4, per_class=5, size=48, seed=4)
    assert (c / files[0]).read_bytes() != (a / files[0]).read_bytes()
    index = D.scan_dataset(a)
    assert index.counts() == dict.fromkeys(sorted(D.DEMO_MINERALS[:4]), 5) and index.bad == []
    with pytest.raises(MineralNetError, match="not a demo set"):
        D.make_demo_dataset(tmp_path / "a", classes=3, per_class=5, size=48)
    monkeypatch.setenv("MINERALNET_CACHE", str(tmp_path / "cache"))
    default = D.make_demo_dataset(classes=2, per_class=1, size=32)
    assert default.parent == tmp_path / "cache" and default.name.startswith("demo-v1-")


def _foreground_colour(img: np.ndarray) -> np.ndarray:
    """Mean colour of the 20% of pixels farthest from the border's median colour, and its
    difference from that background colour."""
    a = img.astype(np.float32)
    bg = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), 0)
    d = np.linalg.norm(a - bg, axis=2)
    fg = a[d > np.percentile(d, 80)].mean(0)
    return np.concatenate([fg, fg - bg])


def test_demo_classes_are_distinguishable(tmp_path):
    root = D.make_demo_dataset(tmp_path / "demo", classes=8, per_class=20, size=48)
    index = D.scan_dataset(root)
    feats = np.array([_foreground_colour(D.load_image(p)) for p, _ in index.samples])
    labels = np.array(index.labels())
    fit = np.arange(len(labels)) % 2 == 0
    centroids = np.array([feats[fit & (labels == c)].mean(0) for c in range(8)])
    dist = np.linalg.norm(centroids[:, None] - centroids[None], axis=2)
    assert dist[~np.eye(8, dtype=bool)].min() > 10  # every pair of minerals differs in colour
    pred = np.argmin(np.linalg.norm(feats[~fit, None] - centroids[None], axis=2), axis=1)
    accuracy = (pred == labels[~fit]).mean()
    assert 0.4 < accuracy  # chance is 1/8: learnable from colour alone, yet far from trivial by it


@pytest.mark.realdata
@pytest.mark.skipif(not MINET7.is_dir(), reason="../shared/data/minet7 not present")
def test_minet7_scan_finds_seven_classes():
    index = D.scan_dataset(MINET7, verify=False)
    assert len(index.classes) == 7 and "MANIFEST" not in " ".join(index.classes)
    assert min(index.counts().values()) > 50
    assert D.load_image(index.samples[0][0]).ndim == 3


@pytest.mark.parametrize("shape", [(40, 57, 3), (300, 211, 3), (37, 36, 3)])
def test_eval_prepare_is_idempotent_so_a_prepared_cache_gives_the_same_tensor(shape):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    tf = D.build_transforms(32, [0.5] * 3, [0.25] * 3, train=False, resize=36)
    prepared = tf.prepare(img)
    assert min(prepared.shape[:2]) == 36
    assert np.array_equal(tf.prepare(prepared), prepared)
    assert torch.equal(tf(prepared), tf(img))
