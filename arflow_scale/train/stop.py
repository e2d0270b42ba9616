"""Stopping a run on request (Ctrl-C, SIGTERM from a scheduler or `arflow jobs stop`) without losing its steps.

The first SIGINT or SIGTERM the driver receives while the workers train is a request: the driver passes it to
rank 0 through the console sink, and at the next log step (`train.log_every`) every rank learns it from one
collective, writes a checkpoint of that step and returns. The driver then marks the MLflow run KILLED and
raises `TrainingStopped`; running the same command again continues from that checkpoint. A second signal
stops at once: the driver raises `TrainingStopped` without a new checkpoint, and leaving the Ray session ends
the workers (the run continues from its newest periodic checkpoint).
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import ray
import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Driver side, while the workers train: the first SIGINT/SIGTERM is recorded (`received`), a second one
    raises KeyboardInterrupt. Handlers are only installed in the main thread (elsewhere `received` stays None)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None  # the first signal's number
        self.forwarded = False  # the request has reached the workers' sink

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.received = signum

    @contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def stop_agreed(sink, rank: int, device: torch.device) -> bool:
    """Whether the driver asked the run to stop: rank 0 asks the sink, every rank gets its answer (a collective,
    so that all ranks stop after the same step)."""
    asked = rank == 0 and sink is not None and bool(ray.get(sink.stop_requested.remote()))
    flag = torch.tensor([1.0 if asked else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
