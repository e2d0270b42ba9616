"""fsspec/s3fs storage helpers: URL -> filesystem, retried reads and writes with clear errors.

Any fsspec URL works: a local path, `file://`, `s3://bucket/prefix` (s3fs; endpoint from the
`endpoint_url` storage option or env `AWS_ENDPOINT_URL`), `memory://`, registered protocols.
Transient errors (connection, timeout, 5xx surfaced as OSError) are retried with exponential
backoff; after the last attempt a `StorageError` names the URL. Missing files are never retried.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "the thing is not there / not allowed": retrying cannot help.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                    FileExistsError)
# botocore's errors for credentials that are missing or incomplete (s3fs raises them as they are): a setting to fix,
# not an outage, though they derive from BotoCoreError; a retry would reuse the same client, made without them
PERMANENT_ERROR_NAMES = {"NoCredentialsError", "PartialCredentialsError"}


class StorageError(ConnectionError):
    """Storage stayed unreachable after all retries; the message names the URL."""


def parse_storage_options(items: list[str] | None) -> dict[str, str]:
    """CLI `--storage-option KEY=VALUE` items -> {key: value}; a malformed item is a ValueError naming it."""
    options: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--storage-option {item!r}: expected key=value")
        options[key.strip()] = value
    return options


def s3_endpoint(storage_options: dict[str, Any]) -> str | None:
    """The S3 endpoint of some storage options: `endpoint_url`, `client_kwargs.endpoint_url`, else env
    AWS_ENDPOINT_URL, else None (AWS itself)."""
    client_kwargs = storage_options.get("client_kwargs") or {}
    return storage_options.get("endpoint_url") or client_kwargs.get("endpoint_url") \
        or os.environ.get("AWS_ENDPOINT_URL")


def _s3_options(storage_options: dict[str, Any]) -> dict[str, Any]:
    """Move a flat `endpoint_url` (or env AWS_ENDPOINT_URL) into s3fs' client_kwargs."""
    endpoint = s3_endpoint(storage_options)
    opts = dict(storage_options)
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    opts.pop("endpoint_url", None)
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


def _coerce_option(value: Any) -> Any:
    """CLI `key=value` strings -> bool/int/float where they clearly are one."""
    if not isinstance(value, str):
        return value
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """URL -> (fsspec filesystem, path inside it). Raises ValueError naming a bad URL."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"storage URL must be a non-empty string, got {url!r}")
    if url.startswith("pipe:"):
        raise ValueError(f"{url!r}: pipe: URLs are not allowed (shell commands from URLs)")
    opts = {k: _coerce_option(v) for k, v in (storage_options or {}).items()}
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        opts = _s3_options(opts)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError, TypeError) as err:
        raise ValueError(f"{url}: cannot open this storage URL: {err}") from err
    return fs, path


def is_local_url(url: str) -> bool:
    """A plain path or a file:// URL."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    """Absolute path of a local URL (plain path or file://)."""
    return Path(url[len("file://"):] if url.startswith("file://") else url).resolve()


def join_url(base: str, *parts: str) -> str:
    """Join URL/path parts with '/', keeping the scheme of `base`."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_transient(err: BaseException) -> bool:
    """Whether an exception from storage is worth retrying."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if isinstance(err, PERMANENT_ERRORS) or names & PERMANENT_ERROR_NAMES:
        return False
    if isinstance(err, (OSError, TimeoutError, ConnectionError)):
        return True
    # botocore / aiohttp errors do not derive from OSError.
    return bool(names & {"BotoCoreError", "ClientError", "ClientConnectionError", "ServerTimeoutError",
                         "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"})


def with_retries(fn: Callable[[], T], url: str, *, retries: int = 5, backoff: float = 0.5,
                 what: str = "read") -> T:
    """Call `fn()`; retry transient errors `retries` times (sleep backoff * 2**i), then StorageError."""
    attempt = 0
    while True:
        try:
            return fn()
        except BaseException as err:  # noqa: BLE001 - filtered by is_transient
            if not is_transient(err) or isinstance(err, StorageError):
                raise
            if attempt >= retries:
                raise StorageError(f"{what} {url}: failed after {attempt + 1} attempts "
                                   f"({type(err).__name__}: {err})") from err
            delay = backoff * (2 ** attempt)
            log.warning("%s %s: %s: %s; retry %d/%d in %.2fs", what, url, type(err).__name__, err,
                        attempt + 1, retries, delay)
            time.sleep(delay)
            attempt += 1


def read_bytes(url: str, storage_options: dict | None = None, *, retries: int = 5,
               backoff: float = 0.5) -> bytes:
    """Whole object at `url` as bytes, retried; FileNotFoundError names the URL."""
    fs, path = filesystem(url, storage_options)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    try:
        return with_retries(read, url, retries=retries, backoff=backoff, what="read")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{url}: not found") from err


def write_bytes(url: str, data: bytes, storage_options: dict | None = None, *, retries: int = 5,
                backoff: float = 0.5) -> None:
    """Write `data` to `url` (parent folders created), retried."""
    fs, path = filesystem(url, storage_options)

    def write() -> None:
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)

    with_retries(write, url, retries=retries, backoff=backoff, what="write")


def list_files(url: str, storage_options: dict | None = None, *, retries: int = 5,
               backoff: float = 0.5) -> dict[str, int]:
    """All files under folder `url` -> {path relative to url: size in bytes}; {} if absent."""
    fs, path = filesystem(url, storage_options)

    def find() -> dict:
        if not fs.exists(path):
            return {}
        return fs.find(path, detail=True)

    found = with_retries(find, url, retries=retries, backoff=backoff, what="list")
    root = path.rstrip("/") + "/"
    out = {}
    for name, info in found.items():
        if info.get("type", "file") != "file":
            continue
        name = name[len(root):] if name.startswith(root) else name.lstrip("/")
        out[name] = int(info.get("size") or 0)
    return out
