"""Device-side augmentation (--augment-on device): the loader's uint8 canvases, the per-sample parameter law,
the warp's geometry against OpenCV's worker warp, reproducibility, process-count independence, mixing and
the training path."""
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mineralnet import data as mdata
from mineralnet.config import load_config
from mineralnet.data.device_augment import (CanvasDataset, DeviceAugment, RawPhotos, affine_matrices,
                                            draw_params, letterbox, uniforms, warp)
from mineralnet.data.transforms import _random_resized_crop_box, warp_crop
from mineralnet.errors import MineralNetError

PLAIN = dict(mean=[0.0, 0.0, 0.0], std=[1 / 255] * 3)  # output = pixel values on the 0..255 scale


def _pattern(h=120, w=160):
    """A smooth, non-symmetric RGB test photo (bilinear warps of it differ only by rounding)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([127 + 120 * np.sin(xx / 9.0 + yy / 50), 127 + 120 * np.cos(yy / 7.0), 60 + 0.5 * (xx + yy)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _batch(img, side, seeds):
    canvas, h, w = letterbox(img, side)
    pixels = torch.from_numpy(canvas)[None].repeat(len(seeds), 1, 1, 1)
    return RawPhotos(pixels, torch.tensor([[s, h, w] for s in seeds], dtype=torch.int64))


def _info(n, h, w, start=0):
    return torch.tensor([[s, h, w] for s in range(start, start + n)], dtype=torch.int64)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = mdata.make_demo_dataset(tmp_path_factory.mktemp("demo"), classes=3, per_class=6, size=48, seed=2)
    return mdata.scan_dataset(root).samples


# ----------------------------------------------------------------------------- loader side
def test_letterbox_keeps_the_whole_photo_at_the_top_left():
    img = _pattern(60, 200)
    canvas, h, w = letterbox(img, 100)
    assert canvas.shape == (100, 100, 3) and canvas.dtype == np.uint8 and (h, w) == (30, 100)
    assert not canvas[h:].any()  # the padding is zeros and below the photo
    small, h2, w2 = letterbox(img[:20, :30], 100)  # never enlarged
    assert (h2, w2) == (20, 30) and np.array_equal(small[:20, :30], img[:20, :30])


def test_canvas_loader_yields_uint8_canvases_seeds_and_sizes(photos):
    ds = CanvasDataset(photos, side=40, seed=7)
    batch, y = next(iter(DataLoader(ds, batch_size=5)))
    assert isinstance(batch, RawPhotos)
    assert batch.pixels.shape == (5, 40, 40, 3) and batch.pixels.dtype == torch.uint8
    assert batch.info.shape == (5, 3) and batch.info.dtype == torch.int64 and y.shape == (5,)
    assert batch.info[:, 1:].max() <= 40 and batch.info[:, 1:].max(1).values.eq(40).all()  # longer side fits
    # the seed is the worker pipeline's per-sample seed
    ds.set_epoch(3)
    assert int(ds[4][0].info[0]) == (7 * 1_000_003 + 3 * 100_003 + 4) % 2**32
    # uncached: the same canvases, decoded at every access
    assert torch.equal(CanvasDataset(photos, side=40, seed=7, cache=False)[2][0].pixels, ds[2][0].pixels)


def test_device_augment_output_shape_dtype_layout(photos):
    ds = CanvasDataset(photos, side=40, seed=0)
    batch, _ = next(iter(DataLoader(ds, batch_size=6)))
    out = DeviceAugment(24, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])(batch)
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- the parameter law
def test_uniforms_are_uniform_and_independent_of_the_batch():
    u = uniforms(torch.arange(20000, dtype=torch.int64), 4)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    hist = torch.histc(u[:, 0], bins=10, min=0, max=1)
    assert (hist - 2000).abs().max() < 200  # ~4.5 sigma
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03 and abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03
    assert torch.equal(uniforms(torch.tensor([17, 5]), 4)[0], u[17])


@pytest.mark.parametrize("scale,rot", [((0.35, 1.0), 30), ((0.08, 0.5), 90)])
def test_crop_scale_ratio_rotation_flip_statistics_match_the_ranges(scale, rot):
    H, W, n, ratio = 300, 400, 20000, (3 / 4, 4 / 3)
    boxes, angles, flips = draw_params(_info(n, H, W), scale=scale, ratio=ratio, rotate_limit=rot, hflip=True)
    x, y, w, h = boxes.double().unbind(1)
    area = w * h / (H * W)
    assert area.min() >= scale[0] - 1e-5 and area.max() <= scale[1] + 1e-5
    assert (w / h).min() >= ratio[0] - 1e-5 and (w / h).max() <= ratio[1] + 1e-5
    assert x.min() >= 0 and y.min() >= 0 and (x + w).max() <= W + 1e-3 and (y + h).max() <= H + 1e-3
    assert angles.abs().max() <= rot and abs(angles.mean().item()) < 0.03 * rot
    assert angles.std().item() == pytest.approx(rot / math.sqrt(3), rel=0.03)  # uniform on [-rot, rot]
    assert abs(flips.float().mean().item() - 0.5) < 0.02
    # the same law as the worker pipeline's sampler (an independent, scalar implementation)
    rng = random.Random(0)
    ref = np.array([_random_resized_crop_box(H, W, scale, ratio, rng) for _ in range(n)])
    for ours, theirs in [(area.numpy(), ref[:, 2] * ref[:, 3] / (H * W)), ((w / h).log().numpy(),
                                                                           np.log(ref[:, 2] / ref[:, 3])),
                         ((x / (W - w).clamp(min=1e-9)).numpy(), ref[:, 0] / np.maximum(W - ref[:, 2], 1e-9))]:
        grid = np.quantile(theirs, np.linspace(0.05, 0.95, 19))
        assert np.abs(np.quantile(ours, np.linspace(0.05, 0.95, 19)) - grid).max() < 0.03 * (theirs.max() - theirs.min())


def test_flip_off_rotation_off_and_the_centre_crop_fallback():
    boxes, angles, flips = draw_params(_info(500, 100, 100), scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3),
                                       rotate_limit=0, hflip=False)
    assert not flips.any() and not angles.any()
    # a full-area crop of a square photo fits only at aspect 1: the fallback takes the whole photo
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 100.0, 100.0]]).expand(500, 4))
    # a panorama falls back to the widest allowed crop, centred (torchvision's rule)
    boxes, _, _ = draw_params(_info(50, 100, 400), scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3), rotate_limit=0,
                              hflip=False)
    assert torch.allclose(boxes, torch.tensor([[400 / 2 - 100 * 4 / 6, 0.0, 100 * 4 / 3, 100.0]]).expand(50, 4))


# ----------------------------------------------------------------------------- geometry
def test_warp_equals_the_worker_pipelines_opencv_warp_for_the_same_parameters():
    img = _pattern()
    aug = DeviceAugment(96, **PLAIN, scale=(0.35, 1.0), rotate_limit=30)
    batch = _batch(img, 200, range(40))  # photo 120 x 160 inside a 200 x 200 canvas
    out = aug(batch)
    boxes, angles, flips = aug.params(batch.info)
    assert flips.any() and not flips.all() and (angles.abs() > 20).any()
    for b in range(40):  # crops < 2x the output: OpenCV does no pre-shrink, both are plain bilinear
        ref = warp_crop(img, boxes[b].tolist(), float(angles[b]), bool(flips[b]), 96).astype(np.float32)
        diff = np.abs(out[b].permute(1, 2, 0).numpy() - ref)
        assert diff.max() <= 1.0 and diff.mean() < 0.35, b  # OpenCV rounds to uint8 (and 1/32 px positions)


def test_geometry_of_a_known_pattern_crop_flip_and_rotation():
    # a photo whose red channel is x and green channel is y: the output shows where each pixel was read
    yy, xx = np.mgrid[0:64, 0:128]
    img = np.stack([xx, yy * 2, np.zeros_like(xx)], -1).astype(np.uint8)
    info = torch.tensor([[0, 64, 128]])
    pixels = torch.from_numpy(letterbox(img, 128)[0])[None]
    box = torch.tensor([[32.0, 16.0, 64.0, 32.0]])
    out = warp(pixels, info, affine_matrices(box, torch.zeros(1), torch.zeros(1, dtype=torch.bool), 32), 32)[0]
    # output pixel (i, j) reads source position (32 + 2 (j + 0.5), 16 + (i + 0.5)), index = position - 0.5
    j = torch.arange(32, dtype=torch.float32)
    assert torch.allclose(out[0, 5], 32 + 2 * (j + 0.5) - 0.5, atol=1e-3)
    assert torch.allclose(out[1, :, 7], 2 * (16 + (j + 0.5) - 0.5), atol=1e-3)
    flipped = warp(pixels, info, affine_matrices(box, torch.zeros(1), torch.ones(1, dtype=torch.bool), 32), 32)[0]
    assert torch.allclose(flipped, out.flip(-1), atol=1e-3)
    # 90 degrees counter-clockwise on a square crop: the output's top row is the crop's right column
    sq = torch.tensor([[40.0, 16.0, 32.0, 32.0]])
    upright = warp(pixels, info, affine_matrices(sq, torch.zeros(1), torch.zeros(1, dtype=torch.bool), 32), 32)[0]
    turned = warp(pixels, info, affine_matrices(sq, torch.full((1,), 90.0), torch.zeros(1, dtype=torch.bool), 32),
                  32)[0]
    assert torch.allclose(turned, torch.rot90(upright, 1, dims=(1, 2)), atol=1e-3)


def test_rotated_corners_reflect_inside_the_photo_never_into_the_padding():
    img = np.full((50, 90, 3), 200, np.uint8)  # a flat photo in a canvas of zeros
    out = DeviceAugment(32, **PLAIN, scale=(0.9, 1.0), rotate_limit=45)(_batch(img, 120, range(64)))
    assert torch.allclose(out, torch.full_like(out, 200.0), atol=1e-3)


def test_identity_when_augmentation_is_off_up_to_the_resize():
    img = _pattern(64, 64)
    off = dict(**PLAIN, scale=(1.0, 1.0), rotate_limit=0, hflip=False)
    same = DeviceAugment(64, **off)(_batch(img, 80, [1, 2]))
    expect = torch.from_numpy(img).permute(2, 0, 1).float()
    assert torch.allclose(same[0], expect, atol=1e-4) and torch.allclose(same[1], expect, atol=1e-4)
    half = DeviceAugment(32, **off)(_batch(img, 80, [3]))[0]
    resized = F.interpolate(expect[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=False)[0]
    assert torch.allclose(half, resized, atol=1e-3)
    # and normalisation is the worker pipeline's (v / 255 - mean) / std
    mean, std = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]
    norm = DeviceAugment(64, mean, std, scale=(1.0, 1.0), rotate_limit=0, hflip=False)(_batch(img, 80, [1]))[0]
    ref = mdata.EvalTransform(64, mean, std, resize=64)(img)
    assert torch.allclose(norm, ref, atol=1e-5)


# ----------------------------------------------------------------------------- reproducibility
def test_seeded_reproducibility_and_fresh_draws_per_epoch(photos):
    ds = CanvasDataset(photos, side=40, seed=5)
    aug = DeviceAugment(24, [0.5] * 3, [0.25] * 3)
    first = aug(next(iter(DataLoader(ds, batch_size=8)))[0])
    again = aug(next(iter(DataLoader(CanvasDataset(photos, side=40, seed=5), batch_size=8)))[0])
    assert torch.equal(first, again)
    ds.set_epoch(1)
    assert not torch.allclose(first, aug(next(iter(DataLoader(ds, batch_size=8)))[0]))


def test_a_sample_is_augmented_the_same_in_any_batch_or_shard():
    batch = _batch(_pattern(), 200, range(100, 112))
    aug = DeviceAugment(48, [0.5] * 3, [0.25] * 3)
    whole = aug(batch)
    halves = torch.cat([aug(RawPhotos(batch.pixels[s], batch.info[s])) for s in (slice(0, 6), slice(6, 12))])
    assert torch.equal(whole, halves)
    reordered = aug(RawPhotos(batch.pixels.flip(0), batch.info.flip(0)))
    assert torch.equal(reordered.flip(0), whole)


def test_two_processes_augment_their_shards_exactly_as_one_process_does(photos):
    """Accelerate's own sharding (split_batches, 2 processes) of the training loader: the shards' augmented
    photos, put together, are the one-process batch."""
    from accelerate.data_loader import prepare_data_loader

    ds = CanvasDataset(photos, side=40, seed=3)
    aug = DeviceAugment(24, [0.5] * 3, [0.25] * 3)

    def batches(procs, rank):
        sampler = mdata.EpochShuffleSampler(len(ds), 3)
        loader = DataLoader(ds, batch_size=6, sampler=sampler, drop_last=True)
        if procs > 1:
            loader = prepare_data_loader(loader, torch.device("cpu"), num_processes=procs, process_index=rank,
                                         split_batches=True, put_on_device=False)
        return [(aug(x), y) for x, y in loader]

    one = batches(1, 0)
    shards = [batches(2, r) for r in (0, 1)]
    assert len(one) == len(shards[0]) == len(shards[1]) == 3
    for step, (x, y) in enumerate(one):
        assert shards[0][step][0].shape[0] == 3
        assert torch.equal(torch.cat([shards[0][step][0], shards[1][step][0]]), x)
        assert torch.equal(torch.cat([shards[0][step][1], shards[1][step][1]]), y)


# ----------------------------------------------------------------------------- mixing and training
def test_mixup_and_cutmix_after_device_augmentation_give_label_rows_summing_to_one():
    batch = _batch(_pattern(), 200, range(8))
    x = DeviceAugment(32, [0.5] * 3, [0.25] * 3)(batch)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for mix in (mdata.BatchMix(3, mixup=0.2, seed=1), mdata.BatchMix(3, cutmix=1.0, seed=1),
                mdata.BatchMix(3, mixup=0.2, cutmix=1.0, seed=1)):
        for step in range(5):
            xm, ym = mix(x, y, step)
            assert xm.shape == x.shape and ym.shape == (8, 3)
            assert torch.allclose(ym.sum(1), torch.ones(8)) and (ym >= 0).all()


def test_augment_on_setting_and_its_validation(monkeypatch):
    from mineralnet.train.inputs import augment_on

    assert augment_on(load_config("base", augment_on="device")) == "device"
    assert augment_on(load_config("base", cache_images=True, augment_on="workers")) == "workers"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert augment_on(load_config("base", cache_images=True)) == "workers"  # auto on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert augment_on(load_config("base", cache_images=True)) == "device"
    assert augment_on(load_config("base", cache_images=False)) == "workers"
    with pytest.raises(MineralNetError, match="--augment-on 'gpu' must be auto, workers or device"):
        load_config("base", augment_on="gpu")


def test_validation_loader_is_the_same_in_both_modes(photos):
    from mineralnet.train.inputs import DataSplit, build_loaders

    split = DataSplit(["a", "b", "c"], photos[:12], photos[12:], [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], [], {})
    loaders = {mode: build_loaders(load_config("base", image_size=32, batch_size=4, workers=0, cache_images=True,
                                               augment_on=mode), split) for mode in ("workers", "device")}
    for (xw, yw), (xd, yd) in zip(loaders["workers"][1], loaders["device"][1]):
        assert torch.equal(xw, xd) and torch.equal(yw, yd)
    assert isinstance(loaders["device"][0].dataset, CanvasDataset)


@pytest.mark.slow
def test_tiny_training_with_augment_on_device_runs(tmp_path):
    from mineralnet.train import fit

    root = mdata.make_demo_dataset(tmp_path / "demo", classes=3, per_class=10, size=40, seed=1)
    cfg = load_config("base", data=str(root), out=str(tmp_path / "run"), backbone="resnet18", image_size=32,
                      train_crop_min=16, batch_size=8, workers=0, epochs=2, precision="fp32", cache_images=True,
                      augment_on="device", mixup=0.2, cutmix=1.0, loss="ce")
    result = fit(cfg)
    assert result["status"] == "finished" and (tmp_path / "run" / "model.safetensors").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in lines[1]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_process_with_augment_on_device(tmp_path):
    """The real thing: `accelerate launch` with 2 CPU (gloo) processes, device-side augmentation, frozen BN
    (so batch splitting cannot matter): the same weights as one process."""
    from safetensors.torch import load_file

    root = mdata.make_demo_dataset(tmp_path / "demo", classes=3, per_class=10, size=40, seed=1)
    train = str(Path(__file__).resolve().parents[1] / "launch" / "train.py")
    args = ["--config", "base", "--data", str(root), "--backbone", "resnet18", "--image-size", "32",
            "--batch-size", "8", "--workers", "0", "--optimizer", "sgd", "--lr", "0.05", "--scheduler", "none",
            "--precision", "fp32", "--normalize", "imagenet", "--seed", "3", "--epochs", "2", "--freeze-bn",
            "--cache-images", "--augment-on", "device", "--loss", "wtopk"]
    env = dict(os.environ, MINERALNET_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    two = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29700 + os.getpid() % 1000), train]
    for name, launcher in (("one", [sys.executable, train]), ("two", two)):
        p = subprocess.run([*launcher, *args, "--out", str(tmp_path / name)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    one, two = (load_file(str(tmp_path / n / "state" / "model.safetensors")) for n in ("one", "two"))
    diff = max((one[k].double() - two[k].double()).abs().max().item() for k in one if one[k].is_floating_point())
    assert diff < 1e-5
