"""Finding and reading checkpoints in a run folder on any fsspec store (local, s3://, ...).

A checkpoint counts once it is complete (`is_complete`): its record and every rank's file list are
present and every listed file has its size, so a crash during an upload never yields a half checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from arflow_scale.config import Config, config_from_dict
from arflow_scale.data.storage import filesystem, is_local_url, local_path, with_retries
from arflow_scale.schema import drop_masked

from .layout import CHECKPOINT_NAME, CONFIG, META, rank_listing
from .record import CheckpointRecord


def _read_text(fs, path: str) -> str:
    with fs.open(path, "r") as f:
        return f.read()


def read_record(checkpoint_url: str, storage_options: Optional[dict] = None) -> CheckpointRecord:
    """The CheckpointRecord of a checkpoint folder."""
    fs, path = filesystem(checkpoint_url, storage_options)
    where = f"{checkpoint_url.rstrip('/')}/{META}"
    return CheckpointRecord.from_json(_read_text(fs, f"{path.rstrip('/')}/{META}"), where)


def read_config(checkpoint_url: str, storage_options: Optional[dict] = None) -> Config:
    """The resolved Config a checkpoint was written with (masked secrets dropped: they come from the
    environment again)."""
    fs, path = filesystem(checkpoint_url, storage_options)
    tree = yaml.safe_load(_read_text(fs, f"{path.rstrip('/')}/{CONFIG}")) or {}
    return config_from_dict(drop_masked(tree))


def _file_sizes(fs, path: str) -> dict[str, int]:
    """{path relative to folder `path`: size} of every file under it (one listing, not one request per file)."""
    found = fs.find(path, detail=True)
    return {name[len(path) + 1:]: int(info.get("size") or 0) for name, info in found.items()
            if info.get("type", "file") == "file"}


def is_complete(checkpoint_url: str, storage_options: Optional[dict] = None) -> bool:
    """True when meta.json and every rank's file list are present with all files at their sizes."""
    fs, path = filesystem(checkpoint_url, storage_options)
    path = path.rstrip("/")
    fs.invalidate_cache(path)
    try:
        record = CheckpointRecord.from_json(_read_text(fs, f"{path}/{META}"), checkpoint_url)
        sizes = _file_sizes(fs, path)
        for rank in range(record.world_size):
            listing: dict[str, Any] = json.loads(_read_text(fs, f"{path}/{rank_listing(rank)}"))
            if any(sizes.get(rel) != size for rel, size in listing["files"].items()):
                return False
    except (FileNotFoundError, NotADirectoryError, KeyError, ValueError):
        return False
    return True


def list_checkpoints(run_url: str, storage_options: Optional[dict] = None) -> list[str]:
    """URLs of the checkpoint folders under `run_url`, oldest first (complete or not)."""
    fs, path = filesystem(run_url, storage_options)
    fs.invalidate_cache()  # object-store listings are cached per filesystem instance
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path.rstrip("/"), detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [f"{run_url.rstrip('/')}/{n}" for n in sorted(n for n in names if CHECKPOINT_NAME.fullmatch(n))]


def latest_checkpoint(run_url: str, storage_options: Optional[dict] = None) -> Optional[str]:
    """URL of the newest complete checkpoint under the run folder `run_url`, or None."""
    for url in reversed(list_checkpoints(run_url, storage_options)):
        if is_complete(url, storage_options):
            return url
    return None


def fetch_checkpoint(checkpoint_url: str, into: str | Path, storage_options: Optional[dict] = None, *,
                     wanted: Callable[[str], bool] = lambda rel: True, retries: int = 5,
                     backoff: float = 0.5) -> Path:
    """A local folder holding a checkpoint's files: the folder itself when it is local, else the files for which
    `wanted(relative path)` holds, downloaded into `into` (each retried on transient errors, then StorageError)."""
    if is_local_url(checkpoint_url):
        return local_path(checkpoint_url)
    fs, path = filesystem(checkpoint_url, storage_options)
    path = path.rstrip("/")
    sizes = with_retries(lambda: _file_sizes(fs, path), checkpoint_url, retries=retries, backoff=backoff, what="list")
    into = Path(into)
    for rel in sorted(r for r in sizes if wanted(r)):
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        with_retries(lambda rel=rel: fs.get_file(f"{path}/{rel}", str(into / rel)),
                     f"{checkpoint_url.rstrip('/')}/{rel}", retries=retries, backoff=backoff, what="download")
    return into


def resolve_checkpoint(url: str, storage_options: Optional[dict] = None) -> str:
    """A checkpoint folder URL, or a run folder URL (-> its latest complete checkpoint)."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(f"{path.rstrip('/')}/{META}"):
        if not is_complete(url, storage_options):
            raise ValueError(f"{url}: checkpoint is incomplete (a rank's files are missing)")
        return url.rstrip("/")
    latest = latest_checkpoint(url, storage_options)
    if latest is None:
        raise FileNotFoundError(f"{url}: neither a checkpoint (no {META}) nor a run folder with one")
    return latest
