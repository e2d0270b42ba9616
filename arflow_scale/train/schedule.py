"""The learning-rate schedule: linear warmup, then constant or cosine down to a floor."""
from __future__ import annotations

import math
from functools import partial

import torch

from arflow_scale.config import OptimConfig


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr for 0-based optimizer step `step`: linear warmup, then constant/cosine."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, *, optim_cfg: OptimConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor` (DeepSpeed steps it once per optimizer step and checkpoints it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=optim_cfg.warmup_steps, total=total_steps, schedule=optim_cfg.schedule,
        min_ratio=optim_cfg.min_lr_ratio))
