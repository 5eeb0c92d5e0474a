import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mineralnet.errors import MineralNetError
from mineralnet.losses import (CenterLoss, CrossEntropyLoss, TopKLoss, WeightedTopKLoss, build_loss,
                               topk_loss, weighted_topk_loss)


def reference_wtopk(logits, targets, k, alpha):
    """Eq. 5 written independently: a Python loop over per-sample losses, picking maxima one by one."""
    per = []
    for i in range(logits.shape[0]):
        z = [float(v) for v in logits[i]]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        per.append(lse - z[int(targets[i])])
    n = len(per)
    n_hard = max(1, round(k * n))
    remaining = list(per)
    hard = []
    for _ in range(n_hard):
        j = max(range(len(remaining)), key=lambda t: remaining[t])
        hard.append(remaining.pop(j))
    easy = remaining
    return sum(hard) / len(hard) + (alpha * sum(easy) / len(easy) if easy else 0.0)


CASES = list(itertools.product([1, 2, 3, 7, 10, 50], [0.1, 0.33, 0.5, 0.9, 1.0], [0.0, 0.2, 1.0]))


@pytest.mark.parametrize("n,k,alpha", CASES)
def test_weighted_topk_matches_reference(n, k, alpha):
    g = torch.Generator().manual_seed(n * 100 + int(k * 10))
    logits = torch.randn(n, 5, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 5, (n,), generator=g)
    got = weighted_topk_loss(logits, targets, k=k, alpha=alpha)
    assert got.item() == pytest.approx(reference_wtopk(logits, targets, k, alpha), rel=1e-9, abs=1e-9)


def test_k1_is_cross_entropy_and_alpha_extremes():
    logits, targets = torch.randn(13, 4), torch.randint(0, 4, (13,))
    ce = F.cross_entropy(logits, targets)
    torch.testing.assert_close(weighted_topk_loss(logits, targets, k=1.0, alpha=0.3), ce)
    # alpha=1 weighs every sample equally within its set (the paper calls it the softmax loss; with
    # k=0.5 it is exactly 2 x CE): mean(hard) + mean(easy).
    even = torch.randn(12, 4), torch.randint(0, 4, (12,))
    torch.testing.assert_close(weighted_topk_loss(*even, k=0.5, alpha=1.0), 2 * F.cross_entropy(*even))
    n_hard = round(0.4 * 13)
    per = F.cross_entropy(logits, targets, reduction="none").sort(descending=True).values
    torch.testing.assert_close(weighted_topk_loss(logits, targets, k=0.4, alpha=1.0),
                               per[:n_hard].mean() + per[n_hard:].mean())
    torch.testing.assert_close(weighted_topk_loss(logits, targets, k=0.5, alpha=0.0),
                               topk_loss(logits, targets, k=0.5))


def test_gradient_weights_per_sample():
    """d loss / d L_i = 1/(kN) for hard samples and alpha/((1-k)N) for easy ones."""
    n, k, alpha = 20, 0.25, 0.2
    per = torch.rand(n, dtype=torch.float64) + torch.arange(n) * 1e-3  # distinct
    per.requires_grad_(True)
    from mineralnet.losses import weighted_topk_from_losses
    weighted_topk_from_losses(per, k, alpha).backward()
    order = per.detach().argsort(descending=True)
    hard, easy = order[: int(k * n)], order[int(k * n):]
    torch.testing.assert_close(per.grad[hard], torch.full((5,), 1 / (k * n), dtype=torch.float64))
    torch.testing.assert_close(per.grad[easy], torch.full((15,), alpha / ((1 - k) * n), dtype=torch.float64))


def test_ties_and_single_sample():
    logits = torch.zeros(6, 3)  # every sample has the same loss log(3)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    assert weighted_topk_loss(logits, targets, 0.5, 0.2).item() == pytest.approx(1.2 * math.log(3), rel=1e-6)
    one = torch.randn(1, 4)
    t = torch.tensor([2])
    assert weighted_topk_loss(one, t, 0.1, 0.5).item() == pytest.approx(F.cross_entropy(one, t).item(), rel=1e-6)


def test_modules_and_factory():
    logits, targets = torch.randn(8, 3), torch.randint(0, 3, (8,))
    torch.testing.assert_close(WeightedTopKLoss(0.5, 0.2, "local")(logits, targets),
                               weighted_topk_loss(logits, targets, 0.5, 0.2))
    torch.testing.assert_close(TopKLoss(0.5, "local")(logits, targets), topk_loss(logits, targets, 0.5))
    torch.testing.assert_close(CrossEntropyLoss()(logits, targets), F.cross_entropy(logits, targets))
    assert isinstance(build_loss("wtopk", k=0.5, alpha=0.2), WeightedTopKLoss)
    # global scope without torch.distributed is the local loss
    torch.testing.assert_close(WeightedTopKLoss(0.5, 0.2, "global")(logits, targets),
                               weighted_topk_loss(logits, targets, 0.5, 0.2))


def test_center_loss_formula_and_learnable_centres():
    torch.manual_seed(0)
    loss = CenterLoss(num_classes=3, feature_dim=4, weight=0.5)
    feats, logits = torch.randn(6, 4), torch.randn(6, 3)
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    c = loss.centers.detach()
    expected = F.cross_entropy(logits, targets) + 0.5 * sum(
        0.5 * ((feats[i] - c[targets[i]]) ** 2).sum() for i in range(6)) / 6
    out = loss(logits, targets, feats)
    torch.testing.assert_close(out, expected)
    out.backward()
    assert loss.centers.grad is not None and loss.centers.grad.abs().sum() > 0
    with pytest.raises(MineralNetError):
        loss(logits, targets)


@pytest.mark.parametrize("k,alpha", [(0, 0.2), (1.5, 0.2), (-0.1, 0.2), (0.5, -0.01), (0.5, 1.2)])
def test_out_of_range_k_alpha_is_clear_error(k, alpha):
    with pytest.raises(MineralNetError, match="out of range"):
        WeightedTopKLoss(k, alpha)
    with pytest.raises(MineralNetError, match="out of range"):
        weighted_topk_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), k, alpha)


def _global_loss_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    logits_all, targets_all = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    got = {}
    for equal in (False, True):
        logits = logits_all[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        loss = weighted_topk_loss(logits, targets_all[rank * 4:(rank + 1) * 4], 0.25, 0.1, scope="global",
                                  equal_sizes=equal)
        loss.backward()
        got[equal] = (loss.detach(), logits.grad)
    torch.save({"value": [got[False][0], got[True][0]], "grad": [got[False][1], got[True][1]]},
               f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_global_scope_without_the_size_exchange_gives_the_same_loss_and_gradient(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_global_loss_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    one = logits.clone().requires_grad_(True)
    ref = weighted_topk_loss(one, targets, 0.25, 0.1)  # one process on the whole batch
    ref.backward()
    for rank in range(2):
        r = torch.load(str(tmp_path / f"{rank}.pt"), weights_only=True)
        for v in r["value"]:
            torch.testing.assert_close(v, ref.detach())
        torch.testing.assert_close(r["grad"][0], r["grad"][1])
        # DDP averages the two ranks' gradients: each rank's slice times 1/2 is the one-process gradient
        torch.testing.assert_close(r["grad"][1] / 2, one.grad[rank * 4:(rank + 1) * 4])
