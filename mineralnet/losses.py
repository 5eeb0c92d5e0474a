"""Cross-entropy, top-k and weighted top-k losses (Jia et al. 2021, Eq. 3-5), and center loss.

Weighted top-k (Eq. 5): with per-sample cross-entropy losses L_1..L_N sorted in descending order,
the hard set is the n_hard = max(1, round(k*N)) largest, the rest are easy, and

    loss = mean(hard) + alpha * mean(easy)          (easy term 0 when there are no easy samples)

so each hard sample's gradient weight is 1/n_hard (= 1/(kN) when kN is whole) and each easy
sample's alpha/(N - n_hard). alpha=0 is the top-k loss; k=1 or alpha=1 is plain cross-entropy.
`round` is Python's round (half to even), as in the contract of DESIGN.md.

Under DDP, scope="global" selects the hard samples over the whole global batch (per-sample losses
gathered from every process), so R processes compute exactly the loss and gradient of one process
on the concatenated batch; scope="local" mines within each process's share only.

Logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, Eq. 10): the
training loss sees logits + tau * log(prior), prior = the class mix of the training batches; prediction
uses the plain logits. A frequent class must then win by a margin, a rare one less so, which moves the
decision boundaries towards the balanced error. Any loss here can be wrapped (`LogitAdjustedLoss`).
With the weighted top-k loss, the hard samples are ranked by their adjusted losses: a rare-class photo
counts as harder than a frequent-class photo with the same plain loss, so mining favours the tail.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mineralnet.errors import MineralNetError

LOSSES = ("ce", "topk", "wtopk", "center")


def check_k_alpha(k: float, alpha: float) -> None:
    if not (isinstance(k, (int, float)) and 0.0 < float(k) <= 1.0):
        raise MineralNetError(f"k={k!r} is out of range: the hard fraction k must be in (0, 1] "
                              f"(the paper's best is 0.5)")
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise MineralNetError(f"alpha={alpha!r} is out of range: the easy-sample weight alpha must be "
                              f"in [0, 1] (the paper's best is 0.2)")


def num_hard(n: int, k: float) -> int:
    return max(1, round(k * n))


def weighted_topk_from_losses(losses: torch.Tensor, k: float = 0.5, alpha: float = 0.2) -> torch.Tensor:
    """Eq. 5 on a vector of per-sample losses (N,) -> scalar."""
    check_k_alpha(k, alpha)
    n = losses.numel()
    if n == 0:
        raise MineralNetError("weighted top-k loss got an empty batch")
    n_hard = num_hard(n, k)
    ordered, _ = torch.sort(losses.reshape(-1), descending=True)
    loss = ordered[:n_hard].mean()
    if n_hard < n and alpha > 0:
        loss = loss + alpha * ordered[n_hard:].mean()
    return loss


def _gather_with_local_grad(local: torch.Tensor, equal_sizes: bool = False) -> torch.Tensor:
    """All processes' per-sample losses, concatenated in rank order; only this rank's slice
    carries gradient (the others are detached copies). Handles unequal batch sizes unless `equal_sizes`
    promises every process has as many as this one: then no size exchange and no host sync."""
    world = dist.get_world_size()
    rank = dist.get_rank()
    if equal_sizes:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[rank] = local
        return torch.cat(parts)
    n = torch.tensor([local.numel()], device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:s] for p, s in zip(parts, sizes)]
    parts[rank] = local
    return torch.cat(parts)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Autocast hands us bf16/fp16 logits; the log-softmax and the ranking need fp32.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def weighted_topk_loss(logits: torch.Tensor, targets: torch.Tensor, k: float = 0.5, alpha: float = 0.2,
                       scope: str = "local", equal_sizes: bool = False) -> torch.Tensor:
    """Weighted top-k cross-entropy (Eq. 5) of logits (B, C) and integer targets (B,).

    equal_sizes: every process's batch has B samples (training's split global batches): the global scope
    then gathers without first exchanging the sizes, which would read them back to the host every step.

    scope="global" under torch.distributed: the value is the loss of the concatenated global batch,
    and its gradient is scaled so that DDP's gradient averaging over R processes yields exactly
    the single-process gradient of that global loss.
    """
    losses = F.cross_entropy(_at_least_fp32(logits), targets, reduction="none")  # (B,)
    if scope == "local" or not _is_distributed():
        if scope not in ("local", "global"):
            raise MineralNetError(f"scope={scope!r} must be 'local' or 'global'")
        return weighted_topk_from_losses(losses, k, alpha)
    if scope != "global":
        raise MineralNetError(f"scope={scope!r} must be 'local' or 'global'")
    loss = weighted_topk_from_losses(_gather_with_local_grad(losses, equal_sizes), k, alpha)
    # Each rank only back-propagates into its own samples; DDP then divides the summed
    # gradient by R. Scaling the gradient (not the value) by R makes the two cancel.
    r = dist.get_world_size()
    return loss + (r - 1) * (loss - loss.detach())


def topk_loss(logits, targets, k: float = 0.5, scope: str = "local") -> torch.Tensor:
    """Top-k loss (Eq. 4): the mean cross-entropy of the hardest k*N samples (alpha = 0)."""
    return weighted_topk_loss(logits, targets, k=k, alpha=0.0, scope=scope)


def cross_entropy_loss(logits, targets, label_smoothing: float = 0.0) -> torch.Tensor:
    """Plain softmax cross-entropy (Eq. 3), averaged over the batch."""
    return F.cross_entropy(_at_least_fp32(logits), targets, label_smoothing=label_smoothing)


class CrossEntropyLoss(nn.Module):

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets, features=None):
        return cross_entropy_loss(logits, targets, self.label_smoothing)


class WeightedTopKLoss(nn.Module):
    """Weighted top-k loss; `scope` is "global" (mine over all processes) or "local"."""

    def __init__(self, k: float = 0.5, alpha: float = 0.2, scope: str = "global", equal_sizes: bool = False):
        super().__init__()
        check_k_alpha(k, alpha)
        if scope not in ("local", "global"):
            raise MineralNetError(f"scope={scope!r} must be 'local' or 'global'")
        self.k, self.alpha, self.scope, self.equal_sizes = float(k), float(alpha), scope, equal_sizes

    def forward(self, logits, targets, features=None):
        return weighted_topk_loss(logits, targets, self.k, self.alpha, self.scope, self.equal_sizes)

    def extra_repr(self) -> str:
        return f"k={self.k}, alpha={self.alpha}, scope={self.scope!r}"


class TopKLoss(WeightedTopKLoss):
    def __init__(self, k: float = 0.5, scope: str = "global", equal_sizes: bool = False):
        super().__init__(k=k, alpha=0.0, scope=scope, equal_sizes=equal_sizes)


class CenterLoss(nn.Module):
    """Softmax cross-entropy + lambda * center loss (Wen et al., ECCV 2016), the paper's Table 8 baseline.

    center term = 1/(2B) * sum_i ||f_i - c_{y_i}||^2 with learnable class centres c (C, D), trained
    by the same optimiser as the network (so pass this module's parameters to it).
    """

    def __init__(self, num_classes: int, feature_dim: int, weight: float = 0.01, label_smoothing: float = 0.0):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feature_dim) * 0.01)
        self.weight = float(weight)
        self.label_smoothing = label_smoothing

    def center_term(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        diff = features.float() - self.centers[targets]  # (B, D)
        return 0.5 * diff.pow(2).sum(dim=1).mean()

    def forward(self, logits, targets, features=None):
        if features is None:
            raise MineralNetError("center loss needs the fused features: call the model with "
                                  "return_features=True")
        return cross_entropy_loss(logits, targets, self.label_smoothing) + self.weight * self.center_term(features, targets)


def logit_adjust(logits: torch.Tensor, prior, tau: float) -> torch.Tensor:
    """logits (B, C) + tau * log(prior) (C,); a class of prior 0 is treated as prior 1e-12."""
    log_prior = torch.log(torch.as_tensor(prior, dtype=torch.float32, device=logits.device).clamp_min(1e-12))
    return _at_least_fp32(logits) + tau * log_prior


class LogitAdjustedLoss(nn.Module):
    """`loss` computed on logit-adjusted logits (training only; the model's logits are left as they are)."""

    def __init__(self, loss: nn.Module, prior, tau: float = 1.0):
        super().__init__()
        prior = torch.as_tensor(prior, dtype=torch.float32)
        if prior.ndim != 1 or not torch.isfinite(prior).all() or (prior < 0).any() or prior.sum() <= 0:
            raise MineralNetError(f"logit adjustment needs one non-negative prior per class, got {prior.tolist()}")
        self.loss, self.tau = loss, float(tau)
        self.register_buffer("prior", prior / prior.sum(), persistent=False)

    def forward(self, logits, targets, features=None):
        return self.loss(logit_adjust(logits, self.prior, self.tau), targets, features)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


def build_loss(name: str, *, k: float = 0.5, alpha: float = 0.2, scope: str = "global",
               num_classes: int | None = None, feature_dim: int | None = None,
               center_weight: float = 0.01, label_smoothing: float = 0.0, equal_sizes: bool = False,
               logit_adjust: float = 0.0, prior=None) -> nn.Module:
    """The loss module for a config's `loss` field: ce, topk, wtopk or center (`equal_sizes`: see
    weighted_topk_loss); with `logit_adjust` (tau) > 0, wrapped in `LogitAdjustedLoss` with the class `prior`
    of the training batches."""
    loss = _build_plain_loss(name, k=k, alpha=alpha, scope=scope, num_classes=num_classes, feature_dim=feature_dim,
                             center_weight=center_weight, label_smoothing=label_smoothing, equal_sizes=equal_sizes)
    if not logit_adjust:
        return loss
    if prior is None:
        raise MineralNetError("logit adjustment needs the class prior of the training photos")
    return LogitAdjustedLoss(loss, prior, logit_adjust)


def _build_plain_loss(name: str, *, k, alpha, scope, num_classes, feature_dim, center_weight,
                      label_smoothing, equal_sizes=False) -> nn.Module:
    if name == "ce":
        return CrossEntropyLoss(label_smoothing)
    if name == "topk":
        return TopKLoss(k, scope, equal_sizes)
    if name == "wtopk":
        return WeightedTopKLoss(k, alpha, scope, equal_sizes)
    if name == "center":
        if num_classes is None or feature_dim is None:
            raise MineralNetError("center loss needs num_classes and feature_dim")
        return CenterLoss(num_classes, feature_dim, center_weight, label_smoothing)
    raise MineralNetError(f"loss {name!r} is unknown; choose one of {', '.join(LOSSES)}")


def kd_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: T^2 * KL(teacher_T || student_T), averaged over the batch, where
    x_T = softmax(log x / T). The teacher is given as log-probabilities (logits work too: log_softmax is
    shift-invariant). Computed in float32 whatever the autocast."""
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=1)
    teacher = F.log_softmax(teacher_log_probs.float() / t, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)


class DistillationLoss(nn.Module):
    """(1 - weight) * the hard loss on the labels + weight * `kd_loss` on the teacher's rows of the batch."""

    def __init__(self, hard: nn.Module, temperature: float, weight: float):
        super().__init__()
        if not temperature > 0 or not 0.0 <= weight <= 1.0:
            raise MineralNetError(f"distillation needs temperature > 0 and weight in [0, 1] (got {temperature}, "
                                  f"{weight})")
        self.hard, self.temperature, self.weight = hard, float(temperature), float(weight)

    def forward(self, logits, target, features=None, teacher_log_probs=None):
        hard = self.hard(logits, target, features)
        if teacher_log_probs is None:
            raise MineralNetError("the distillation loss needs the teacher's rows of the batch")
        return (1.0 - self.weight) * hard + self.weight * kd_loss(logits, teacher_log_probs, self.temperature)
