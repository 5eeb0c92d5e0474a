"""The novelty detector as a small torch module, so exported graphs compute it in float32.

`NoveltyHead(fused, logits) -> (B,)` matches `mineralnet.calibration.core` (tests compare them).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class NoveltyHead(nn.Module):
    """(fused (B, D), logits (B, C)) -> novelty (B,), float32 whatever the network's precision."""

    def __init__(self, detector: str, temperature: float = 1.0, params: dict[str, np.ndarray] | None = None,
                 k: int = 10):
        super().__init__()
        self.detector = detector
        self.temperature = float(temperature)
        params = params or {}
        if detector in ("mahalanobis", "relmaha"):
            self._whitened("whiten", "means_w", params["means"], params["whiten"])
            if detector == "relmaha":
                self._whitened("bg_whiten", "bg_mean_w", params["bg_mean"], params["bg_whiten"])
        elif detector == "knn":
            bank = torch.as_tensor(np.asarray(params["bank"]), dtype=torch.float32)
            self.register_buffer("bank_t", bank.T.contiguous())  # (D, M)
            self.k = max(1, min(int(k), bank.shape[0]))

    def _whitened(self, whiten_name: str, means_name: str, means, whiten) -> None:
        whiten = np.asarray(whiten, np.float64)
        self.register_buffer(whiten_name, torch.as_tensor(whiten, dtype=torch.float32))
        self.register_buffer(means_name, torch.as_tensor(np.asarray(means, np.float64) @ whiten, dtype=torch.float32))

    @staticmethod
    def _distances(fused: torch.Tensor, whiten: torch.Tensor, means_w: torch.Tensor) -> torch.Tensor:
        """(B, C) squared distances to each mean in the whitened space."""
        z = fused @ whiten  # (B, D)
        diff = z[:, None, :] - means_w[None, :, :]  # (B, C, D): no cancellation in float32
        return (diff * diff).sum(dim=2)

    def forward(self, fused: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.detector == "msp":
            return 1.0 - torch.softmax(logits / self.temperature, dim=1).amax(dim=1)
        if self.detector == "energy":
            return -torch.logsumexp(logits, dim=1)
        if self.detector == "maxlogit":
            return -logits.amax(dim=1)
        fused = fused.float()
        if self.detector == "mahalanobis":
            return self._distances(fused, self.whiten, self.means_w).amin(dim=1)
        if self.detector == "relmaha":
            # min_c (d_c - d_0) = min_c d_c - d_0, subtracted before the min: ONNX Runtime's symbolic shape
            # inference (int8 pre-processing) loses the shape of a Sub that follows a ReduceMin
            return (self._distances(fused, self.whiten, self.means_w)
                    - self._distances(fused, self.bg_whiten, self.bg_mean_w)).amin(dim=1)
        if self.detector == "knn":
            f = fused / fused.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sims = f @ self.bank_t  # (B, M)
            return 1.0 - torch.topk(sims, self.k, dim=1).values[:, -1]
        raise ValueError(f"unknown detector {self.detector!r}")
