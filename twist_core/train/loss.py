"""The TWIST loss and the self-labelling loss, correct over any number of processes.

Every term is a mean over the *global* batch: per-sample terms and, above all, the mean prediction inside
the diversity entropy cross processes through an autograd-aware all-reduce, so
every process computes the single-process loss exactly. Its backward sums the identical upstream
gradients of all processes, so each holds ``world_size`` times the single-process logit gradient, which
DDP's 1/world_size gradient averaging brings back to exactly the single-process update.
"""

from __future__ import annotations

from itertools import product
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward also sums: the gradient of a global sum reaches every contributor.

    Our own small autograd function with blocking gloo/NCCL calls, instead of the deprecated
    ``torch.distributed.nn.functional.all_reduce``.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced)
        return reduced

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        reduced = grad.clone()
        dist.all_reduce(reduced)
        return reduced


def global_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over dim 0 of the batch of every process (weighted by a 0/1 mask if given), differentiable."""
    if weights is None:
        total, count = values.sum(0), torch.tensor(float(values.shape[0]), device=values.device)
    else:
        total, count = (values * weights).sum(0), weights.detach().sum()
    if _distributed():
        total = _AllReduceSum.apply(total)
        dist.all_reduce(count)
    return total / count.clamp(min=1.0)


def gather_unequal(values: torch.Tensor) -> torch.Tensor:
    """Every process's 1-d ``values`` concatenated, even when batch sizes differ (a file failed to decode on one).

    ``all_gather`` needs equal shapes (NCCL hangs, gloo fails otherwise): sizes first, then padded values, trimmed.
    """
    if not _distributed():
        return values
    world = dist.get_world_size()
    size = torch.tensor([values.shape[0]], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[:values.shape[0]] = values
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:int(n.item())] for part, n in zip(gathered, sizes, strict=True)])


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy over the last dimension, EPS inside the log as in the reference."""
    return -(probs * torch.log(probs + EPS)).sum(-1)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    log_p, log_q = torch.log(p + EPS), torch.log(q + EPS)
    return 0.5 * global_mean((p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1))


def twist_pair_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, tau: float = 1.0, lam1: float = 0.0,
                    lam2: float = 1.0) -> dict[str, torch.Tensor]:
    """The TWIST loss for two views of one batch, with its three parts.

    consistency = symmetric KL of softmax(logits); sharpness = mean entropy of softmax(logits/tau);
    diversity = entropy of the global mean of softmax(logits/tau);
    loss = consistency + (1 + lam1) * sharpness - lam2 * diversity.
    """
    consistency = symmetric_kl(torch.softmax(logits_a, -1), torch.softmax(logits_b, -1))
    sharp_a, sharp_b = torch.softmax(logits_a / tau, -1), torch.softmax(logits_b / tau, -1)
    sharpness = 0.5 * global_mean(entropy(sharp_a) + entropy(sharp_b))
    diversity = 0.5 * (entropy(global_mean(sharp_a)) + entropy(global_mean(sharp_b)))
    loss = consistency + (1 + lam1) * sharpness - lam2 * diversity
    return {"loss": loss, "consistency": consistency, "sharpness": sharpness, "diversity": diversity}


def twist_multicrop_loss(view_logits: list[torch.Tensor], n_global: int = 2, tau: float = 1.0, lam1: float = 0.0,
                         lam2: float = 1.0) -> dict[str, torch.Tensor]:
    """Average of the pair loss over (global view i, any other view j); two views give the plain pair loss."""
    pairs = [(i, j) for i, j in product(range(n_global), range(len(view_logits))) if i != j]
    if n_global == 2:  # (0, 1) and (1, 0) are the same symmetric pair: count it once
        pairs = [(i, j) for i, j in pairs if not (i == 1 and j == 0)]
    parts = [twist_pair_loss(view_logits[i], view_logits[j], tau, lam1, lam2) for i, j in pairs]
    return {name: torch.stack([p[name] for p in parts]).mean() for name in parts[0]}


