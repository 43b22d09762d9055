"""Optimisers and the learning-rate schedule.

Biases and normalisation parameters get no weight decay and (under LARS) no trust-ratio adaptation, as in
the reference. The schedule is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio ``eta * |w| / |g + wd w|`` (You et al., 2017).

    Parameter groups with ``lars_exclude=True`` (biases, BN) are updated as plain SGD with momentum.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                                  "lars_exclude": False})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if not group["lars_exclude"]:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights of conv/linear layers decay; biases and normalisation parameters (1-d tensors) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float,
                    lars_eta: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "sgd":
        for group in groups:
            group.pop("lars_exclude")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    if name == "adamw":
        for group in groups:
            group.pop("lars_exclude")
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: choose sgd, lars or adamw")


def cosine_warmup(step: int, steps: int, warmup_steps: int, peak_lr: float, final_fraction: float = 0.001) -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine decay to ``final_fraction * peak_lr``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    final = peak_lr * final_fraction
    return final + 0.5 * (peak_lr - final) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepSettings:
    """What one training step does: its learning rate, whether (and how selectively) it self-labels, and whether
    its second views may come from mined neighbours."""

    lr: float
    self_labelling: bool
    keep: float
    neighbours: bool = False


@dataclass(frozen=True)
class Schedule:
    """The whole schedule as a pure function of the step: resuming needs only the step number.

    Two stages, as the paper runs them: TWIST (warm-up, then cosine) over the first steps, then, over the last
    ``self_label_fraction`` of them, the self-labelling stage with its own warm-up to ``restart`` x the peak, its
    own cosine, and a kept share of the batch rising from ``keep`` to ``keep + keep_rise``. The last
    ``neighbour_fraction`` of the TWIST stage pairs images with their mined neighbours (``neighbours.py``) on the
    same cosine.
    """

    total_steps: int
    warmup_steps: int
    peak_lr: float
    self_label_fraction: float = 0.0
    keep: float = 0.5
    keep_rise: float = 0.1
    restart: float = 0.1
    neighbour_fraction: float = 0.0

    @property
    def self_label_start(self) -> int:
        if self.self_label_fraction <= 0:
            return self.total_steps
        return max(0, self.total_steps - max(1, round(self.self_label_fraction * self.total_steps)))

    @property
    def warmup_end(self) -> int:
        """The one definition of the warm-up's end: as asked, but at most a fifth of the TWIST stage."""
        return max(1, min(self.warmup_steps, self.self_label_start // 5))

    @property
    def neighbour_start(self) -> int:
        """The first step of the neighbour stage (never inside the warm-up); ``self_label_start`` when off."""
        start = self.self_label_start
        if self.neighbour_fraction <= 0:
            return start
        return max(self.warmup_end, start - max(1, round(self.neighbour_fraction * start)))

    def at(self, step: int) -> StepSettings:
        start = self.self_label_start
        if step < start:
            return StepSettings(cosine_warmup(step, start, self.warmup_end, self.peak_lr), False, self.keep,
                            step >= self.neighbour_start)
        length = max(1, self.total_steps - start)
        into = step - start
        lr = cosine_warmup(into, length, max(1, round(0.1 * length)), self.restart * self.peak_lr)
        return StepSettings(lr, True, self.keep + self.keep_rise * min(1.0, into / length))
