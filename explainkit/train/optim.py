"""Optimisation: SGD and the one-cycle learning-rate schedule, sized in optimizer steps."""

from __future__ import annotations

import math

import torch
from torch import nn

from explainkit.config import TrainConfig


def one_cycle_factor(
    step: int, total: int, warmup: float = 0.25, start: float = 0.1, end: float = 0.005
) -> float:
    """LR multiplier: ``start`` -> 1 over ``warmup`` of the steps, then down to ``end``."""
    peak = max(1.0, warmup * total)
    if step < peak:
        return start + (1 - start) * step / peak
    return max(end, 1 - (1 - end) * (step - peak) / max(1.0, total - peak))


def steps_per_epoch(num_train: int, world_size: int, batch_size: int) -> int:
    """Optimizer steps per epoch for each process (each sees ``1 / world_size`` of the data)."""
    per_rank = math.ceil(num_train / world_size)
    full, rest = divmod(per_rank, batch_size)
    return full + (1 if rest > 1 else 0)  # a 1-image batch cannot train BatchNorm


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """One-cycle (linear warm-up over the first quarter, then linear decay), as a plain
    LambdaLR so its state is a few numbers and any number of steps works."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # Sized from config.epochs when built, so a resume with more epochs stretches the decay.
    total = max(1, config.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: one_cycle_factor(step, total))
