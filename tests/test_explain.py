"""`mineralnet explain`: Grad-CAM on fused stages, t-SNE, misrecognised gallery, report; bad input."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mineralnet import data as mdata
from mineralnet.cli import main as cli_main
from mineralnet.analysis.explain import comparison_stage, explain, grad_cam, pick_cam_images, sample_per_class
from mineralnet.model import FusionNet
from mineralnet.artifact import load_model, model_meta, save_model

S, P, C = 64, 16, 3
PATCH_COLOURS = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]])  # normalised RGB of each class


def patch_images(n, seed):
    """Noise images whose class is decided by the colour of one 16x16 patch at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, S, S, generator=g) * 0.5
    y = torch.randint(0, C, (n,), generator=g)
    corners = torch.randint(0, S - P + 1, (n, 2), generator=g)
    for i in range(n):
        r, c = corners[i].tolist()
        x[i, :, r:r + P, c:c + P] = PATCH_COLOURS[y[i]][:, None, None] * 1.5
    return x, y, corners


@pytest.fixture(scope="module")
def patch_model():
    """resnet18 F2+F4 whose head is trained (a few seconds, backbone frozen at random init) on patch images."""
    torch.manual_seed(0)
    model = FusionNet("resnet18", (2, 4), C).eval()
    x, y, _ = patch_images(192, seed=1)
    with torch.no_grad():
        fused = model.embed(x)
    opt = torch.optim.LBFGS(model.head.parameters(), max_iter=150)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model.head(fused), y)
        loss.backward()
        return loss
    opt.step(closure)
    return model


