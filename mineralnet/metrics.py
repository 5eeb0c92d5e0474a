"""Classification metrics of the paper: Top1 and mean per-class accuracy (the paper's "mAP")."""
from __future__ import annotations

import numpy as np


def confusion_matrix(targets, preds, num_classes: int) -> np.ndarray:
    """Counts (C, C): row = true class, column = predicted class."""
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    p = np.asarray(preds, dtype=np.int64).reshape(-1)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def summarize(cm: np.ndarray) -> dict:
    """Top1 and mean per-class accuracy (over classes present in the targets) from a confusion matrix."""
    support = cm.sum(axis=1)
    correct = np.diag(cm)
    present = support > 0
    per_class = np.where(present, correct / np.maximum(support, 1), np.nan)
    return {
        "top1": float(correct.sum() / max(cm.sum(), 1)),
        "mean_class_acc": float(np.nanmean(per_class)) if present.any() else 0.0,
        "per_class_acc": [None if np.isnan(a) else float(a) for a in per_class],
        "n": int(cm.sum()),
    }
