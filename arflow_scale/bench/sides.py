"""Sides of a benchmark driven in time slices: a byte counter, and threads looping over shards."""
from __future__ import annotations

import itertools
import threading
import time


class BenchSide:
    """One side of the benchmark, driven in slices (`run_for`) and counting stored bytes."""

    bytes: int = 0
    seconds: float = 0.0

    def _slice(self, seconds: float) -> tuple[int, float]:
        """Work for `seconds` -> (bytes done, seconds taken)."""
        raise NotImplementedError

    def run_for(self, seconds: float) -> None:
        got, took = self._slice(seconds)
        self.bytes += got
        self.seconds += took

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6

    def close(self) -> None:
        pass


class ShardLoop:
    """`threads` threads of this process applying `work(shard index) -> bytes done` to the shards
    round-robin (a shared counter), in slices of time."""

    def __init__(self, work, shards: int, threads: int, first: int = 0):
        self.work, self.shards = work, shards
        self.threads, self.counter, self.lock = threads, itertools.count(first), threading.Lock()

    def _loop_until(self, deadline: float, totals: list[int], errors: list[BaseException]) -> None:
        try:
            while time.perf_counter() < deadline:
                with self.lock:
                    i = next(self.counter) % self.shards
                totals.append(self.work(i))
        except BaseException as err:  # noqa: BLE001 - re-raised by run_for in the calling thread
            errors.append(err)

    def run_for(self, seconds: float) -> tuple[int, float]:
        """Work for `seconds` -> (bytes done, seconds taken); a thread's error is raised here."""
        totals: list[int] = []
        errors: list[BaseException] = []
        start = time.perf_counter()
        workers = [threading.Thread(target=self._loop_until, args=(start + seconds, totals, errors))
                   for _ in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
        return sum(totals), time.perf_counter() - start
