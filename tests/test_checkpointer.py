"""The trainer's own checkpoints: uploads (file list last), retention, leftovers of interrupted saves, and
storage outages retried with backoff, then a clear error naming the URL. A real local folder and a real S3
endpoint (moto server); one process, so no collectives."""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from pathlib import Path

import pytest

from arflow_scale.checkpoint import CheckpointRecord, is_complete, latest_checkpoint, list_checkpoints
from arflow_scale.config import CheckpointConfig
from arflow_scale.data.storage import StorageError
from arflow_scale.train.checkpointer import Checkpointer
from arflow_scale.train.state import write_listing

from conftest import free_port


def writer(step: int, payload: bytes = b"weights"):
    """What `save_state` does for one rank, in miniature: its files, the record, its file list last."""
    def write(folder: Path) -> None:
        (folder / "data").mkdir()
        (folder / "data" / "rank_0.pt").write_bytes(payload * step)
        (folder / "meta.json").write_text(CheckpointRecord(step=step, world_size=1, last_loss=0.5).to_json())
        write_listing(folder, 0)
    return write


def names(run_url: str, storage_options=None) -> list[str]:
    return [url.rsplit("/", 1)[-1] for url in list_checkpoints(run_url, storage_options)]


def test_save_keeps_the_newest_complete_and_removes_leftovers(tmp_path):
    run = tmp_path / "run"
    keeper = Checkpointer(str(run), {}, CheckpointConfig(keep_last=2), rank=0)
    assert keeper.latest() == (None, None)
    for step in (2, 4):
        assert keeper.save(step, writer(step)) == f"{run}/checkpoint_{step:09d}"
    # an interrupted save of step 6 (no file list) and one of step 9 (newer than anything complete)
    for step in (6, 9):
        (run / f"checkpoint_{step:09d}" / "data").mkdir(parents=True)
        (run / f"checkpoint_{step:09d}" / "data" / "rank_0.pt").write_bytes(b"half")
    assert keeper.latest()[0] == f"{run}/checkpoint_000000004"
    keeper.save(6, writer(6))  # replaces the leftover of step 6, then prunes
    assert names(str(run)) == ["checkpoint_000000004", "checkpoint_000000006", "checkpoint_000000009"]
    assert is_complete(f"{run}/checkpoint_000000006") and not is_complete(f"{run}/checkpoint_000000009")
    assert (run / "checkpoint_000000006" / "data" / "rank_0.pt").read_bytes() == b"weights" * 6
    url, record = keeper.latest()
    assert url == f"{run}/checkpoint_000000006" and record.step == 6
    listing = json.loads((run / "checkpoint_000000006" / "ranks" / "rank_0.json").read_text())
    assert set(listing["files"]) == {"data/rank_0.pt", "meta.json"}


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    keeper = Checkpointer(str(run), {}, CheckpointConfig(keep_last=1), rank=0)
    keeper.save(2, writer(2))

    def crashes(folder: Path) -> None:
        writer(4)(folder)
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed"):
        keeper.save(4, crashes)
    assert latest_checkpoint(str(run)) == f"{run}/checkpoint_000000002"


class CuttableLink:
    """A TCP forwarder to the S3 endpoint whose link can be cut (connections refused, open ones dropped) and
    restored on the same port: a network outage between a rank and its object store."""

    def __init__(self, target: str):
        self.target = int(target.rsplit(":", 1)[1])
        self.port = free_port()
        self.sockets: list[socket.socket] = []
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self.sockets.append(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture()
def link(s3_endpoint):
    outage = CuttableLink(s3_endpoint)
    yield outage
    outage.cut()


def s3_options(endpoint: str) -> dict:
    """Our retries only (not botocore's), and a new connection per request (a cut link refuses them)."""
    connection = {"force_close": True, "keepalive_timeout": None}
    return {"endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}, "connector_args": connection}}


def test_fetch_downloads_what_a_rank_needs(link, make_bucket, tmp_path):
    run_url = f"s3://{make_bucket('fetch')}/runs/f"
    keeper = Checkpointer(run_url, s3_options(link.endpoint), CheckpointConfig(), rank=0)
    url = keeper.save(2, writer(2))
    local = keeper.fetch(url, tmp_path / "one", wanted=lambda rel: rel != "data/rank_0.pt")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == \
        ["meta.json", "ranks/rank_0.json"]
    everything = keeper.fetch(url, tmp_path / "all")
    assert (everything / "data" / "rank_0.pt").read_bytes() == b"weights" * 2
    on_disk = Checkpointer(str(tmp_path / "run"), {}, CheckpointConfig(), rank=0)
    assert on_disk.fetch(on_disk.save(2, writer(2)), tmp_path / "unused") == tmp_path / "run" / "checkpoint_000000002"


class RestoreOnRetry(logging.Handler):
    """Restores the link when storage logs its first retry: the outage lasts exactly one failed attempt."""

    def __init__(self, link: CuttableLink):
        super().__init__(logging.WARNING)
        self.link, self.messages = link, []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if len(self.messages) == 1:
            self.link.restore()


def test_an_s3_outage_during_an_upload_is_retried(link, make_bucket):
    run_url = f"s3://{make_bucket('outage')}/runs/outage"
    keeper = Checkpointer(run_url, s3_options(link.endpoint), CheckpointConfig(upload_retries=3, upload_backoff=0.2),
                          rank=0)
    keeper.save(2, writer(2))

    def write_then_cut(folder: Path) -> None:
        writer(4)(folder)
        link.cut()  # the store goes away before the upload starts

    retries = RestoreOnRetry(link)
    logging.getLogger("arflow_scale.data.storage").addHandler(retries)
    try:
        assert keeper.save(4, write_then_cut) == f"{run_url}/checkpoint_000000004"
    finally:
        logging.getLogger("arflow_scale.data.storage").removeHandler(retries)
    assert len(retries.messages) == 1 and retries.messages[0].startswith(f"upload {run_url}/checkpoint_000000004/")
    assert "retry 1/3" in retries.messages[0]
    assert latest_checkpoint(run_url, s3_options(link.endpoint)) == f"{run_url}/checkpoint_000000004"


def test_an_s3_outage_that_lasts_fails_naming_the_url_and_keeps_the_last_checkpoint(link, make_bucket):
    run_url = f"s3://{make_bucket('outage')}/runs/down"
    keeper = Checkpointer(run_url, s3_options(link.endpoint), CheckpointConfig(upload_retries=2, upload_backoff=0.05),
                          rank=0)
    keeper.save(2, writer(2))

    def write_then_cut(folder: Path) -> None:
        writer(4)(folder)
        link.cut()

    with pytest.raises(StorageError, match=rf"upload {run_url}/checkpoint_000000004/data/rank_0.pt: failed after "
                                           r"3 attempts \(EndpointConnectionError"):
        keeper.save(4, write_then_cut)
    link.restore()
    assert latest_checkpoint(run_url, s3_options(link.endpoint)) == f"{run_url}/checkpoint_000000002"