def test_grad_cam_highlights_the_deciding_patch(patch_model):
    x, y, corners = patch_images(16, seed=99)
    out = grad_cam(patch_model, x)
    cam = out["cam"]
    assert cam.shape == (16, S, S)                        # the image's size
    assert (out["logits"].argmax(1) == y).float().mean() >= 0.9
    assert float(cam.min()) >= 0 and float(cam.amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    for i in range(len(x)):
        assert cam[i].std() > 0.05                         # non-constant
        r, c = corners[i].tolist()
        inside = torch.zeros(S, S, dtype=torch.bool)
        inside[r:r + P, c:c + P] = True
        assert cam[i][inside].mean() > 2 * cam[i][~inside].mean(), i
        near = torch.zeros(S, S, dtype=torch.bool)
        near[max(0, r - 4):r + P + 4, max(0, c - 4):c + P + 4] = True
        assert near.flatten()[cam[i].flatten().argmax()], f"image {i}: the peak is away from the patch"
    alone = grad_cam(patch_model, x, stages=(4,))  # F4 alone: a 2x2 map at 64 px, upsampled
    assert alone["cam"].shape == (16, S, S) and alone["grids"][4] == (2, 2)
    assert alone["stage_maps"][4].flatten(1).std(1).min() > 0  # signed map; it may be all <= 0 (-> CAM 0)
    torch.testing.assert_close(alone["stage_maps"][4], out["stage_maps"][4])
    torch.testing.assert_close(out["raw"], out["stage_maps"][2] + out["stage_maps"][4])


def test_grad_cam_equals_the_class_activation_identity(patch_model):
    """With global-average pooling + a linear head, Grad-CAM's channel weights are W[class]/(H*W),
    so the fused map is sum_s upsample(W[class, stage s] . A_s): computed here without autograd."""
    x, _, _ = patch_images(4, seed=5)
    target = torch.tensor([0, 1, 2, 1])
    out = grad_cam(patch_model, x, target=target)
    with torch.no_grad():
        maps = patch_model.forward_features(x)
        W = patch_model.head.weight[target]              # (B, feature_dim)
        total, start = 0, 0
        for A in maps:
            w = W[:, start:start + A.shape[1]]
            start += A.shape[1]
            m = torch.einsum("bc,bchw->bhw", w, A)[:, None]
            total = total + F.interpolate(m, size=(S, S), mode="bilinear", align_corners=False)[:, 0]
        expected = total.clamp(min=0)
        expected = expected / expected.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(out["cam"], expected, rtol=1e-4, atol=1e-5)
    assert out["target"].tolist() == target.tolist()
    # the stage maps add up to the logit: mean over pixels ~ logit - bias (bilinear edges blur it a little)
    explained = out["logits"].gather(1, target[:, None])[:, 0] - patch_model.head.bias[target].detach()
    torch.testing.assert_close(out["raw"].mean(dim=(1, 2)), explained, rtol=0.05, atol=0.05)


def test_grad_cam_other_backbone_and_bad_stage():
    model = FusionNet("efficientnet_b0", (3, 4), 2).eval()
    out = grad_cam(model, torch.randn(2, 3, 64, 64))
    assert out["cam"].shape == (2, 64, 64) and set(out["stage_maps"]) == {3, 4}
    assert comparison_stage(model) == 4 and comparison_stage(FusionNet("resnet18", (4,), 2)) is None
    from mineralnet.errors import MineralNetError
    with pytest.raises(MineralNetError, match=r"stage\(s\) \[2\] are not fused"):
        grad_cam(model, torch.randn(1, 3, 64, 64), stages=(2,))


def test_photo_choice_helpers():
    labels = [0] * 7 + [1] * 2 + [2] * 5
    idx = sample_per_class(labels, 3, seed=1)
    assert [labels[i] for i in idx] == [0, 0, 0, 1, 1, 2, 2, 2] and len(set(idx)) == len(idx)
    assert idx == sample_per_class(labels, 3, seed=1)
    t = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    chosen = pick_cam_images(t, p, 10)
    assert sorted(t[chosen].tolist()) == [0, 0, 1, 2]  # one right and one wrong of class 0, ...
    assert len(pick_cam_images(t, p, 2)) == 2


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory with a random resnet18 F2+F4 model for the 3 demo classes, and the photos."""
    root = tmp_path_factory.mktemp("explain")
    data = mdata.make_demo_dataset(root / "demo", classes=3, per_class=5, size=40, seed=4)
    classes = mdata.scan_dataset(data).classes
    torch.manual_seed(0)
    model = FusionNet("resnet18", (2, 4), len(classes))
    run = root / "run"
    save_model(run, model, model_meta(model, classes=classes, image_size=32, mean=[0.5] * 3, std=[0.25] * 3,
                                      resize=36))
    return run, Path(data), classes


def _predict_independently(run, data, classes):
    model, meta = load_model(run)
    index = mdata.scan_dataset(data, classes=classes)
    tf = mdata.build_transforms(meta["image_size"], meta["mean"], meta["std"], train=False, resize=meta["resize"])
    with torch.no_grad():
        logits = torch.stack([model(tf(mdata.load_image(p))[None])[0] for p, _ in index.samples])
    return np.array(index.labels()), logits.argmax(1).numpy()


def test_explain_writes_pictures_report_and_one_tsne_point_per_photo(tiny_run, tmp_path):
    run, data, classes = tiny_run
    out = tmp_path / "explain"
    summary = explain(run, data, out=out, per_class=3, cams=4, gallery=6)
    for name in ("gradcam.png", "tsne.png", "misrecognised.png", "confusion.png", "metrics.json",
                 "per_class.csv", "tsne.csv", "report.md"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "tsne.csv").open()))
    assert len(rows) == 3 * len(classes)                  # one point per chosen photo
    assert sorted({r["true"] for r in rows}) == sorted(classes)
    assert all(sum(r["true"] == c for r in rows) == 3 for c in classes)
    assert len({(r["x"], r["y"]) for r in rows}) == len(rows)
    targets, preds = _predict_independently(run, data, classes)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(np.mean(targets == preds))
    assert summary["misrecognised"] == int((targets != preds).sum())
    report = (out / "report.md").read_text()
    assert "mean class acc (paper's mAP)" in report and "![Grad-CAM](gradcam.png)" in report
    assert "![t-SNE](tsne.png)" in report and f"{len(targets)} images" in report
    assert (out / "gradcam.png").read_bytes()[:4] == b"\x89PNG"


def test_explain_val_only_uses_the_runs_validation_photos(tiny_run, tmp_path):
    run, data, classes = tiny_run
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    index = mdata.scan_dataset(data)
    rel = [str(Path(p).relative_to(data)) for p, _ in index.samples]
    (run2 / "split.json").write_text(json.dumps({"root": str(data), "train": rel[::2], "val": rel[1::2]}))
    summary = explain(run2, data, per_class=2, cams=0, gallery=0, val_only=True)
    assert summary["images"] == len(rel[1::2]) and summary["train_overlap"] == 0
    full = explain(run2, data, per_class=2, cams=0, gallery=0)
    assert full["train_overlap"] == len(rel[::2])
    assert "were used to TRAIN this run" in (run2 / "explain" / "report.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("no_weights", "has no model.safetensors"),
    ("unknown_class", "amethyst"),
    ("per_class_0", "--per-class 0 must be at least 1"),
])
def test_explain_bad_input_is_one_line(tiny_run, tmp_path, capsys, case, message):
    run, data, classes = tiny_run
    args = [str(run), "--data", str(data)]
    if case == "no_weights":
        empty = tmp_path / "empty_run"
        empty.mkdir()
        shutil.copy(run / "model.json", empty / "model.json")
        args[0] = str(empty)
    elif case == "unknown_class":
        other = tmp_path / "other"
        shutil.copytree(data, other)
        shutil.copytree(other / classes[0], other / "amethyst")
        args[2] = str(other)
    else:
        args += ["--per-class", "0"]
    rc = cli_main(["explain", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("mineralnet: error:"), err
    assert message in err
