"""Background preparation of upcoming shard units, so fetching overlaps decoding.

The order and content of what a consumer yields never depend on this: prefetch only moves work
earlier. Used by `consumer.ConsumerStream`.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Hashable

_Unit = Hashable  # any hashable unit key (consumer._Unit in practice)


class _Cancelled(RuntimeError):
    """The prefetcher was closed while a fetch was pending (not transient: never retried)."""


FETCH_THREADS = 2  # background threads per consumer


def fetch_threads(depth: int) -> int:
    """Shard units a consumer reads at once: its prefetch threads (at most `depth`), or itself."""
    return max(1, min(FETCH_THREADS, depth))


class UnitPrefetcher:
    """Prepares hinted units (fetch, verify, split) in `threads` daemon threads, at most `depth`
    units ahead (prepared or in preparation), while the consumer decodes the current ones.

    Hints are prepared oldest first; `take(unit)` returns a prepared result (waiting if it is in
    flight), re-raising the storage error its fetch ended with, or None when the unit was not
    prepared (the caller reads it itself). What a unit holds never depends on timing, so batches do
    not either. `close()` stops the threads and waits for the fetches in flight.
    """

    def __init__(self, prepare: Callable[[_Unit, threading.Event], Any], depth: int):
        self.prepare, self.depth, self.num_threads = prepare, depth, fetch_threads(depth)
        self.hints: collections.deque[_Unit] = collections.deque()
        self.ready: dict[_Unit, tuple[bool, Any]] = {}  # unit -> (ok, result or exception)
        self.in_flight: set[_Unit] = set()
        self.discarded: set[int] = set()  # corrupt shards: never prepared or kept again
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def hint(self, unit: _Unit) -> None:
        with self.cond:
            if (self.stopping.is_set() or unit.shard in self.discarded or unit in self.ready
                    or unit in self.in_flight or unit in self.hints):
                return
            self.hints.append(unit)
            if not self.threads:
                self.threads = [threading.Thread(target=self._work, name="arflow-shard-prefetch", daemon=True)
                                for _ in range(self.num_threads)]
                for thread in self.threads:
                    thread.start()
            self.cond.notify_all()

    def take(self, unit: _Unit) -> Any | None:
        with self.cond:
            if unit in self.hints:  # not started: the caller reads it now rather than wait in line
                self.hints.remove(unit)
                return None
            while unit in self.in_flight:
                self.cond.wait()
            if unit not in self.ready:
                return None
            ok, value = self.ready.pop(unit)
            self.cond.notify_all()
        if not ok:
            raise value
        return value

    def discard(self, shard: int) -> None:
        """Forget prepared or hinted units of `shard` (it turned out corrupt)."""
        with self.cond:
            self.discarded.add(shard)
            for unit in [u for u in self.ready if u.shard == shard]:
                del self.ready[unit]
            self.hints = collections.deque(u for u in self.hints if u.shard != shard)
            self.cond.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        with self.cond:
            self.stopping.set()
            self.hints.clear()
            self.ready.clear()
            self.cond.notify_all()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.stopping.is_set() and not (
                        self.hints and len(self.ready) + len(self.in_flight) < self.depth):
                    self.cond.wait()
                if self.stopping.is_set():
                    return
                unit = self.hints.popleft()
                self.in_flight.add(unit)
            try:
                result = (True, self.prepare(unit, self.stopping))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer at take()
                result = (False, err)
            with self.cond:
                self.in_flight.discard(unit)
                if not self.stopping.is_set() and unit.shard not in self.discarded:
                    self.ready[unit] = result
                self.cond.notify_all()


