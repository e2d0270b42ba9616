"""What a worker's training function returns, and the error of a run stopped on request. Standard library only:
Ray Train's controller unpickles rank 0's result, and this module keeps it from importing torch, MLflow or the
rest of this package to do so (the CLI catches `TrainingStopped` without loading them either)."""
from __future__ import annotations

import signal
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
    stopped: bool = False  # the driver asked the run to stop: it checkpointed final_step and returned (no hashes)


class TrainingStopped(RuntimeError):
    """The run stopped on a signal; `checkpoint` is where a rerun continues from (None: from the start)."""

    def __init__(self, signum: int, step: Optional[int], checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"at step {step}, checkpoint {checkpoint}" if step is not None else \
            f"at once (a second signal); the newest checkpoint is {checkpoint or 'none'}"
        super().__init__(f"stopped on {name} {where}; run the same command again to continue")

    def __reduce__(self):  # raised inside a Ray task (a sweep's point), it crosses processes pickled
        return type(self), (self.signum, self.step, self.checkpoint)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum
