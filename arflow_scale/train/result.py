"""What a worker's training function returns. Standard library only: Ray Train's controller unpickles rank 0's
result, and this module keeps it from importing torch, MLflow or the rest of this package to do so."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class RestoredState:
    """What a resumed run restored, hashed (`checkpoint.hash_restored`): the step of the checkpoint and the
    sha256 of the full fp32 weights and EMA gathered right after the restore, before any step."""

    step: int
    params_sha256: str
    ema_sha256: str


@dataclass(frozen=True)
class WorkerResult:
    """What a worker's training function returns; rank 0's is the run's result (Ray Train's `return_value`)."""

    final_step: int
    final_loss: float
    params_sha256: str = ""
    ema_sha256: str = ""
    images_per_s: float = 0.0
    mlflow_run_id: str = ""
    val_loss: Optional[float] = None  # held-out loss of the final raw weights, when the shards have a validation split
    val_loss_ema: Optional[float] = None  # ... of the final EMA weights
    error: Optional[str] = None  # the run stopped on a non-finite loss or gradient: the message naming the step
    restored: Optional[RestoredState] = None  # the latest restore (a group restarted by Ray restores again)
