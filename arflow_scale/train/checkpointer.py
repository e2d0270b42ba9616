"""The checkpoints a training run owns (torchtitan's CheckpointManager is the model): writing, uploading,
retention, and finding the one to resume from. Ray Train only sees metrics.

Saving step s: rank 0 first removes what an interrupted save of step s left behind; then every rank writes its
part of the state into a local folder (`train.state.save_state`) and uploads it into
`<run folder>/checkpoint_<s>/`, its file list (`ranks/rank_<r>.json`) last, so `checkpoint.is_complete` holds
only once every rank's upload finished. Transient storage errors are retried with exponential backoff
(`checkpoint.upload_retries`, `checkpoint.upload_backoff`), then the save fails with a StorageError naming the
URL (a worker failure: `run.max_failures` applies). When every rank is done, rank 0 keeps the newest
`checkpoint.keep_last` complete checkpoints and deletes older ones and older leftovers; nothing newer than the
newest complete checkpoint is ever deleted, so a save that fails or is killed half way leaves the previous
checkpoints usable. Every saved state is finite (the trainer checks before saving), so all complete checkpoints
count for retention.

Resuming: rank 0 finds the newest complete checkpoint of the run folder (`checkpoint.latest_checkpoint`) and
every rank takes its answer; whatever Ray Train's own snapshot says is not consulted.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist

from arflow_scale.checkpoint import (CheckpointRecord, checkpoint_dir_name, checkpoint_step, is_complete,
                                     latest_checkpoint, list_checkpoints, read_record)
from arflow_scale.checkpoint.layout import rank_listing
from arflow_scale.checkpoint.store import fetch_checkpoint
from arflow_scale.config import CheckpointConfig
from arflow_scale.data.storage import filesystem, with_retries

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if _distributed():
        dist.barrier()


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Checkpointer:
    """One rank's handle on the checkpoints of run folder `run_url` (any fsspec URL)."""

    def __init__(self, run_url: str, storage_options: dict[str, Any], cfg: CheckpointConfig, rank: int):
        self.run_url = run_url.rstrip("/")
        self.options = dict(storage_options)
        self.cfg = cfg
        self.rank = rank

    def url(self, step: int) -> str:
        return f"{self.run_url}/{checkpoint_dir_name(step)}"

    def latest(self) -> tuple[Optional[str], Optional[CheckpointRecord]]:
        """The newest complete checkpoint of the run folder and its record, or (None, None) (a collective: rank 0
        looks, every rank gets its answer)."""
        found: tuple[Optional[str], Optional[CheckpointRecord]] = (None, None)
        if self.rank == 0:
            url = latest_checkpoint(self.run_url, self.options)
            found = (url, read_record(url, self.options) if url else None)
        return from_rank0(found)

    def fetch(self, checkpoint_url: str, into: str | Path, wanted: Callable[[str], bool] = lambda rel: True) -> Path:
        """A local folder with the checkpoint's files that `wanted` selects (the folder itself when local)."""
        return fetch_checkpoint(checkpoint_url, into, self.options, wanted=wanted, retries=self.cfg.upload_retries,
                                backoff=self.cfg.upload_backoff)

    def save(self, step: int, write: Callable[[Path], None]) -> str:
        """Every rank calls it: `write(folder)` puts this rank's files into an empty local folder; returns the
        checkpoint's URL once every rank's part is uploaded (older checkpoints are then pruned)."""
        url = self.url(step)
        if self.rank == 0:
            self._remove(url, "what an interrupted save left in")
        barrier()
        with tempfile.TemporaryDirectory(prefix=f"arflow_ckpt_r{self.rank}_") as folder:
            write(Path(folder))
            self._upload(Path(folder), url)
        barrier()
        if self.rank == 0:
            self._keep_last()
        return url

    def _retry(self, fn: Callable[[], Any], url: str, what: str) -> Any:
        return with_retries(fn, url, retries=self.cfg.upload_retries, backoff=self.cfg.upload_backoff, what=what)

    def _upload(self, folder: Path, url: str) -> None:
        """Every file of `folder` to `url`, this rank's file list last."""
        fs, path = filesystem(url, self.options)
        listing = folder / rank_listing(self.rank)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p != listing) + [listing]
        made: set[str] = set()
        for local in files:
            rel = local.relative_to(folder).as_posix()
            target = f"{path.rstrip('/')}/{rel}"
            parent = target.rsplit("/", 1)[0]
            if parent not in made:
                self._retry(lambda parent=parent: fs.makedirs(parent, exist_ok=True), f"{url}/{rel}", "upload")
                made.add(parent)
            self._retry(lambda local=local, target=target: fs.put_file(str(local), target), f"{url}/{rel}", "upload")

    def _remove(self, url: str, why: str) -> None:
        fs, path = filesystem(url, self.options)
        fs.invalidate_cache(path)
        if self._retry(lambda: fs.exists(path), url, "list"):
            log.warning("removing %s %s", why, url)
            self._retry(lambda: fs.rm(path, recursive=True), url, "delete")

    def _keep_last(self) -> None:
        """Delete complete checkpoints older than the newest `keep_last` ones, and leftovers of interrupted saves
        older than the newest complete one (best effort: a storage error is logged, training goes on)."""
        try:
            urls = list_checkpoints(self.run_url, self.options)
            complete = [u for u in urls if is_complete(u, self.options)]
            if not complete:
                return
            keep, newest = set(complete[-self.cfg.keep_last:]), checkpoint_step(complete[-1])
            for url in urls:
                if url not in keep and checkpoint_step(url) < newest:
                    fs, path = filesystem(url, self.options)
                    self._retry(lambda fs=fs, path=path: fs.rm(path, recursive=True), url, "delete")
        except Exception as err:  # noqa: BLE001 - retention must not end a run whose checkpoint is safe
            log.warning("could not prune old checkpoints of %s: %s: %s", self.run_url, type(err).__name__, err)