def self_label_loss(view_logits: list[torch.Tensor], n_global: int = 2, tau: float = 1.0,
                    keep_fraction: float = 0.5) -> torch.Tensor:
    """Confidence-masked pseudo-label cross-entropy (as in SCAN), with a threshold over the global batch.

    The more confident global view of each image gives the pseudo-label; images whose confidence is in the
    top ``keep_fraction`` of the global batch train every other view towards it.
    """
    with torch.no_grad():
        probs = torch.stack([torch.softmax(v / tau, -1) for v in view_logits[:n_global]])
        confidence, labels = probs.max(-1)  # views x N
        best_view = confidence.argmax(0)  # N
        best_conf = confidence.gather(0, best_view.view(1, -1)).squeeze(0)
        pseudo = labels.gather(0, best_view.view(1, -1)).squeeze(0)
        everyone = gather_unequal(best_conf)
        threshold = torch.quantile(everyone.float(), 1.0 - keep_fraction)
        keep = best_conf >= threshold
    losses = []
    for view, logits in enumerate(view_logits):
        per_sample = F.cross_entropy(logits / tau, pseudo, reduction="none")
        not_source = best_view != view if view < n_global else torch.ones_like(keep)
        losses.append(global_mean(per_sample, (keep & not_source).to(per_sample.dtype)))
    return torch.stack(losses).mean()


def supervised_loss(view_logits: list[torch.Tensor], targets: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Cross-entropy of every view of the labelled images (``targets`` >= 0; -1 marks unlabelled ones).

    A mean over the labelled images of the global batch, so N processes give the single-process value; the
    temperature is the one the exported probabilities use.
    """
    labelled = targets >= 0
    safe_targets = targets.clamp(min=0)
    losses = [global_mean(F.cross_entropy(logits / tau, safe_targets, reduction="none"), labelled.to(logits.dtype))
              for logits in view_logits]
    return torch.stack(losses).mean()


class HeadLogits(NamedTuple):
    """One step's logits, one list of views per head: the K-way head, each coarse head, the over-clustering head."""

    main: list[torch.Tensor]
    coarse: list[list[torch.Tensor]]
    overcluster: list[list[torch.Tensor]]


class TwistObjective(nn.Module):
    """The whole loss of a step, configured once from the run's options and called once per step.

    TWIST on the K-way head (in the self-labelling stage the pseudo-label cross-entropy replaces it, and TWIST is
    still computed for the log), each coarse head and the over-clustering head by TWIST with weight 1, and, for
    ``twist finetune``, ``supervised_weight`` times the cross-entropy of the labelled images.
    """

    def __init__(self, tau: float, lam1: float, lam2: float, supervised_weight: float = 0.0, n_global: int = 2
                 ) -> None:
        super().__init__()
        self.tau, self.lam1, self.lam2 = tau, lam1, lam2
        self.supervised_weight, self.n_global = supervised_weight, n_global

    def twist(self, view_logits: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return twist_multicrop_loss(view_logits, self.n_global, self.tau, self.lam1, self.lam2)

    def forward(self, logits: HeadLogits, self_label_keep: float | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and its logged parts. ``self_label_keep``: the self-labelling stage's kept share
        (None: the TWIST stage); ``targets``: each image's class, -1 for the unlabelled ones (None: no labels)."""
        if self_label_keep is not None:  # the stage's cross-entropy replaces the TWIST loss, still logged as "loss"
            with torch.no_grad():
                parts = self.twist(logits.main)
            loss = parts["self_label"] = self_label_loss(logits.main, self.n_global, self.tau, self_label_keep)
        else:
            parts = self.twist(logits.main)
            loss = parts["loss"]
        if logits.coarse:
            parts["coarse"] = torch.stack([self.twist(head)["loss"] for head in logits.coarse]).mean()
            loss = loss + parts["coarse"]
        if logits.overcluster:
            parts["overcluster"] = self.twist(logits.overcluster[0])["loss"]
            loss = loss + parts["overcluster"]
        if targets is not None:
            parts["supervised"] = supervised_loss(logits.main, targets, self.tau)
            loss = loss + self.supervised_weight * parts["supervised"]
        return loss, parts
