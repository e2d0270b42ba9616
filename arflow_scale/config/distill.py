"""Distillation section: `arflow train` with `distill.teacher` set trains a second stage, the student of the
model section's family against a frozen teacher run (FARMER: the one-step inverse of its flow)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from arflow_scale.schema import check


@dataclass
class DistillConfig:
    # The teacher: a checkpoint folder, a run folder (pinned to its newest complete checkpoint when training
    # starts) or a local exported .safetensors; its EMA weights are read again wherever the student samples.
    teacher: Optional[str] = None

    def validate(self) -> None:
        check(self.teacher is None or bool(self.teacher.strip()), "teacher", "must be a URL or path (or null)")
