"""The learning-rate schedule: linear warmup, then constant or cosine down to a floor."""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

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


def schedule_factor(step: int, optim_cfg: OptimConfig, total_steps: int) -> float:
    """`lr_factor` at 0-based optimizer step `step` of a run configured with `optim_cfg` over `total_steps`."""
    return lr_factor(step, warmup=optim_cfg.warmup_steps, total=total_steps, schedule=optim_cfg.schedule,
                     min_ratio=optim_cfg.min_lr_ratio)


def schedule_jump(step: int, before: tuple[OptimConfig, int], after: tuple[OptimConfig, int]) -> Optional[str]:
    """What a run continued after `step` optimizer steps does to its schedule when its (optim, train.steps) change
    from `before` to `after`: the restored LambdaLR recomputes the factor from the new settings, so a cosine decayed
    over another total jumps. A sentence naming both factors, or None when the next step's factor is unchanged."""
    was, now = schedule_factor(step, *before), schedule_factor(step, *after)
    if math.isclose(was, now, rel_tol=1e-9):
        return None
    return (f"the schedule's factor after step {step} is {now:.4g} under these settings, {was:.4g} under those the "
            f"run was trained with; the steps from here follow the new schedule")


def make_scheduler(optimizer: torch.optim.Optimizer, *, optim_cfg: OptimConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor` (DeepSpeed steps it once per optimizer step and checkpoints it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(schedule_factor, optim_cfg=optim_cfg,
                                                                total_steps=total_steps))
