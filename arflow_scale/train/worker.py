"""The entry point Ray Train runs on every rank."""
from __future__ import annotations

import os
from typing import Any

import ray

from .args import WorkerArgs
from .result import WorkerResult
from .trainer import Trainer


def train_loop_per_worker(loop_config: dict[str, Any]) -> WorkerResult:
    """Ray Train entry point on every rank; rank 0's result becomes the run's (`Result.return_value`)."""
    args = WorkerArgs.from_loop_config(loop_config)
    for key, value in (ray.get(args.env_ref) if args.env_ref is not None else {}).items():
        os.environ.setdefault(key, value)
    return Trainer(args).fit()
