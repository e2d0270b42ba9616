"""Fault injection for tests and drills: crash (raise) or SIGKILL one rank after a given step, make its loss
NaN at a step (a divergence), or pause it after a step (a straggler), once.

"Once" survives restarts: before firing, the rank writes a marker file into the run folder
(`<run_url>/faults/<kind>-rank<r>-step<s>`), and a restarted worker that finds it does not fire again.
"""
from __future__ import annotations

import logging
import os
import signal
import time

from arflow_scale.config import FaultsConfig
from arflow_scale.data.storage import filesystem

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """The exception raised by `faults.crash_rank_at_step`."""

class FaultInjector:
    """Fires the configured faults of `cfg` on rank `rank`, each at most once per run folder."""
    def __init__(self, cfg: FaultsConfig, run_url: str, rank: int, storage_options: dict | None = None):
        self.cfg = cfg
        self.run_url = run_url.rstrip("/")
        self.rank = rank
        self.storage_options = storage_options or {}

    def _marker(self, kind: str, step: int) -> str:
        return f"{self.run_url}/faults/{kind}-rank{self.rank}-step{step}"

    def _claim(self, kind: str, step: int) -> bool:
        """True the first time this fault is claimed in this run folder (writes the marker)."""
        fs, path = filesystem(self._marker(kind, step), self.storage_options)
        if fs.exists(path):
            return False
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            f.write("fired\n")
        return True

    def poison_loss(self, step: int, loss):
        """The loss of this rank at `step`, NaN where `faults.nan_loss_at_step` says so (once per run folder)."""
        if self.rank == self.cfg.rank and self.cfg.nan_loss_at_step == step and self._claim("nan", step):
            log.warning("fault injection: rank %d's loss at step %d is NaN", self.rank, step)
            return loss * float("nan")
        return loss

    def after_step(self, step: int) -> None:
        """Call after finishing optimizer step `step` (and any checkpoint of that step)."""
        if self.rank != self.cfg.rank:
            return
        if self.cfg.crash_rank_at_step == step and self._claim("crash", step):
            log.warning("fault injection: rank %d raises after step %d", self.rank, step)
            raise InjectedFault(f"faults.crash_rank_at_step={step}: injected crash on rank {self.rank}")
        if self.cfg.kill_rank_at_step == step and self._claim("kill", step):
            log.warning("fault injection: rank %d SIGKILLs itself after step %d", self.rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.pause_rank_at_step == step and self._claim("pause", step):
            log.warning("fault injection: rank %d pauses %g s after step %d", self.rank, self.cfg.pause_seconds, step)
            time.sleep(self.cfg.pause_seconds)
