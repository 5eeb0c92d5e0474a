"""Class balance for long-tailed collections: the balanced sampler and logit-adjusted losses."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler

from mineralnet import data as mdata
from mineralnet.config import load_config
from mineralnet.errors import MineralNetError
from mineralnet.losses import LogitAdjustedLoss, WeightedTopKLoss, build_loss, weighted_topk_loss

LABELS = [0] * 100 + [1] * 25 + [2] * 9 + [3] * 1  # a long tail, imbalance ratio 100


def test_target_distribution_formulas():
    counts = [100, 25, 9, 1, 0]
    assert np.allclose(mdata.target_distribution(counts, "uniform"), [100 / 135, 25 / 135, 9 / 135, 1 / 135, 0])
    root = [10, 5, 3, 1, 0]
    assert np.allclose(mdata.target_distribution(counts, "sqrt"), [r / 19 for r in root])
    assert np.allclose(mdata.target_distribution(counts, "balanced"), [0.25, 0.25, 0.25, 0.25, 0])
    with pytest.raises(MineralNetError, match="sampling='random'"):
        mdata.target_distribution(counts, "random")


@pytest.mark.parametrize("sampling", ["sqrt", "balanced", "uniform"])
def test_sampler_class_frequencies_match_the_target_over_many_epochs(sampling):
    sampler = mdata.ClassBalancedSampler(LABELS, sampling, seed=3)
    labels = np.asarray(LABELS)
    seen, per_photo = np.zeros(4), np.zeros(len(LABELS))
    epochs = 300
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        idx = list(sampler)
        assert len(idx) == len(LABELS) == len(sampler)
        seen += np.bincount(labels[idx], minlength=4)
        per_photo += np.bincount(idx, minlength=len(LABELS))
    freq = seen / seen.sum()
    target = mdata.target_distribution([100, 25, 9, 1], sampling)
    n = epochs * len(LABELS)
    # 5 standard deviations of a binomial proportion: fails by chance about once in 3 million
    assert np.all(np.abs(freq - target) <= 5 * np.sqrt(target * (1 - target) / n) + 1e-12), (freq, target)
    # within a class every photo is equally likely: class 1's 25 photos each get 1/25 of its draws
    mine = per_photo[100:125]
    p = 1 / 25
    assert np.all(np.abs(mine / mine.sum() - p) <= 5 * np.sqrt(p * (1 - p) / mine.sum())), mine


def test_sampler_is_seeded_per_epoch():
    a, b = mdata.ClassBalancedSampler(LABELS, "balanced", 0), mdata.ClassBalancedSampler(LABELS, "balanced", 0)
    a.set_epoch(4), b.set_epoch(4)
    assert list(a) == list(b) == list(a)
    b.set_epoch(5)
    assert list(a) != list(b)
    assert list(a) != list(mdata.ClassBalancedSampler(LABELS, "balanced", 1))


@pytest.mark.parametrize("sampling", ["sqrt", "balanced"])
def test_sampler_gives_the_same_global_batches_in_one_and_two_processes(sampling):
    """Accelerate (split_batches=True, as training uses) hands each of R processes a slice of every global
    batch; the slices of 2 processes, put together, are the 1-process batches."""
    from accelerate.data_loader import BatchSamplerShard

    def shards(procs, epoch):
        out = []
        for rank in range(procs):
            s = mdata.ClassBalancedSampler(LABELS, sampling, seed=7)  # each process builds its own
            s.set_epoch(epoch)
            out.append(list(BatchSamplerShard(BatchSampler(s, 10, drop_last=True), procs, rank, split_batches=True)))
        return out

    for epoch in (0, 1, 9):
        (one,) = shards(1, epoch)
        r0, r1 = shards(2, epoch)
        assert len(one) == len(r0) == len(r1) == len(LABELS) // 10
        assert [a + b for a, b in zip(r0, r1)] == one
        assert all(len(a) == len(b) == 5 for a, b in zip(r0, r1))


def test_sampler_refuses_empty_labels():
    with pytest.raises(MineralNetError, match="no training photos"):
        mdata.ClassBalancedSampler([], "balanced", 0)


def reference_logit_adjusted_ce(logits, targets, prior, tau):
    """Menon et al. Eq. 10 written out: -log( pi_y^tau e^{f_y} / sum_c pi_c^tau e^{f_c} ), a Python loop."""
    out = []
    for z, y in zip(logits.tolist(), targets.tolist()):
        terms = [p ** tau * math.exp(v) for v, p in zip(z, prior)]
        out.append(-math.log(terms[y] / sum(terms)))
    return out


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjusted_cross_entropy_equals_its_formula(tau):
    g = torch.Generator().manual_seed(int(tau * 10))
    logits = torch.randn(12, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 4, (12,), generator=g)
    prior = [0.7, 0.2, 0.08, 0.02]
    loss = build_loss("ce", logit_adjust=tau, prior=[70, 20, 8, 2])  # normalised inside
    want = reference_logit_adjusted_ce(logits, targets, prior, tau)
    assert float(loss(logits, targets)) == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_logit_adjusted_weighted_topk_mines_on_the_adjusted_losses():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 3, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 3, (10,), generator=g)
    prior = [0.6, 0.3, 0.1]
    per = reference_logit_adjusted_ce(logits, targets, prior, 1.0)
    hard = sorted(per, reverse=True)[:5]
    easy = sorted(per, reverse=True)[5:]
    want = sum(hard) / 5 + 0.2 * sum(easy) / 5
    loss = build_loss("wtopk", k=0.5, alpha=0.2, scope="local", logit_adjust=1.0, prior=prior)
    assert isinstance(loss, LogitAdjustedLoss) and isinstance(loss.loss, WeightedTopKLoss)
    assert float(loss(logits, targets)) == pytest.approx(want, rel=1e-5)
    # tau = 0 is the plain loss
    assert float(build_loss("wtopk", scope="local", logit_adjust=0.0)(logits, targets)) == \
        pytest.approx(float(weighted_topk_loss(logits, targets)), rel=1e-9)


def test_logit_adjustment_with_a_uniform_prior_changes_nothing():
    logits, targets = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = build_loss("ce")(logits, targets)
    assert float(build_loss("ce", logit_adjust=1.0, prior=[1, 1, 1])(logits, targets)) == pytest.approx(float(plain))


def test_logit_adjustment_errors():
    with pytest.raises(MineralNetError, match="prior"):
        build_loss("ce", logit_adjust=1.0)
    with pytest.raises(MineralNetError, match="non-negative prior"):
        build_loss("ce", logit_adjust=1.0, prior=[0.5, -0.1])


def test_config_fields_are_validated():
    cfg = load_config(None, sampling="sqrt", logit_adjust="1.0")
    assert cfg.sampling == "sqrt" and cfg.logit_adjust == 1.0
    with pytest.raises(MineralNetError) as e:
        load_config(None, sampling="inverse", logit_adjust=-1)
    assert "--sampling 'inverse'" in str(e.value) and "--logit-adjust -1.0" in str(e.value)
