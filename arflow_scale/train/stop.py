"""Stopping a run on request (Ctrl-C, SIGTERM from a scheduler or `arflow jobs stop`) without losing its steps.

The first SIGINT or SIGTERM the driver receives while the workers train is a request: the driver passes it to
rank 0 through the console sink. Rank 0 polls the sink without blocking (`StopPoll`, one outstanding query at a
time) and its answer rides on the all-reduce every step already makes after its last backward
(train/nonfinite.py, `StepConsensus`), so every rank learns it in the same step, a step or two after the
request, at no extra collective or sync; all ranks finish that step, write a checkpoint of it and return. The
driver then marks the MLflow run KILLED and raises `TrainingStopped`; running the same command again continues
from that checkpoint. A second signal stops at once: the driver raises `TrainingStopped` without a new
checkpoint, and leaving the Ray session ends the workers (the run continues from its newest periodic checkpoint).
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import ray

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


class StopPoll:
    """Worker side: whether the driver has asked to stop, as rank 0 knows it, never blocking a step.

    Rank 0 keeps one query of the console sink outstanding and reads it once it is answered (`ray.wait` with a zero
    timeout); other ranks, and runs without a sink, are never asked. Once asked, it stays asked."""

    def __init__(self, sink, rank: int):
        self.sink = sink if rank == 0 else None
        self.query = None  # the outstanding `stop_requested` call
        self.asked = False

    def poll(self) -> bool:
        if self.sink is None or self.asked:
            return self.asked
        if self.query is None:
            self.query = self.sink.stop_requested.remote()
        answered, _ = ray.wait([self.query], timeout=0)
        if answered:
            self.asked, self.query = bool(ray.get(self.query)), None
        return self.asked
