"""Would a larger pretrained backbone help? A linear probe of frozen ImageNet features on a run's split.

    python studies/probe.py RUN/split.json --backbone tf_efficientnet_lite0:224 tf_efficientnet_lite2:260 \
        [--out studies/results/probe.json]

For each backbone (its installed offline weights, `mineralnet weights list`) at its image size, every photo of the
split goes once through the frozen network (the evaluation preprocessing, plus its mirror image); each stage's
output and the last conv's output are average pooled. A multinomial logistic regression is fitted on the
training photos (both views, standardised features, its C picked by 5-fold cross-validation on the training
photos alone, a photo and its mirror in the same fold) and scored on the validation photos (probabilities of the
two views averaged). Feature sets: the last conv (the ImageNet classifier's input), the last stage (F4), F2+F4
(the paper's fusion) and all stages.

Frozen features are a floor for fine-tuning, not its value; what the probe answers cheaply is whether one
backbone's ImageNet features separate the minerals better than another's before paying for fine-tuning it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mineralnet.bench.environment import environment
from mineralnet.data.decode import load_image
from mineralnet.data.splits import load_splits
from mineralnet.data.transforms import build_transforms
from mineralnet.weights import create_with_state_dict, normalisation, resolve_pretrained


def pooled_features(backbone: str, size: int, paths: list[str], batch: int = 32
                    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(N, D) pooled stage + last-conv features of the photos and of their mirror images, and the blocks' widths."""
    model = create_with_state_dict(backbone, resolve_pretrained("installed", backbone)).eval()
    mean, std = normalisation(backbone)
    t = build_transforms(size, mean, std, train=False)
    levels = len(model.feature_info)

    @torch.inference_mode()
    def run(x) -> list[torch.Tensor]:
        final, inter = model.forward_intermediates(x, indices=levels)
        return [f.mean((2, 3)) for f in inter] + [final.mean((2, 3))]

    plain, mirror = [], []
    for i in range(0, len(paths), batch):
        x = torch.stack([t(load_image(p, min_size=t.min_decode_size)) for p in paths[i:i + batch]])
        pooled = run(x)
        plain.append(torch.cat(pooled, 1).numpy())
        mirror.append(torch.cat(run(torch.flip(x, [3])), 1).numpy())
        print(f"  {backbone} {size}px: {min(i + batch, len(paths))}/{len(paths)} photos", file=sys.stderr, flush=True)
    widths = [f.shape[1] for f in pooled]
    return np.concatenate(plain), np.concatenate(mirror), widths


def probe(plain, mirror, widths, train, val, y_train, y_val, levels) -> dict:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    off = np.cumsum([0] + list(widths))
    cols = np.concatenate([np.arange(off[i], off[i + 1]) for i in levels])
    x_train = np.concatenate([plain[train][:, cols], mirror[train][:, cols]])
    scaler = StandardScaler().fit(x_train)
    # folds by photo: a photo and its mirror image on the same side, or the CV rewards memorising photos
    fold = np.tile(np.arange(len(train)) % 5, 2)
    folds = [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(5)]
    clf = LogisticRegressionCV(Cs=[0.001, 0.003, 0.01, 0.03, 0.1], cv=folds, max_iter=3000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(scaler.transform(x_train), np.concatenate([y_train, y_train]))
    p = (clf.predict_proba(scaler.transform(plain[val][:, cols]))
         + clf.predict_proba(scaler.transform(mirror[val][:, cols]))).argmax(1)
    per_class = [float(np.mean(p[y_val == c] == c)) for c in np.unique(y_val)]
    return {"top1": float(np.mean(p == y_val)), "mean_class_acc": float(np.mean(per_class)), "C": float(clf.C_[0]),
            "dims": int(len(cols))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split", type=Path, help="a run's split.json (train and val photos)")
    ap.add_argument("--backbone", nargs="+", default=["tf_efficientnet_lite0:224", "tf_efficientnet_lite2:260"],
                    help="NAME:IMAGE_SIZE of installed weights (default lite0:224 and lite2:260, their native sizes)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    split = load_splits(args.split)
    train_items, val_items = split["splits"]["train"], split["splits"]["val"]
    paths = [p for p, _ in train_items + val_items]
    labels = np.array([y for _, y in train_items + val_items])
    train, val = np.arange(len(train_items)), np.arange(len(train_items), len(paths))
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    print("| backbone | px | features | dims | Top1 | mean class acc. | C | feature seconds |\n|---|---|---|---|---|---|---|---|")
    for spec in args.backbone:
        name, _, size = spec.partition(":")
        t0 = time.perf_counter()
        plain, mirror, widths = pooled_features(name, int(size or 224), paths)
        seconds = time.perf_counter() - t0
        n = len(widths)
        sets = {"last conv": [n - 1], "F4": [n - 2], "F2+F4": [n - 4, n - 2], "all stages + last conv": list(range(n))}
        for label, levels in sets.items():
            r = probe(plain, mirror, widths, train, val, labels[train], labels[val], levels)
            r.update(backbone=name, image_size=int(size or 224), features=label, feature_seconds=round(seconds, 1))
            rows.append(r)
            print(f"| {name} | {r['image_size']} | {label} | {r['dims']} | {r['top1']:.1%} | {r['mean_class_acc']:.1%} "
                  f"| {r['C']:g} | {seconds:.0f} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"split": str(args.split.name), "train_photos": len(train),
                                        "val_photos": len(val), "environment": environment(), "rows": rows},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
