"""`mineralnet explain RUN --data DIR`: what a trained run looks at, and where it fails.

Writes RUN/explain/ (or --out):
  gradcam.png          Grad-CAM on the fused stages (the paper's Figure 3), beside the F4 term alone
  tsne.png, tsne.csv   t-SNE of the fused embed() vectors, N photos per class (Figure 5)
  misrecognised.png    gallery of misrecognised photos with true/predicted names and confidence (Figure 6)
  metrics.json, per_class.csv, confusion.png   the evaluation of DIR (as `mineralnet eval`)
  report.md            ties the numbers and the pictures together

Grad-CAM for a fused model: the predicted logit is differentiated with respect to every fused
stage map A_s (B, C_s, H_s, W_s) through the fusion head (each map held as a leaf, so F2's effect on
F4, which is computed from it, is counted once, in F4). Each stage's Grad-CAM map
sum_c mean(dlogit/dA_s) A_s is scaled by its number of positions H_s*W_s, so that its spatial mean
is exactly that stage's share of the logit (global-average pooling + linear head), upsampled to
the image and summed over stages; ReLU, then divided by the image's maximum. The "F4 term" is the same map from stage 4 alone (the
highest fused stage when 4 is not fused): how this model's deepest features alone would look.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mineralnet.data import PhotoDataset, scan_dataset
from mineralnet.data.hints import check_class_root
from mineralnet.errors import MineralNetError
from mineralnet.metrics import MEAN_CLASS_ACC_LABEL
from mineralnet.report import write_eval_report
from mineralnet.artifact import load_model
from mineralnet.files import atomic_write_text
from mineralnet.runs import read_split
from mineralnet.infer.predictor import eval_transform
from mineralnet.infer.loop import evaluate
from mineralnet.analysis.figures import display_image, plot_gallery, plot_gradcam_grid, plot_tsne, stage_label

EXPLAIN_DIR = "explain"


# ----------------------------------------------------------------------------- Grad-CAM
def grad_cam(model, x: torch.Tensor, target=None, stages=None) -> dict:
    """Grad-CAM of a FusionNet on its fused stage maps.

    Args:
        model: a FusionNet (forward_features / fuse / forward_head) in eval mode.
        x: (B, 3, H, W) normalised images.
        target: (B,) class indices to explain (default: the predicted class).
        stages: stage numbers to combine (default: every fused stage), e.g. (4,) for F4 alone.
    Returns:
        dict with `cam` (B, H, W) in 0..1 (ReLU, divided by each image's maximum), `raw` (B, H, W)
        the signed combined map before ReLU (its mean over pixels is about the explained logit minus
        the bias when all stages are used; exactly so before upsampling), `stage_maps` {stage: (B, H, W) signed upsampled map},
        `grids` {stage: (H_s, W_s)}, `contributions` {stage: (B,)} each stage's additive share of the
        logit (W_s . F_s), `logits` (B, C) and `target` (B,).
    """
    stages_all = list(model.stages)
    use = stages_all if stages is None else [int(s) for s in stages]
    missing = [s for s in use if s not in stages_all]
    if missing:
        raise MineralNetError(f"stage(s) {missing} are not fused by this model (it fuses {stages_all})")
    with torch.no_grad():
        feats = model.forward_features(x)  # [(B, C_s, H_s, W_s)]
    with torch.enable_grad():
        # Partial gradients through the fusion head, each stage map a leaf: F2's influence on F4
        # (F4 is computed from F2) is then counted once, in the F4 map, and the maps add up to the logit.
        maps = [f.detach().float().requires_grad_(True) for f in feats]
        logits = model.forward_head(model.fuse(maps))  # (B, C)
        target = logits.argmax(1) if target is None else torch.as_tensor(target, device=logits.device).long()
        score = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(score, maps)
    size = x.shape[-2:]
    stage_maps, grids, contrib = {}, {}, {}
    for s, A, G in zip(stages_all, maps, grads):
        grids[s] = tuple(A.shape[2:])
        weights = G.mean(dim=(2, 3), keepdim=True)                        # (B, C_s, 1, 1) Grad-CAM weights
        m = (weights * A).sum(1, keepdim=True) * (A.shape[2] * A.shape[3])  # (B, 1, H_s, W_s)
        contrib[s] = m.detach().mean(dim=(1, 2, 3))                        # (B,) stage s's share of the logit
        stage_maps[s] = F.interpolate(m.detach().float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    cam, raw = combine_stage_maps(stage_maps, use)
    return {"cam": cam, "raw": raw, "stage_maps": stage_maps, "grids": grids, "contributions": contrib,
            "logits": logits.detach(), "target": target.detach()}


def combine_stage_maps(stage_maps: dict, stages) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the signed stage maps of `stages` -> (cam in 0..1 after ReLU and per-image max, raw sum)."""
    raw = sum(stage_maps[s] for s in stages)  # (B, H, W)
    cam = raw.clamp(min=0)
    peak = cam.flatten(1).amax(1)[:, None, None]
    cam = torch.where(peak > 1e-12, cam / peak.clamp(min=1e-12), torch.zeros_like(cam))
    return cam, raw


def comparison_stage(model) -> int | None:
    """The stage shown alone beside the fused CAM: 4 (or the highest fused), when more than one is fused."""
    stages = list(model.stages)
    if len(stages) < 2:
        return None
    return 4 if 4 in stages else max(stages)


# ----------------------------------------------------------------------------- prediction
def predict_dataset(model, dataset, batch_size: int = 32, workers: int = 0) -> dict:
    """Logits, probabilities and fused embeddings (`features`) of every image of `dataset` (eval mode),
    through the same prediction loop as training and `eval`."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    return evaluate(model, loader, None, embeddings=True)


def sample_per_class(labels, per_class: int, seed: int = 0) -> list[int]:
    """Up to `per_class` indices of each class, seeded, in class order."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    out = []
    for label in sorted(by_class):
        ix = by_class[label]
        out += sorted(rng.sample(ix, min(per_class, len(ix))))
    return out


def pick_cam_images(targets, preds, max_images: int, seed: int = 0) -> list[int]:
    """For each class one correctly and one wrongly recognised photo (when it has one), seeded;
    correct ones first so every class is shown before the failures, at most `max_images`."""
    rng = random.Random(seed)
    correct, wrong = [], []
    for c in sorted(set(int(t) for t in targets)):
        ok = [i for i, (t, p) in enumerate(zip(targets, preds)) if t == c and p == c]
        bad = [i for i, (t, p) in enumerate(zip(targets, preds)) if t == c and p != c]
        if ok:
            correct.append(rng.choice(ok))
        if bad:
            wrong.append(rng.choice(bad))
    chosen = (correct + wrong)[:max_images]
    return sorted(chosen, key=lambda i: (int(targets[i]), int(preds[i]) != int(targets[i])))


# ----------------------------------------------------------------------------- t-SNE
def tsne_2d(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """2-D t-SNE (scikit-learn, PCA init) of (N, D) vectors -> ((N, 2), perplexity used)."""
    from sklearn.manifold import TSNE

    n = len(vectors)
    if n < 4:
        raise MineralNetError(f"t-SNE needs at least 4 photos, got {n}; raise --per-class or add photos")
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
              learning_rate="auto").fit_transform(np.asarray(vectors, dtype=np.float64))
    return xy, perplexity


# ----------------------------------------------------------------------------- the command
def _val_only_samples(run: Path, index) -> list:
    val = {os.path.abspath(p) for p, _ in read_split(run)["splits"]["val"]}
    chosen = [s for s in index.samples if os.path.abspath(s[0]) in val]
    if not chosen:
        raise MineralNetError(f"none of the validation photos of {str(run)!r} is under --data "
                              f"{index.root!r}; pass the folder the run was trained on")
    return chosen


def _train_overlap(run: Path, samples) -> int:
    """How many of `samples` the run trained on (0 when the run has no split file)."""
    try:
        train = {os.path.abspath(p) for p, _ in read_split(run)["splits"]["train"]}
    except MineralNetError:
        return 0
    return sum(os.path.abspath(p) in train for p, _ in samples)


def _gradcam_figure(out: Path, model, dataset, cam_idx, classes, targets, preds, conf, mean, std) -> dict:
    """gradcam.png for the photos `cam_idx`; returns each term's mean share of the predicted logit."""
    if not cam_idx:
        return {}
    single = comparison_stage(model)
    x = torch.stack([dataset[i][0] for i in cam_idx])
    out_cam = grad_cam(model, x)
    contrib = out_cam["contributions"]
    total = sum(contrib.values())  # (N,) logit minus bias
    share = {s: torch.where(total > 0, contrib[s] / total.clamp(min=1e-12), torch.full_like(total, float("nan")))
             for s in contrib}
    panels = [(f"Grad-CAM {stage_label(model.stages)}", out_cam["cam"].numpy(), None, None)]
    shares_mean = {}
    if single:  # the deepest term alone, and the lower stages that fusion adds
        low = [s for s in model.stages if s != single]
        for part in ([single], low):
            cam_part, _ = combine_stage_maps(out_cam["stage_maps"], part)
            grid = out_cam["grids"][part[0]] if len(part) == 1 else None
            panels.append((f"{stage_label(part)} term alone", cam_part.numpy(), grid,
                           sum(share[s] for s in part).numpy()))
        shares_mean = {stage_label(part): float(np.nanmean(sum(share[s] for s in part).numpy()))
                       for part in ([single], low)}
    plot_gradcam_grid(out / "gradcam.png", [display_image(xi, mean, std) for xi in x], panels, classes,
                      targets[cam_idx], preds[cam_idx], conf[cam_idx])
    return shares_mean


def _tsne_figure(out: Path, model, pred: dict, tsne_idx, samples, classes, conf, per_class: int, seed: int):
    """tsne.png + tsne.csv of the fused vectors of `tsne_idx`; returns a note when skipped, else None."""
    if len(tsne_idx) < 4:
        return f"t-SNE skipped: only {len(tsne_idx)} photos (needs 4)"
    targets, preds = pred["targets"], pred["preds"]
    xy, perplexity = tsne_2d(pred["features"][tsne_idx], seed)
    plot_tsne(out / "tsne.png", xy, targets[tsne_idx], preds[tsne_idx], classes,
              f"t-SNE of the fused {'+'.join(f'F{s}' for s in model.stages)} vectors ({model.feature_dim}-d), "
              f"{len(tsne_idx)} photos, up to {per_class} per class")
    lines = ["path,true,predicted,confidence,x,y"]
    for k, i in enumerate(tsne_idx):
        lines.append(f"\"{samples[i][0]}\",{classes[targets[i]]},{classes[preds[i]]},{conf[i]:.4f},"
                     f"{xy[k, 0]:.4f},{xy[k, 1]:.4f}")
    atomic_write_text(out / "tsne.csv", "\n".join(lines) + "\n")
    return None


def explain(run, data, *, out=None, per_class: int = 10, cams: int = 16, gallery: int = 24,
            batch_size: int = 32, workers: int = 0, val_only: bool = False, seed: int = 0) -> dict:
    """Produce the explain/ folder of a run for the labelled photos in `data`. Returns a summary dict."""

    for flag, v, low in (("--per-class", per_class, 1), ("--cams", cams, 0), ("--gallery", gallery, 0),
                         ("--batch-size", batch_size, 1), ("--workers", workers, 0)):
        if v < low:
            raise MineralNetError(f"{flag} {v} must be at least {low}")
    run = Path(run)
    model, meta = load_model(run)
    model.eval()
    classes = list(meta["classes"])
    if data is None:
        if not val_only:
            raise MineralNetError("say which photos to explain: --data DIR (labelled photos) or --val-only "
                                  "(the run's own held-out photos, from its split.json)")
        split = read_split(run)
        data, samples = split["root"], list(split["splits"]["val"])
    else:
        check_class_root(data, classes)
        index = scan_dataset(data, verify=True, classes=classes)
        samples = _val_only_samples(run, index) if val_only else list(index.samples)
    if not samples:
        raise MineralNetError(f"no readable photos under {str(data)!r}")
    out = Path(out) if out else run / EXPLAIN_DIR
    out.mkdir(parents=True, exist_ok=True)
    mean, std = meta["mean"], meta["std"]
    transform = eval_transform(meta)
    dataset = PhotoDataset(samples, transform)
    print(f"explaining {run} on {len(samples)} photos of {data}{' (its validation split)' if val_only else ''}",
          flush=True)
    overlap = _train_overlap(run, samples)
    if overlap:
        print(f"warning: {overlap} of the {len(samples)} photos ({overlap / len(samples):.0%}) are training photos "
              f"of this run; the results overstate accuracy on new photos (--val-only explains the held-out ones)")

    pred = predict_dataset(model, dataset, batch_size, workers)
    targets, preds, probs = pred["targets"], pred["preds"], pred["probs"]
    metrics = write_eval_report(out, targets, preds, probs, classes, extra={"run": str(run), "data": str(data)})
    conf = probs[np.arange(len(preds)), preds]

    cam_idx = pick_cam_images(targets, preds, cams, seed) if cams else []
    single = comparison_stage(model)
    shares_mean = _gradcam_figure(out, model, dataset, cam_idx, classes, targets, preds, conf, mean, std)

    tsne_idx = sample_per_class(targets, per_class, seed)
    tsne_note = _tsne_figure(out, model, pred, tsne_idx, samples, classes, conf, per_class, seed)

    # silhouette of the full-dimensional embeddings by true class: how well the classes separate
    silhouette = None
    if len(set(targets.tolist())) >= 2 and len(targets) > len(set(targets.tolist())):
        from sklearn.metrics import silhouette_score
        silhouette = float(silhouette_score(pred["features"], targets, metric="cosine"))

    # gallery of misrecognised photos, most confident mistakes first
    wrong = np.flatnonzero(targets != preds)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")]
    items = [(samples[i][0], int(targets[i]), int(preds[i]), float(conf[i]), float(probs[i, targets[i]]))
             for i in wrong[:gallery]]
    if gallery:
        plot_gallery(out / "misrecognised.png", items, classes)

    summary = {"run": str(run), "data": str(data), "images": len(samples), "val_only": val_only,
               "misrecognised": int(len(wrong)), "train_overlap": overlap,
               "tsne_images": len(tsne_idx), "cam_images": len(cam_idx), "silhouette_cosine": silhouette,
               "comparison_stage": single, "stage_shares": shares_mean, "metrics": {k: metrics[k] for k in ("top1", "mean_class_acc", "top3")}}
    atomic_write_text(out / "report.md", report_markdown(meta, metrics, summary, items, tsne_note,
                                                        per_class, bool(cam_idx), bool(gallery)))
    print(f"Top1 {100 * metrics['top1']:.2f}%   {MEAN_CLASS_ACC_LABEL} {100 * metrics['mean_class_acc']:.2f}%   "
          f"{len(wrong)} misrecognised of {len(samples)}")
    print(f"wrote {out}/report.md with gradcam.png, tsne.png, misrecognised.png, confusion.png")
    return summary


def _confused_pairs(metrics: dict, top: int = 5) -> list[tuple[str, str, int, float]]:
    cm = np.asarray(metrics["confusion"])
    pct = np.asarray(metrics["confusion_percent"])
    pairs = [(cm[i, j], pct[i, j], i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j]]
    pairs.sort(key=lambda t: (-t[0], -t[1]))
    names = metrics["classes"]
    return [(names[i], names[j], int(n), float(p)) for n, p, i, j in pairs[:top]]


def report_markdown(meta, metrics, summary, items, tsne_note, per_class, has_cam, has_gallery) -> str:

    stages = meta["stages"]
    fused = "+".join(f"F{s}" for s in stages)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    L = [f"# What `{Path(summary['run']).name}` recognises, and where it fails", "",
         f"Model: {meta['backbone']}, fused stages {fused} ({meta.get('feature_dim', '?')}-d vector), "
         f"{len(meta['classes'])} classes, {meta['image_size']} px centre crop. Photos: `{summary['data']}`"
         f"{' (the run’s validation split only)' if summary['val_only'] else ''}, {summary['images']} images.", ""]
    if summary["train_overlap"]:
        L += [f"**Caution:** {summary['train_overlap']} of these photos were used to TRAIN this run "
              f"(its split.json), so the numbers below are optimistic. Use `--val-only` to explain only the "
              f"photos it was validated on.", ""]
    L += ["## Accuracy", "",
          f"Top1 **{pct(metrics['top1'])}%**, {MEAN_CLASS_ACC_LABEL} **{pct(metrics['mean_class_acc'])}%**, "
          f"Top3 {pct(metrics['top3'])}%. The paper's \"mAP\" is the mean of the per-class accuracies "
          f"(balanced accuracy), not detection mAP.", "",
          "| Mineral | Photos | Accuracy % | Precision % | Recall % | F1 % |", "|---|---|---|---|---|---|"]
    for r in metrics["per_class"]:
        L.append(f"| {r['class']} | {r['support']} | {pct(r['accuracy'])} | {pct(r['precision'])} | "
                 f"{pct(r['recall'])} | {pct(r['f1'])} |")
    pairs = _confused_pairs(metrics)
    L += ["", "![confusion matrix](confusion.png)", "",
          "Confusion matrix: each row is a true mineral, the cells give the % of its photos predicted as each "
          "column (the paper's Table 10).", ""]
    if pairs:
        L += ["Most frequent confusions:", ""]
        L += [f"- {a} taken for {b}: {n} photo(s), {p:.1f}% of {a}" for a, b, n, p in pairs]
        L.append("")
    if has_cam:
        single = summary["comparison_stage"]
        low = "+".join(f"F{s}" for s in stages if s != single)
        L += ["## Where the model looks (Grad-CAM)", "", "![Grad-CAM](gradcam.png)", "",
              f"For each photo: the crop the model sees and the Grad-CAM of the predicted mineral on the fused "
              f"stages ({fused})" + (f", then the F{single} term and the {low} term alone" if single else "") +
              ". Red marks the regions that raise the predicted mineral's score most; each map is scaled to "
              "its own maximum. One correctly and one wrongly recognised photo per mineral where available "
              "(red titles are mistakes).", "",
              "How it is computed: the score of the predicted mineral is differentiated with respect to each "
              "fused stage map; each stage's map is scaled so that it averages to that stage's additive share "
              "of the score (global-average pooling + one linear layer make the shares exact), and the fused "
              "map is their sum. Lower stages are finer (stride 8 for F2) and respond to texture, lustre and "
              "edges; F4 (stride 32) to whole crystals and aggregates.", ""]
        if summary.get("stage_shares"):
            parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in summary["stage_shares"].items())
            L += [f"Average share of the predicted mineral's score on these photos: {parts}. Shares add up to 100% "
                  f"per photo; one above 100% means the other term argues against the mineral. A small share for "
                  f"{low} means fusion changes little of what this model attends to.", "",
                  f"The F{single} column is this model's deepest term, not a separately trained F{single}-only "
                  f"model; for the paper's Figure 3 comparison, run `mineralnet explain` on such a run too "
                  f"(e.g. the stages=4 variant of `mineralnet cv`).", ""]
    L += ["## How the photos group (t-SNE)", ""]
    if tsne_note:
        L += [tsne_note, ""]
    else:
        sil = summary["silhouette_cosine"]
        L += ["![t-SNE](tsne.png)", "",
              f"t-SNE of the fused vectors of {summary['tsne_images']} photos (up to {per_class} per mineral, "
              f"chosen at random; the paper used 5). Each colour is a true mineral; red rings are misrecognised "
              f"photos, labelled with the symbol of the predicted mineral. Tight, separate clusters mean the "
              f"features tell the minerals apart; t-SNE distances between clusters are not meaningful."
              + (f" Silhouette score of the full {meta.get('feature_dim', '')}-d vectors of all "
                 f"{summary['images']} photos by true mineral (cosine): {sil:.3f} (1 = perfectly separated, "
                 f"0 = overlapping; compare runs with it)." if sil is not None else ""), ""]
    if has_gallery:
        L += ["## Misrecognised photos", "", "![misrecognised](misrecognised.png)", "",
              f"{summary['misrecognised']} of {summary['images']} photos are misrecognised; the "
              f"{len(items)} shown are the most confident mistakes (the % after the true name is the "
              f"probability the model gave the right mineral).", ""]
        if items:
            L += ["| Photo | True | Predicted | Confidence % |", "|---|---|---|---|"]
            names = meta["classes"]
            L += [f"| {Path(p).name} | {names[t]} | {names[pr]} | {100 * c:.0f} |" for p, t, pr, c, _ in items]
            L.append("")
    L += ["Files: metrics.json and per_class.csv hold the numbers above; tsne.csv the t-SNE coordinates."]
    return "\n".join(L) + "\n"
