"""The task a run trains and samples with: its model section's family (`tasks.task_for`), or, for a
distillation stage (`distill.teacher`), that family's student task over the teacher's EMA weights.

Everything that builds a run's model from its config (the trainer, sample grids, FID tasks, `arflow sample`)
resolves the task here, so a distilled run's checkpoint samples like any other.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from arflow_scale.config import Config
from arflow_scale.data.storage import is_local_url, local_path
from arflow_scale.schema import ConfigError
from arflow_scale.tasks import ModelTask, task_for

from .export import load_exported
from .store import resolve_checkpoint
from .weights import CheckpointWeights, load_ema_weights

EXPORTED_SUFFIX = ".safetensors"


def load_teacher(url: str, storage_options: Optional[dict] = None) -> CheckpointWeights:
    """(Config, EMA weights) of a teacher: a checkpoint folder, a run folder (its newest complete checkpoint)
    or a local file written by `arflow export`."""
    if url.endswith(EXPORTED_SUFFIX):
        cfg, ema, _ = load_exported(url)
        return CheckpointWeights(cfg, ema)
    return load_ema_weights(url, storage_options)


def run_task(cfg: Config, storage_options: Optional[dict] = None) -> ModelTask:
    """The ModelTask of a run config; a distillation stage reads its teacher's EMA weights (ValueError naming
    `distill.teacher` when the teacher does not fit)."""
    task = task_for(cfg.model)
    if not cfg.distill.teacher:
        return task
    teacher_cfg, weights = load_teacher(cfg.distill.teacher, storage_options)
    if teacher_cfg.distill.teacher:
        raise ValueError(f"distill.teacher: {cfg.distill.teacher} is itself a distillation stage (of "
                         f"{teacher_cfg.distill.teacher}); give the model it was distilled from")
    return task.student_task(task_for(teacher_cfg.model), weights)


def pin_teacher(cfg: Config, storage_options: Optional[dict] = None, resumed: Optional[Config] = None) -> Config:
    """Before a run starts: `distill.teacher` pinned to one checkpoint folder (a run folder's newest complete
    one; local paths made absolute) and checked to fit the model section; a run that continues from a
    checkpoint (whose config is `resumed`) keeps the teacher it was distilled from (or none). A ConfigError
    names `distill.teacher` otherwise."""
    earlier = resumed.distill.teacher if resumed is not None else None
    url = cfg.distill.teacher
    if not url:
        if earlier:
            raise ConfigError(f"distill.teacher: unset, but the run continues from a checkpoint distilled from "
                              f"{earlier}; pass distill.teacher={earlier} or start a new run.name")
        return cfg
    try:
        if is_local_url(url):
            url = str(local_path(url))
        pinned = url if url.endswith(EXPORTED_SUFFIX) else resolve_checkpoint(url, storage_options)
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=pinned))
        run_task(cfg, storage_options)
    except (ValueError, FileNotFoundError) as err:
        text = str(err)
        raise ConfigError(text if text.startswith("distill.teacher") else f"distill.teacher: {text}") from None
    if resumed is not None and earlier != pinned:
        raise ConfigError(f"distill.teacher: {pinned}, but the run continues from a checkpoint "
                          f"{f'distilled from {earlier}' if earlier else 'that is not a distillation stage'}; "
                          f"pass the teacher it was distilled from or start a new run.name")
    return cfg
