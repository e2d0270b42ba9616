"""Where a sweep stands, read from its storage alone (no Ray, no training): each point finished (its record and
loss), started (its newest complete checkpoint, where a rerun resumes) or not started, and the compute done."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arflow_scale.checkpoint.layout import checkpoint_step
from arflow_scale.checkpoint.store import latest_checkpoint
from arflow_scale.train.launch_plan import run_folder_url

from .finished import finished_points
from .sweep import SweepPoint

PointState = Literal["finished", "started", "not started"]


@dataclass(frozen=True)
class PointProgress:
    """One point: its state, the steps done (its checkpoint's step when started; all when finished) of `steps`."""

    name: str
    params: int
    steps: int
    flops: float
    budget: Optional[float]
    state: PointState
    step: int
    loss: Optional[float] = None

    @property
    def flops_done(self) -> float:
        return self.flops * self.step / self.steps

    def to_dict(self) -> dict:
        return {"name": self.name, "params": self.params, "budget": self.budget, "steps": self.steps,
                "state": self.state, "step": self.step, "flops": self.flops, "flops_done": self.flops_done,
                "loss": self.loss}


def points_progress(points: list[SweepPoint], root: str, storage_options: dict, what: str,
                    records: Optional[dict[str, dict]] = None) -> list[PointProgress]:
    """The progress of `points` of the sweep stored under `root`; a finished point whose config has changed since
    is a ConfigError naming it and its fields, as the run itself would refuse it. `records`: what `finished_points`
    already returned for all of `points` (else it is read here)."""
    if records is None:
        records, _ = finished_points(points, root, storage_options, what)
    progress = []
    for point in points:
        common = dict(name=point.name, params=point.params, steps=point.steps, flops=point.flops,
                      budget=point.budget)
        if point.name in records:
            progress.append(PointProgress(**common, state="finished", step=point.steps,
                                          loss=records[point.name].get("loss")))
            continue
        run = point.config.run
        checkpoint = latest_checkpoint(run_folder_url(run.storage_path, run.name), run.storage_options)
        step = checkpoint_step(checkpoint) if checkpoint else 0
        progress.append(PointProgress(**common, state="started" if checkpoint else "not started", step=step))
    return progress
