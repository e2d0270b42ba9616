"""Where a run lock lives: one small object with create-if-absent and compare-and-swap, per kind of storage.

- local paths: every change runs under an exclusive flock on a guard file beside the lock
  (`.run.lock.guard`, kept). Create writes a temporary file and hard-links it to the lock's name (fails if
  the name exists, never shows half a file); swap, the holder's refresh and its delete read, compare with
  the caller's version, then replace in place (os.replace) or unlink. The name is never free while a stale
  lock is taken over.
- S3: conditional writes, `If-None-Match: *` to create and `If-Match: <ETag>` to swap (AWS S3 since 2024,
  MinIO, moto) and to delete (AWS S3 since 2025-09, moto).
- other fsspec storage: write, wait `settle_seconds`, read back (write-then-verify). Residual race: two
  creators whose writes land more than `settle_seconds` apart after both saw no lock can both read back
  their own; the holder's heartbeat re-reads the lock and reports a takeover (run_lock.py).
A version is what a swap must match: the content for local files and other storage, the ETag on S3.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from s3fs.utils import FileExpired

from arflow_scale.data.storage import filesystem, is_local_url, local_path
from arflow_scale.schema import ConfigError

Read = Optional[tuple[str, str]]  # (text, version), None when there is no lock


class LocalLockStore:
    """A lock file on a local (or shared POSIX) filesystem."""

    def __init__(self, url: str):
        self.path = local_path(url)

    def _staged(self, text: str) -> Path:
        """`text` in a temporary file beside the lock (inside `_guarded`, which made the folder)."""
        staged = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        staged.write_text(text)
        return staged

    def read(self) -> Read:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        return text, text

    def create(self, text: str) -> Optional[str]:
        """Link `text` in if there is no lock (under the guard too, so a mount without flock fails at start)."""
        with self._guarded():
            staged = self._staged(text)
            try:
                os.link(staged, self.path)
                return text
            except FileExistsError:
                return None
            finally:
                staged.unlink()

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """Exclusive among this lock's creates, swaps, refreshes and deletes, in every process on every host whose mount
        honours flock (local disks, NFS; Lustre with `-o flock`). ConfigError naming the folder where flock is
        missing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.guard"), "a") as guard:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                raise ConfigError(f"run.storage_path: {self.path.parent} is on a filesystem without flock "
                                  f"({err.strerror}), which the run lock needs; mount it with flock support "
                                  f"(Lustre: -o flock) or keep runs on S3") from err
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def swap(self, text: str, version: str) -> Optional[str]:
        """Replace `version` with `text` in place; None if another version is current or there is none."""
        with self._guarded():
            current = self.read()
            if current is None or current[1] != version:
                return None
            os.replace(self._staged(text), self.path)
            return text

    refresh = swap  # the holder's heartbeat is the same compare-and-replace

    def delete(self, version: str) -> None:
        """Remove the lock if `version` is current."""
        with self._guarded():
            current = self.read()
            if current is not None and current[1] == version:
                self.path.unlink()


class S3LockStore:
    """A lock object on S3 (conditional writes)."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        self.fs, self.path = filesystem(url, storage_options)

    def read(self, attempts: int = 5) -> Read:
        """The current text and ETag. s3fs reads with If-Match on the ETag its HEAD saw, so a version replaced
        between the two (another driver's swap) raises FileExpired: that is a race lost, so read again."""
        for _ in range(attempts):
            try:
                with self.fs.open(self.path, "rb") as f:
                    return f.read().decode(), f.details["ETag"]
            except FileNotFoundError:
                return None
            except FileExpired:
                self.fs.invalidate_cache(self.path)
        raise RuntimeError(f"{self.path}: the lock changed under {attempts} reads in a row")

    def create(self, text: str) -> Optional[str]:
        try:
            return self.fs.pipe_file(self.path, text.encode(), mode="create")["ETag"]
        except FileExistsError:
            return None

    def swap(self, text: str, version: str) -> Optional[str]:
        try:
            return self.fs.pipe_file(self.path, text.encode(), IfMatch=version)["ETag"]
        except FileNotFoundError:
            return None
        except OSError:  # 412 Precondition Failed arrives as OSError(EINVAL): another version is current
            current = self.read()
            if current is not None and current[1] != version:
                return None
            raise

    refresh = swap  # atomic on S3: the heartbeat is a conditional write too

    def delete(self, version: str) -> None:
        """Remove the lock if `version` is current: read, then a conditional delete (If-Match: AWS S3 since
        2025-09, moto); a store that ignores the header deletes unconditionally after the read agreed."""
        current = self.read()
        if current is None or current[1] != version:
            return
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            pass
        except OSError:  # 412 (EINVAL): another driver took the lock over since our read, not ours to remove
            current = self.read()
            if current is not None and current[1] == version:  # still ours: the delete itself failed
                raise
        finally:
            self.fs.invalidate_cache(self.path)


class VerifiedLockStore:
    """Any other fsspec storage: write, wait, read back."""

    def __init__(self, url: str, storage_options: dict[str, Any], settle_seconds: float = 2.0):
        self.fs, self.path = filesystem(url, storage_options)
        self.settle_seconds = settle_seconds

    def read(self) -> Read:
        try:
            text = self.fs.cat_file(self.path).decode()
        except FileNotFoundError:
            return None
        return text, text

    def _write_and_verify(self, text: str) -> Optional[str]:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self.path, text.encode())
        time.sleep(self.settle_seconds)
        current = self.read()
        return text if current is not None and current[0] == text else None

    def create(self, text: str) -> Optional[str]:
        return None if self.fs.exists(self.path) else self._write_and_verify(text)

    def swap(self, text: str, version: str) -> Optional[str]:
        current = self.read()
        return self._write_and_verify(text) if current is not None and current[1] == version else None

    refresh = swap

    def delete(self, version: str) -> None:
        """Remove the lock if `version` is current (read, then delete: a takeover in between is lost)."""
        current = self.read()
        if current is not None and current[1] == version:
            self.fs.rm_file(self.path)


def lock_store(url: str, storage_options: dict[str, Any]):
    """The store for a lock at `url`."""
    if is_local_url(url):
        return LocalLockStore(url)
    if url.split("://", 1)[0] in ("s3", "s3a"):
        return S3LockStore(url, storage_options)
    return VerifiedLockStore(url, storage_options)
