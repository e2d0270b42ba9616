"""The raw side of `arflow bench data`: whole-shard fsspec reads at the stream's concurrency, and a
local filesystem whose every read comes from the disk rather than the page cache.

`RawReader` reads the shards of a manifest with `fs.cat_file`, round-robin, in as many readers as
the stream has fetching: `processes` spawned processes (the stream's DataLoader workers; 0 = this
process) of `threads` threads each (its prefetch threads). It is driven in slices (`run_for`), so
the benchmark can alternate it with the stream under the same machine load.
"""
from __future__ import annotations

import multiprocessing
import os
import time

from fsspec import register_implementation
from fsspec.implementations.local import LocalFileSystem

from .sides import BenchSide, ShardLoop

from arflow_scale.data import read_manifest
from arflow_scale.data.storage import filesystem

COLD_PROTOCOL = "arflow-cold"


class ColdLocalFileSystem(LocalFileSystem):
    """Local files, each dropped from the page cache (posix_fadvise DONTNEED) after it is read whole,
    so the next read of it comes from the disk: raw and stream then both measure disk reads, not a
    memcpy from RAM. URLs: `arflow-cold:///abs/path`."""

    protocol = (COLD_PROTOCOL,)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{COLD_PROTOCOL}://"):
            path = path[len(COLD_PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        drop_page_cache(self._strip_protocol(path))
        return data


def drop_page_cache(path: str) -> None:
    """Ask the kernel to forget the cached pages of a file (clean pages only; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


register_implementation(COLD_PROTOCOL, ColdLocalFileSystem, clobber=True)


def shard_paths(url: str, options: dict) -> tuple[object, list[str], list[int]]:
    """-> (filesystem, path of every shard, its manifest size)."""
    manifest = read_manifest(url, options)
    fs = filesystem(manifest.url, options)[0]
    paths = [filesystem(manifest.shard_url(s), options)[1] for s in manifest.shards]
    return fs, paths, [s.bytes for s in manifest.shards]


def _readers(url: str, options: dict, threads: int, first: int = 0) -> ShardLoop:
    """Threads reading whole shards with `cat_file` (the connection warmed first, like the stream's)."""
    fs, paths, sizes = shard_paths(url, options)

    def read(i: int) -> int:
        data = fs.cat_file(paths[i])
        if len(data) != sizes[i]:
            raise RuntimeError(f"{paths[i]}: read {len(data)} bytes, manifest says {sizes[i]}")
        return len(data)

    fs.cat_file(paths[first % len(paths)])
    return ShardLoop(read, len(paths), threads, first)


def _serve(conn, url: str, options: dict, threads: int, first: int) -> None:
    """A raw-reader process: answer each slice request (seconds) with (bytes, seconds); an error is
    sent back as text and ends the process."""
    try:
        readers = _readers(url, options, threads, first)
        conn.send("ready")
        while (seconds := conn.recv()) is not None:
            conn.send(readers.run_for(seconds))
    except Exception as err:  # noqa: BLE001 - reported by the parent, which raises it
        conn.send(f"{type(err).__name__}: {err}")


def _answer(conn):
    """A raw-reader process's reply; its error text raised here."""
    reply = conn.recv()
    if isinstance(reply, str) and reply != "ready":
        raise RuntimeError(f"raw reader process: {reply}")
    return reply


class RawReader(BenchSide):
    """Whole-shard fsspec reads by `processes` x `threads` concurrent readers (see module docstring)."""
    def __init__(self, url: str, options: dict, processes: int = 0, threads: int = 1):
        self.readers = max(processes, 1) * threads
        self.local = _readers(url, options, threads) if processes == 0 else None
        self.conns, self.procs = [], []
        if processes:
            ctx = multiprocessing.get_context("spawn")  # this process runs threads: never fork it
            for p in range(processes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(child, url, options, threads, p), daemon=True)
                proc.start()
                self.conns.append(parent)
                self.procs.append(proc)
            for conn in self.conns:
                _answer(conn)

    def _slice(self, seconds: float) -> tuple[int, float]:
        if self.local is not None:
            return self.local.run_for(seconds)
        start = time.perf_counter()
        for conn in self.conns:
            conn.send(seconds)
        return sum(_answer(conn)[0] for conn in self.conns), time.perf_counter() - start

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
