"""Where a run lock lives: one small object with create-if-absent and compare-and-swap, per kind of storage.

- local paths: create = write a temporary file, then hard-link it to the lock's name (atomic, fails if the
  name exists, never shows half a file); swap = rename the current file aside (only one caller can), check
  that it is the version the caller saw, link the new content in; a mismatch puts the old file back;
  the holder's own refresh replaces its file in place (os.replace), so the name never disappears.
- S3: conditional writes, `If-None-Match: *` to create and `If-Match: <ETag>` to swap (AWS S3 since 2024,
  MinIO, moto).
- other fsspec storage: write, wait `settle_seconds`, read back (write-then-verify). Residual race: two
  creators whose writes land more than `settle_seconds` apart after both saw no lock can both read back
  their own; the holder's heartbeat re-reads the lock and reports a takeover (run_lock.py).
A version is what a swap must match: the content for local files and other storage, the ETag on S3.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from arflow_scale.data.storage import filesystem, is_local_url, local_path

Read = Optional[tuple[str, str]]  # (text, version), None when there is no lock


class LocalLockStore:
    """A lock file on a local (or shared POSIX) filesystem."""

    def __init__(self, url: str):
        self.path = local_path(url)

    def _staged(self, text: str) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        staged = self._staged(text)
        try:
            os.link(staged, self.path)
            return text
        except FileExistsError:
            return None
        finally:
            staged.unlink()

    def swap(self, text: str, version: str) -> Optional[str]:
        aside = self.path.with_name(f".{self.path.name}.aside.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        try:
            if aside.read_text() != version:  # changed since the caller read it: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return None
            return self.create(text)
        finally:
            aside.unlink()

    def refresh(self, text: str, version: str) -> Optional[str]:
        """The holder's heartbeat: replace its own version in place (the name never disappears, so no newcomer
        can create a lock meanwhile); None if the current version is not `version`."""
        current = self.read()
        if current is None or current[1] != version:
            return None
        os.replace(self._staged(text), self.path)
        return text

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class S3LockStore:
    """A lock object on S3 (conditional writes)."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        self.fs, self.path = filesystem(url, storage_options)

    def read(self) -> Read:
        try:
            with self.fs.open(self.path, "rb") as f:  # the ETag of the version read (s3fs reads with If-Match)
                return f.read().decode(), f.details["ETag"]
        except FileNotFoundError:
            return None

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

    def delete(self) -> None:
        self.fs.rm_file(self.path)


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

    def delete(self) -> None:
        self.fs.rm_file(self.path)


def lock_store(url: str, storage_options: dict[str, Any]):
    """The store for a lock at `url`."""
    if is_local_url(url):
        return LocalLockStore(url)
    if url.split("://", 1)[0] in ("s3", "s3a"):
        return S3LockStore(url, storage_options)
    return VerifiedLockStore(url, storage_options)
