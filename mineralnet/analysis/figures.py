"""The figures of `mineralnet explain`: the Grad-CAM grid (the paper's Figure 3), the t-SNE map (Figure 5)
and the gallery of misrecognised photos (Figure 6). Each takes arrays and writes one PNG."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mineralnet.data import load_image
from mineralnet.report import abbreviate

# ----------------------------------------------------------------------------- pictures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

def display_image(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised (3, H, W) tensor -> (H, W, 3) float RGB in 0..1, the crop the model saw."""
    img = x.detach().float().cpu().numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(img, 0, 1)

def _short(name: str, width: int = 22) -> str:
    name = name.replace("_", " ")
    return name if len(name) <= width else name[:width - 1] + "…"

def stage_label(stages) -> str:
    return "+".join(f"F{s}" for s in stages)

def plot_gradcam_grid(path, images, panels, classes, targets, preds, confs) -> Path:
    """Rows of (photo | one Grad-CAM per panel) groups, two groups per row.

    panels: [(title, cams (N, H, W) in 0..1, stage grid (h, w) or None, shares (N,) or None)]; a share
    is the fraction of the predicted class's score that the panel's stages provide.
    """
    plt = _plt()
    n = len(images)
    per_group = 1 + len(panels)
    groups_per_row = 2 if n > 1 else 1
    rows = math.ceil(n / groups_per_row)
    cols = groups_per_row * per_group
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.85 * rows + 0.7), dpi=110, squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        r, g = divmod(k, groups_per_row)
        ax_img = axes[r, g * per_group]
        ok = int(targets[k]) == int(preds[k])
        ax_img.imshow(images[k])
        ax_img.set_title(f"true: {_short(classes[targets[k]])}\npred: {_short(classes[preds[k]])} "
                         f"{100 * confs[k]:.0f}%", fontsize=8.5, color="black" if ok else "#c00000", loc="left")
        if not ok:
            for side in ax_img.spines.values():
                side.set_visible(True)
                side.set_color("#c00000")
                side.set_linewidth(2)
            ax_img.axis("on")
            ax_img.set_xticks([])
            ax_img.set_yticks([])
        for j, (title, cams, grid, shares) in enumerate(panels, start=1):
            ax = axes[r, g * per_group + j]
            ax.imshow(images[k])
            cam = cams[k]
            note = None
            if grid is not None and grid[0] * grid[1] <= 1:
                note = "1×1 map at this\nimage size:\nno spatial detail"
            elif float(np.max(cam)) <= 0:
                note = "no positive evidence\nfor this class here"
            if note:  # say so instead of painting the photo in one colour
                ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=8,
                        bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
            else:
                ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            share = "" if shares is None or not np.isfinite(shares[k]) else f"\n{100 * shares[k]:.0f}% of the score"
            ax.set_title(title + share, fontsize=8.5)
    fig.suptitle("Where the model finds evidence for its predicted mineral (red = strongest; red title = "
                 "misrecognised)", fontsize=10)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path

def _class_styles(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    markers = "osD^vP*Xh<>p"
    colours = [cmap(i % cmap.N) for i in range(n)]
    return colours, [markers[(i // cmap.N) % len(markers)] if n > 10 else "o" for i in range(n)]

def plot_tsne(path, xy, targets, preds, classes, title: str) -> Path:
    """Scatter of the 2-D t-SNE, one colour (and marker beyond 10 classes) per true class; a red ring
    marks each misrecognised photo, labelled with the predicted class's symbol."""

    plt = _plt()
    colours, markers = _class_styles(len(classes))
    symbols = abbreviate(classes)
    fig, ax = plt.subplots(figsize=(8.5, 6.5), dpi=120)
    for c in range(len(classes)):
        sel = targets == c
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=36, color=colours[c], marker=markers[c],
                       label=f"{_short(classes[c], 26)} ({symbols[c]})", edgecolors="white", linewidths=0.4)
    wrong = np.flatnonzero(targets != preds)
    if len(wrong):
        ax.scatter(xy[wrong, 0], xy[wrong, 1], s=190, facecolors="none", edgecolors="#d00000", linewidths=1.6,
                   label="misrecognised (→ predicted)")
        for i in wrong:
            ax.annotate(f"→{symbols[preds[i]]}", (xy[i, 0], xy[i, 1]), xytext=(7, 5), textcoords="offset points",
                        fontsize=7.5, color="#d00000")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="true mineral")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path

def _thumbnail(path, side: int = 256) -> np.ndarray:

    img = load_image(path)
    h, w = img.shape[:2]
    s = side / max(h, w)
    if s < 1:
        import cv2
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img

def plot_gallery(path, items, classes, columns: int = 5) -> Path:
    """Misrecognised photos (whole photo, not the crop), most confident mistakes first.

    items: [(image path, true, pred, confidence of pred, probability of the true class)].
    """
    plt = _plt()
    n = max(1, len(items))
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.7 * columns, 3.2 * rows + 0.5), dpi=110, squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    if not items:
        axes[0, 0].text(0.5, 0.5, "no misrecognised photos", ha="center", va="center", fontsize=12)
    for k, (p, t, pr, conf, p_true) in enumerate(items):
        ax = axes.flat[k]
        ax.imshow(_thumbnail(p))
        ax.set_title(f"true: {_short(classes[t])} ({100 * p_true:.0f}%)\npred: {_short(classes[pr])} "
                     f"{100 * conf:.0f}%\n{_short(Path(p).name, 30)}", fontsize=8, loc="left", color="#a00000")
    fig.suptitle("Misrecognised photos, most confident mistakes first (in brackets: the probability given "
                 "to the true mineral)", fontsize=10)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
