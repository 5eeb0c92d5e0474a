"""Class balance for long-tailed collections: which class mix the training batches get.

    target_distribution(counts, sampling)      -> class probabilities the sampler delivers
    ClassBalancedSampler(labels, sampling, seed) -> per-epoch indices drawn to that mix, the same in every process

sampling = "uniform": every photo once per epoch (class c in proportion to its count n_c);
"sqrt": class c drawn with probability proportional to sqrt(n_c) (a middle way, Mahajan et al. 2018);
"balanced": every class equally often (inverse-frequency sampling: rare photos repeat within an epoch).
An epoch has as many draws as there are training photos, so epochs and schedules stay comparable.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from mineralnet.errors import MineralNetError

SAMPLING = ("uniform", "sqrt", "balanced")


def class_counts(labels, num_classes: int) -> np.ndarray:
    """Photos per class, (num_classes,) int."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]


def target_distribution(counts, sampling: str) -> np.ndarray:
    """The class probabilities (sum 1) a training batch is drawn from; classes without photos get 0."""
    counts = np.asarray(counts, dtype=np.float64)
    if sampling not in SAMPLING:
        raise MineralNetError(f"sampling={sampling!r} is unknown; choose one of {', '.join(SAMPLING)}")
    if counts.sum() <= 0:
        raise MineralNetError("class balance needs at least one training photo")
    power = {"uniform": 1.0, "sqrt": 0.5, "balanced": 0.0}[sampling]
    weights = np.where(counts > 0, np.power(np.maximum(counts, 1.0), power), 0.0)
    return weights / weights.sum()


class ClassBalancedSampler(Sampler):
    """len(labels) indices per epoch, drawn with replacement so that the class mix follows
    `target_distribution(counts, sampling)`; photos within a class are equally likely.

    The draw depends only on (seed, epoch), as `EpochShuffleSampler`'s permutation does: every process
    computes the same list and Accelerate hands each its share of every global batch.
    """

    def __init__(self, labels, sampling: str, seed: int):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise MineralNetError("the balanced sampler got no training photos")
        counts = class_counts(labels, int(labels.max()) + 1)
        probs = target_distribution(counts, sampling)
        self.weights = torch.as_tensor(probs[labels] / counts[labels], dtype=torch.float64)  # (N,)
        self.n, self.seed, self.epoch, self.sampling = int(labels.size), int(seed), 0, sampling

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
