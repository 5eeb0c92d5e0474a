"""The one prediction loop over a DataLoader of (images, labels) batches, for a PyTorch model or any backend.

Training's validation, `mineralnet eval`, calibration and explain all predict through `predict_loader`
(PyTorch) and read their numbers from `evaluate`, so a photo gets the same logits everywhere.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F


def _to_device(batch, device):
    return batch if device is None else batch.to(device, non_blocking=True)


@torch.no_grad()
def predict_loader(model_or_backend, loader, accelerator=None, *, embeddings: bool = False) -> dict:
    """Logits (and fused embeddings) of every image of `loader`, in loader order.

    Args:
        model_or_backend: a FusionNet (any nn.Module whose `model(x, return_features=True)` gives
            (logits, features)), or a backend (`run(x (N,3,S,S) float32) -> {output name: array}`,
            mineralnet.infer.backends) with a "logits" output (and "embedding" for `embeddings=True`).
        loader: batches (images (B, 3, S, S), labels (B,)).
        accelerator: for a model prepared with Accelerate: its autocast, and `gather_for_metrics` so
            every image is counted exactly once whatever the process count. Without one a PyTorch model
            runs in this process alone, without autocast, the batches moved to the model's device.
    Returns:
        {"logits" (N, C) float32, "labels" (N,) int64, "embeddings" (N, D) float32 with `embeddings=True`},
        numpy arrays on every process.
    """
    if not isinstance(model_or_backend, torch.nn.Module):
        return _predict_backend(model_or_backend, loader, embeddings)
    model = model_or_backend.eval()
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda t: t)
    device = None if accelerator is not None else next(model.parameters()).device
    logits_all, labels_all, feats_all = [], [], []
    for x, y in loader:
        x, y = _to_device(x, device), _to_device(y, device)
        with autocast():
            logits, feats = model(x, return_features=True)
        if embeddings:
            logits, y, feats = gather((logits.float().contiguous(), y, feats.float()))
            feats_all.append(feats.cpu())
        else:
            logits, y = gather((logits.float().contiguous(), y))
        logits_all.append(logits.cpu())
        labels_all.append(y.cpu())
    out = {"logits": (torch.cat(logits_all) if logits_all else torch.zeros(0, 1)).numpy(),
           "labels": (torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.long)).numpy()}
    if embeddings:
        out["embeddings"] = torch.cat(feats_all).numpy() if feats_all else None
    return out


def _predict_backend(backend, loader, embeddings: bool) -> dict:
    from mineralnet.errors import MineralNetError

    logits_all, labels_all, feats_all = [], [], []
    for x, y in loader:
        out = backend.run(np.ascontiguousarray(np.asarray(x), dtype=np.float32))
        missing = [k for k in ("logits", *(["embedding"] if embeddings else [])) if k not in out]
        if missing:
            raise MineralNetError(f"the {getattr(backend, 'kind', 'model')} model has only the outputs "
                                  f"{', '.join(out)}, not {', '.join(missing)}: re-export it with "
                                  f"--outputs logits,probs,embedding")
        logits_all.append(np.asarray(out["logits"], np.float32))
        labels_all.append(np.asarray(y, np.int64))
        if embeddings:
            feats_all.append(np.asarray(out["embedding"], np.float32))
    result = {"logits": np.concatenate(logits_all) if logits_all else np.zeros((0, 1), np.float32),
              "labels": np.concatenate(labels_all) if labels_all else np.zeros(0, np.int64)}
    if embeddings:
        result["embeddings"] = np.concatenate(feats_all) if feats_all else None
    return result


def evaluate(model, loader, accelerator=None, *, embeddings: bool = False) -> dict:
    """`predict_loader` and what evaluation reads from it: numpy `targets` (N,), `preds` (N,), `probs` (N, C)
    (softmax of the logits), `logits` (N, C), the mean cross-entropy `loss` and, with `embeddings=True`,
    the fused features `features` (N, D)."""
    raw = predict_loader(model, loader, accelerator, embeddings=embeddings)
    logits, targets = torch.from_numpy(raw["logits"]), torch.from_numpy(raw["labels"])
    probs = logits.softmax(dim=1)
    out = {"targets": raw["labels"], "preds": probs.argmax(1).numpy(), "probs": probs.numpy(), "logits": raw["logits"],
           "loss": float(F.cross_entropy(logits, targets).item()) if len(targets) else float("nan")}
    if embeddings:
        out["features"] = raw["embeddings"]
    return out


@torch.no_grad()
def predict_array(model, images: np.ndarray, *, batch: int = 32, device=None, autocast_dtype=None,
                  novelty=None) -> dict[str, np.ndarray]:
    """The same prediction for photos already preprocessed into one (N, 3, S, S) float32 array (the
    Predictor's PyTorch backend, the export gates' reference, int8's bf16 noise floor).

    Returns {"logits" (N, C), "embedding" (N, D)} as float32 numpy arrays, plus "novelty" (N,) when the run's
    detector `novelty(embedding, logits)` is given. `autocast_dtype` (e.g. torch.bfloat16) runs the model under
    autocast on its device type; without it the model runs in its own precision.
    """
    model = model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype is not None \
        else contextlib.nullcontext
    parts: dict[str, list] = {"logits": [], "embedding": [], **({"novelty": []} if novelty is not None else {})}
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch], dtype=np.float32)).to(device)
        with autocast():
            fused = model.embed(x)
            logits = model.forward_head(fused)
        parts["logits"].append(logits.float().cpu().numpy())
        parts["embedding"].append(fused.float().cpu().numpy())
        if novelty is not None:
            parts["novelty"].append(novelty(fused.float(), logits.float()).float().cpu().numpy())
    if not len(images):
        return {k: np.zeros((0,) if k == "novelty" else (0, 0), np.float32) for k in parts}
    return {k: np.concatenate(v) for k, v in parts.items()}
