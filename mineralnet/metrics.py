"""Classification metrics of the paper: Top1 and mean per-class accuracy (the paper's "mAP").

The paper (Jia et al. 2021, Section 3.1) calls the mean of the per-class Top1 accuracies "mAP".
It is a balanced accuracy, NOT the mean average precision of object detection, so it is printed as
"mean class acc (paper's mAP)" everywhere. A class with no target samples has no accuracy (None)
and does not enter the mean, as in scikit-learn's ``balanced_accuracy_score``.
"""
from __future__ import annotations

import numpy as np

MEAN_CLASS_ACC_LABEL = "mean class acc (paper's mAP)"


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


def _ratio(num, den) -> float | None:
    return float(num / den) if den > 0 else None


def per_class_table(cm: np.ndarray, classes=None) -> list[dict]:
    """One row per class from a confusion matrix.

    accuracy is the paper's per-class Top1 (= recall). A value whose denominator is zero is None:
    accuracy/recall for a class absent from the targets, precision for a class never predicted,
    F1 for a class absent from both (F1 = 2TP / (2TP + FP + FN), so it is 0, not None, when only
    one of precision and recall is undefined, as in scikit-learn).
    """
    cm = np.asarray(cm)
    num_classes = cm.shape[0]
    classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    tp = np.diag(cm)
    support = cm.sum(axis=1)    # true samples per class
    predicted = cm.sum(axis=0)  # predictions per class
    rows = []
    for c in range(num_classes):
        fp, fn = predicted[c] - tp[c], support[c] - tp[c]
        recall = _ratio(tp[c], support[c])
        rows.append({
            "class": classes[c], "index": c, "support": int(support[c]), "correct": int(tp[c]),
            "predicted": int(predicted[c]), "accuracy": recall,
            "precision": _ratio(tp[c], predicted[c]), "recall": recall,
            "f1": _ratio(2 * tp[c], 2 * tp[c] + fp + fn),
        })
    return rows


def topk_accuracy(targets, probs, k: int = 3) -> float | None:
    """Fraction of samples whose true class is among the k highest scores (None without scores).

    Ties are broken towards the lower class index (a stable sort), like scikit-learn.
    """
    if probs is None:
        return None
    probs = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(t):
        raise ValueError(f"scores of shape {probs.shape} do not match {len(t)} targets")
    if len(t) == 0:
        return None
    k = min(int(k), probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
    return float((top == t[:, None]).any(axis=1).mean())


def row_percent(cm: np.ndarray) -> np.ndarray:
    """Row-normalised confusion matrix in % (rows of absent classes are all 0), as the paper's Table 10."""
    cm = np.asarray(cm, dtype=np.float64)
    return 100.0 * cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)


def compute_metrics(targets, preds, probs=None, classes=None, num_classes: int | None = None) -> dict:
    """Every metric of the paper and of issue 4 in one JSON-ready dict.

    Args:
        targets, preds: true and predicted class indices (N,).
        probs: optional (N, C) scores (softmax probabilities) for top-3 accuracy.
        classes: class names in index order (defines C when given).
    Returns:
        dict with top1, mean_class_acc, top3, n, classes, per_class (rows of `per_class_table`),
        per_class_acc, macro precision/recall/F1 (over classes where defined),
        confusion (counts) and confusion_percent (row-normalised %).
    """
    if classes is not None:
        num_classes = len(classes)
    elif num_classes is None:
        if probs is not None:
            num_classes = np.asarray(probs).shape[1]
        else:
            num_classes = int(max(np.max(targets, initial=-1), np.max(preds, initial=-1))) + 1
    classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    cm = confusion_matrix(targets, preds, num_classes)
    rows = per_class_table(cm, classes)

    def macro(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    out = summarize(cm)
    out.update({
        "top3": topk_accuracy(targets, probs, 3),
        "classes": classes,
        "per_class": rows,
        "macro_precision": macro("precision"), "macro_recall": macro("recall"), "macro_f1": macro("f1"),
        "confusion": cm.tolist(),
        "confusion_percent": np.round(row_percent(cm), 4).tolist(),
    })
    return out


def format_table(metrics: dict) -> str:
    """A plain-text per-class table with the summary lines, for the terminal."""
    def pct(v):
        return "   -  " if v is None else f"{100 * v:6.2f}"

    rows = metrics["per_class"]
    width = max([len("class")] + [len(r["class"]) for r in rows])
    lines = [f"{'class':<{width}}  {'n':>5}  {'acc%':>6}  {'prec%':>6}  {'rec%':>6}  {'F1%':>6}"]
    for r in rows:
        lines.append(f"{r['class']:<{width}}  {r['support']:>5}  {pct(r['accuracy'])}  {pct(r['precision'])}  "
                     f"{pct(r['recall'])}  {pct(r['f1'])}")
    lines.append("")
    lines.append(f"Top1 {100 * metrics['top1']:.2f}%   {MEAN_CLASS_ACC_LABEL} {100 * metrics['mean_class_acc']:.2f}%"
                 + (f"   Top3 {100 * metrics['top3']:.2f}%" if metrics.get("top3") is not None else "")
                 + f"   ({metrics['n']} images)")
    return "\n".join(lines)
