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
        if detector == "mahalanobis":
            whiten = torch.as_tensor(np.asarray(params["whiten"]), dtype=torch.float32)
            self.register_buffer("whiten", whiten)
            self.register_buffer("means_w", torch.as_tensor(np.asarray(params["means"]) @ np.asarray(params["whiten"]),
                                                            dtype=torch.float32))
        elif detector == "knn":
            bank = torch.as_tensor(np.asarray(params["bank"]), dtype=torch.float32)
            self.register_buffer("bank_t", bank.T.contiguous())  # (D, M)
            self.k = max(1, min(int(k), bank.shape[0]))

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
            z = fused @ self.whiten  # (B, D)
            diff = z[:, None, :] - self.means_w[None, :, :]  # (B, C, D): no cancellation in float32
            return (diff * diff).sum(dim=2).amin(dim=1)
        if self.detector == "knn":
            f = fused / fused.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sims = f @ self.bank_t  # (B, M)
            return 1.0 - torch.topk(sims, self.k, dim=1).values[:, -1]
        raise ValueError(f"unknown detector {self.detector!r}")
