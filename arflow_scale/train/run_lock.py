"""One driver per run folder: `arflow train` holds `<run folder>/run.lock` while it runs.

The lock is a small JSON record (owner token, host, pid, pid namespace, start, heartbeat time and the
holder's heartbeat settings) created with create-if-absent (`lock_store.py`). A daemon thread of the
holder rewrites the heartbeat every `run.lock_heartbeat_seconds`. A second driver is refused
(`RunLockHeld`, naming the holder) unless the lock is stale:
  - its heartbeat is older than heartbeat_seconds x missed_heartbeats (the holder's own settings), measured
    with this host's clock against the holder's (clocks must agree to well within that window), or
  - the holder ran on this host, in this pid namespace, and its pid is gone (a crashed or killed driver:
    no waiting).
A stale lock is taken over with a compare-and-swap against the version judged stale, so of several drivers
starting at once exactly one wins. Before each refresh the holder checks that the lock is still its own;
if another driver took it over (a holder that could not refresh for the whole window) it logs an error:
two drivers may then write the run folder (the residual risk, besides the write-then-verify storage of
lock_store.py).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from .lock_store import lock_store

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"


class RunLockHeld(RuntimeError):
    """Another live driver holds the run folder's lock; the message names it."""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


@dataclass(frozen=True)
class LockRecord:
    """The content of a run lock."""

    owner: str  # a random token per acquisition
    host: str
    pid: int
    pid_namespace: str
    started: float  # unix time
    heartbeat: float  # unix time of the last refresh
    heartbeat_seconds: float
    missed_heartbeats: int

    def to_text(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_text(cls, text: str) -> Optional["LockRecord"]:
        """The record, or None when the text is not one (a foreign or damaged file)."""
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    @property
    def stale_after(self) -> float:
        return self.heartbeat_seconds * self.missed_heartbeats

    def is_stale(self, now: float) -> bool:
        if now - self.heartbeat > self.stale_after:
            return True
        if self.host != socket.gethostname() or self.pid_namespace != _pid_namespace() or not self.pid_namespace:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def describe(self, now: float) -> str:
        started = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"host {self.host}, pid {self.pid}, started {started}, last heartbeat {now - self.heartbeat:.0f} s "
                f"ago")


class RunLock:
    """Context manager: hold `<run_url>/run.lock` for the block (RunLockHeld if a live driver holds it)."""

    def __init__(self, run_url: str, storage_options: Optional[dict[str, Any]] = None, *,
                 heartbeat_seconds: float = 10.0, missed_heartbeats: int = 6):
        self.url = f"{run_url.rstrip('/')}/{LOCK_NAME}"
        self.store = lock_store(self.url, dict(storage_options or {}))
        self.heartbeat_seconds, self.missed_heartbeats = heartbeat_seconds, missed_heartbeats
        self.record: Optional[LockRecord] = None
        self.version: Optional[str] = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _new_record(self) -> LockRecord:
        now = time.time()
        return LockRecord(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                          pid_namespace=_pid_namespace(), started=now, heartbeat=now,
                          heartbeat_seconds=self.heartbeat_seconds, missed_heartbeats=self.missed_heartbeats)

    def acquire(self) -> None:
        """Take the lock, or raise RunLockHeld naming its live holder."""
        record = self._new_record()
        for _ in range(3):  # a lock released or taken over between our steps: look again
            version = self.store.create(record.to_text())
            if version is None:
                current = self.store.read()
                if current is None:
                    continue
                text, seen = current
                holder = LockRecord.from_text(text)
                if holder is not None and not holder.is_stale(time.time()):
                    raise RunLockHeld(self._held_message(holder))
                log.warning("%s: taking over a stale lock (%s)", self.url,
                            holder.describe(time.time()) if holder else "unreadable")
                version = self.store.swap(record.to_text(), seen)
                if version is None:
                    continue
            self.record, self.version = record, version
            self._start_heartbeat()
            return
        current = self.store.read()
        holder = LockRecord.from_text(current[0]) if current else None
        raise RunLockHeld(self._held_message(holder) if holder else f"{self.url}: could not take the run lock "
                          f"(other drivers kept changing it); try again")

    def _held_message(self, holder: LockRecord) -> str:
        run = self.url.rsplit("/", 1)[0]
        return (f"run folder {run} is in use by another `arflow train` ({holder.describe(time.time())}); a lock "
                f"without a heartbeat for {holder.stale_after:.0f} s is stale. Wait for that run to end or stop it, "
                f"or choose another run.name. If it is gone and its host's clock is off, delete {self.url}.")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="arflow-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not self.refresh():
                    return
            except Exception as err:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                log.warning("%s: heartbeat failed: %s: %s", self.url, type(err).__name__, err)

    def refresh(self) -> bool:
        """Rewrite the heartbeat; False (and `lost` set, an error logged) when another driver took the lock."""
        assert self.record is not None and self.version is not None, "refresh() before acquire()"
        record = LockRecord(**{**asdict(self.record), "heartbeat": time.time()})
        version = self.store.refresh(record.to_text(), self.version)
        if version is None:
            current = self.store.read()
            other = LockRecord.from_text(current[0]) if current else None
            log.error("%s: the run lock was taken over (%s): another driver may be writing this run folder",
                      self.url, other.describe(time.time()) if other else "lock gone")
            self.lost.set()
            return False
        self.record, self.version = record, version
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (errors are logged, not raised)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.record is None or self.lost.is_set():
            return
        try:
            self.store.delete(self.version)
        except Exception as err:  # noqa: BLE001 - never hide the run's own outcome
            log.warning("%s: could not remove the run lock: %s", self.url, err)
        self.record = self.version = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
