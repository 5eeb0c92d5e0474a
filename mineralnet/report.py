"""The eval report shared by training, `eval` and `explain`: metrics.json, per_class.csv and the
confusion matrix figure, plus the mineral abbreviations every figure uses.

matplotlib is imported inside the functions (Agg backend, no display needed).
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from mineralnet.metrics import compute_metrics, row_percent
from mineralnet.files import atomic_write_json, atomic_write_text
from mineralnet.runs import EVAL_CLASSES_FILE, EVAL_CONFUSION_FILE, EVAL_METRICS_FILE

CSV_FIELDS = ("class", "support", "correct", "predicted", "accuracy", "precision", "recall", "f1")

# Mineral symbols of the IMA-CNMNC list (Warr 2021, Mineralogical Magazine 85, 291-320), the
# abbreviations geologists read in tables such as the paper's Table 10. Unknown names fall back to
# a unique prefix; every figure carries a key, so a symbol is never the only label.
MINERAL_SYMBOLS = {
    "actinolite": "Act", "albite": "Ab", "amphibole": "Amp", "anhydrite": "Anh", "antimonite": "Stbn",
    "apatite": "Ap", "aragonite": "Arg", "arsenopyrite": "Apy", "augite": "Aug", "azurite": "Azu",
    "barite": "Brt", "baryte": "Brt", "beryl": "Brl", "biotite": "Bt", "bornite": "Bn", "calcite": "Cal",
    "cassiterite": "Cst", "celestine": "Cls", "cerussite": "Cer", "chalcedony": "Chc", "chalcopyrite": "Ccp",
    "chalcocite": "Cc", "chlorite": "Chl", "chrysocolla": "Ccl", "cinnabar": "Cnb", "copper": "Cu",
    "corundum": "Crn", "cuprite": "Cpr", "diamond": "Dia", "dolomite": "Dol", "epidote": "Ep",
    "feldspar": "Fsp", "fluorite": "Fl", "galena": "Gn", "garnet": "Grt", "gold": "Au", "graphite": "Gr",
    "gypsum": "Gp", "halite": "Hl", "hematite": "Hem", "hornblende": "Hbl", "kyanite": "Ky",
    "labradorite": "Lab", "limonite": "Lm", "magnetite": "Mag", "malachite": "Mlc", "marcasite": "Mrc",
    "microcline": "Mc", "molybdenite": "Mol", "muscovite": "Ms", "olivine": "Ol", "opal": "Opl",
    "orpiment": "Orp", "orthoclase": "Or", "phlogopite": "Phl", "plagioclase": "Pl", "pyrite": "Py",
    "pyromorphite": "Pym", "pyroxene": "Px", "quartz": "Qz", "realgar": "Rlg", "rhodochrosite": "Rds",
    "rhodonite": "Rdn", "rutile": "Rt", "serpentine": "Srp", "siderite": "Sd", "silver": "Ag",
    "smithsonite": "Sm", "sphalerite": "Sp", "spinel": "Spl", "staurolite": "St", "stibnite": "Stbn",
    "sulfur": "S", "sulphur": "S", "talc": "Tlc", "topaz": "Tpz", "tourmaline": "Tur", "turquoise": "Tqu",
    "vanadinite": "Vna", "wolframite": "Wf", "wulfenite": "Wul", "zircon": "Zrn",
}


def _symbol(name: str) -> str | None:
    key = re.sub(r"[\s_\-]+", " ", name.strip().lower())
    if key in MINERAL_SYMBOLS:
        return MINERAL_SYMBOLS[key]
    parts = [p.strip() for p in re.split(r"\s*(?:&|\+|\band\b|/)\s*", key) if p.strip()]
    if len(parts) > 1 and all(p in MINERAL_SYMBOLS for p in parts):
        return "&".join(MINERAL_SYMBOLS[p] for p in parts)  # the paper's "Bt&Phl"
    return None


def abbreviate(names) -> list[str]:
    """Short, unique labels for class names: mineral symbols where known, else the shortest unique
    prefix (3+ characters), capitalised. Duplicates get a numeric suffix."""
    names = list(names)
    out = [_symbol(n) for n in names]
    for i, n in enumerate(names):
        if out[i] is None:
            clean = re.sub(r"[\s_\-]+", "", n) or n
            taken = {o for j, o in enumerate(out) if o is not None and j != i}
            others = [re.sub(r"[\s_\-]+", "", m).lower() for j, m in enumerate(names) if j != i]
            for length in range(3, len(clean) + 1):
                cand = clean[:length]
                if cand.lower() not in {o.lower() for o in taken} and not any(o.startswith(cand.lower()) for o in others):
                    break
            out[i] = cand[:1].upper() + cand[1:]
    seen: dict[str, int] = {}
    for i, o in enumerate(out):
        if o in seen:
            seen[o] += 1
            out[i] = f"{o}{seen[o]}"
        else:
            seen[o] = 1
    return out


def use_full_names(names, max_classes: int = 12, max_len: int = 14) -> bool:
    return len(names) <= max_classes and max(len(n) for n in names) <= max_len


def key_text(names, labels, columns: int) -> str:
    """'Py = pyrite   Qz = quartz ...' laid out in `columns` columns."""
    cells = [f"{a} = {n}" for a, n in zip(labels, names)]
    width = max(len(c) for c in cells) + 3
    rows = [cells[i:i + columns] for i in range(0, len(cells), columns)]
    return "\n".join("".join(c.ljust(width) for c in row).rstrip() for row in rows)


def plot_confusion(cm, classes, path, title: str = "Confusion matrix (% of each true class)") -> Path:
    """Row-normalised confusion matrix as a heat map with the % written in the cells (paper's Table 10).

    Zero cells are left blank so the confusions stand out; beyond 12 classes the labels are mineral
    symbols with a key underneath and the % are whole numbers. Row labels carry the image count.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = len(classes)
    pct = row_percent(cm)
    full = use_full_names(classes)
    labels = list(classes) if full else abbreviate(classes)
    support = cm.sum(axis=1)
    cell = 0.62 if n <= 12 else 0.42
    side = max(4.0, cell * n)
    fig_w, fig_h = side + 2.6, side + 1.9
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=130)
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    fs = 9 if n <= 12 else (7 if n <= 25 else 5.5)
    for i in range(n):
        for j in range(n):
            v = pct[i, j]
            if cm[i, j] == 0:
                continue
            text = f"{v:.1f}" if n <= 12 else f"{v:.0f}"
            if text in ("0", "0.0"):
                text = "<1" if n > 12 else "<.1"
            ax.text(j, i, text, ha="center", va="center", fontsize=fs,
                    color="white" if v > 55 else "black", fontweight="bold" if i == j else "normal")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45 if full else 90, ha="right" if full else "center", fontsize=fs + 1)
    ax.set_yticklabels([f"{lab} ({s})" for lab, s in zip(labels, support)], fontsize=fs + 1)
    ax.set_xlabel("predicted mineral")
    ax.set_ylabel("true mineral (images)")
    ax.set_title(title, fontsize=10)
    # thin grid between cells
    ax.set_xticks(np.arange(-0.5, n), minor=True)
    ax.set_yticks(np.arange(-0.5, n), minor=True)
    ax.grid(which="minor", color="0.85", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("% of true class")
    fig.tight_layout()
    if not full:  # the key sits right under the x-axis label; bbox_inches="tight" keeps it in the file
        ax.annotate(key_text(classes, labels, 4), xy=(0.5, 0), xycoords=("axes fraction", ax.xaxis.label),
                    xytext=(0, -10), textcoords="offset points", ha="center", va="top", multialignment="left",
                    family="monospace", fontsize=fs + 1, annotation_clip=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def write_eval_report(out_dir, targets, preds, probs, classes, extra: dict | None = None) -> dict:
    """Write metrics.json, per_class.csv and confusion.png into `out_dir` (created if needed).

    Args:
        out_dir: the folder the three files go into (training passes RUN/eval).
        targets, preds: (N,) true and predicted class indices.
        probs: (N, C) softmax probabilities, or None (then no Top3).
        classes: class names in index order.
        extra: more keys for metrics.json (e.g. data folder, run).
    Returns:
        the metrics dict written to metrics.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = np.asarray(targets).reshape(-1)
    preds = np.asarray(preds).reshape(-1)
    if len(targets) != len(preds):
        raise ValueError(f"{len(targets)} targets but {len(preds)} predictions")
    metrics = compute_metrics(targets, preds, probs, classes=list(classes))
    if extra:
        metrics.update(extra)
    atomic_write_json(out_dir / EVAL_METRICS_FILE, metrics)

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in metrics["per_class"]:
        writer.writerow({k: ("" if row[k] is None else (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k]))
                         for k in CSV_FIELDS})
    atomic_write_text(out_dir / EVAL_CLASSES_FILE, buf.getvalue())
    plot_confusion(np.asarray(metrics["confusion"]), list(classes), out_dir / EVAL_CONFUSION_FILE)
    return metrics
