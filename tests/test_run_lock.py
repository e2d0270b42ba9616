"""The run lock: one driver per run folder, on a local folder and on a real S3 endpoint (moto server)."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from arflow_scale.train.lock_store import lock_store
from arflow_scale.train.run_lock import LOCK_NAME, LockRecord, RunLock, RunLockHeld
from conftest import REPO


def foreign_record(heartbeat_age: float, host: str = "another-host", pid: int = 4321) -> str:
    now = time.time()
    return LockRecord(owner="theirs", host=host, pid=pid, pid_namespace="0", started=now - 100,
                      heartbeat=now - heartbeat_age, heartbeat_seconds=1.0, missed_heartbeats=3).to_text()


@pytest.fixture(params=["local", "s3"])
def run_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    request.getfixturevalue("s3_endpoint")
    return f"s3://{request.getfixturevalue('make_bucket')('lock')}/runs/run"


def read_lock(run_url: str) -> dict:
    return json.loads(lock_store(f"{run_url}/{LOCK_NAME}", {}).read()[0])


def take_over(run_url: str) -> None:
    """Another driver takes the lock as a driver would: a swap on the version it read, read again and retried when
    the holder's heartbeat replaced that version in between (a swap on a stale version changes nothing)."""
    store = lock_store(f"{run_url}/{LOCK_NAME}", {})
    deadline = time.monotonic() + 10
    while store.swap(foreign_record(0), store.read()[1]) is None:
        assert time.monotonic() < deadline, "every takeover lost against the holder's heartbeat for 10 s"


def test_second_driver_is_refused_until_the_first_releases(run_url):
    with RunLock(run_url, heartbeat_seconds=30) as first:
        assert read_lock(run_url)["owner"] == first.record.owner
        with pytest.raises(RunLockHeld, match=rf"run folder {run_url} is in use by another `arflow train` "
                                              rf"\(host {socket.gethostname()}, pid {os.getpid()}, started .* "
                                              r"last heartbeat \d+ s ago\); a lock without a heartbeat for 180 s"):
            RunLock(run_url).acquire()
    assert lock_store(f"{run_url}/{LOCK_NAME}", {}).read() is None  # released: the file is gone
    with RunLock(run_url):
        pass


def test_heartbeat_refreshes_and_a_lost_lock_is_reported(run_url, caplog):
    lock = RunLock(run_url, heartbeat_seconds=0.2)
    lock.acquire()
    try:
        first = read_lock(run_url)["heartbeat"]
        time.sleep(1.0)
        assert read_lock(run_url)["heartbeat"] > first
        take_over(run_url)  # while the heartbeat runs every 0.2 s
        assert lock.lost.wait(5)
        assert "the run lock was taken over (host another-host, pid 4321" in caplog.text
    finally:
        lock.release()
    assert read_lock(run_url)["owner"] == "theirs"  # a lost lock is not deleted on release


def test_release_after_an_unnoticed_takeover_keeps_the_new_holders_lock(run_url):
    """Taken over since the last heartbeat: release must not delete the other driver's lock."""
    lock = RunLock(run_url, heartbeat_seconds=30)
    lock.acquire()
    lock_store(f"{run_url}/{LOCK_NAME}", {}).swap(foreign_record(0), lock.version)
    lock.release()
    assert read_lock(run_url)["owner"] == "theirs"


@pytest.mark.parametrize("age, stale", [(10.0, True), (0.0, False)])
def test_a_lock_without_heartbeats_is_stale(run_url, age, stale):
    """The holder's own settings (1 s x 3 missed) decide: a 10 s old heartbeat is stale, a fresh one is not."""
    assert lock_store(f"{run_url}/{LOCK_NAME}", {}).create(foreign_record(age)) is not None
    if stale:
        with RunLock(run_url, heartbeat_seconds=30) as lock:
            assert read_lock(run_url)["owner"] == lock.record.owner
    else:
        with pytest.raises(RunLockHeld, match="host another-host, pid 4321"):
            RunLock(run_url).acquire()


HOLDER = """
import sys, time
from arflow_scale.train.run_lock import RunLock
RunLock(sys.argv[1], heartbeat_seconds=600).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_on_this_host_frees_the_lock_at_once(tmp_path):
    """A driver SIGKILLed while holding the lock (its heartbeat still fresh) does not block the next one."""
    run_url = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run_url], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockHeld, match=f"pid {holder.pid}"):
            RunLock(run_url).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(run_url) as lock:
        assert read_lock(run_url)["owner"] == lock.record.owner


def _contend(run_url: str, barrier, results) -> None:
    barrier.wait()
    lock = RunLock(run_url, heartbeat_seconds=30)
    try:
        lock.acquire()
        results.put(("won", lock.record.owner))
    except RunLockHeld:
        results.put(("refused", None))
    barrier.wait()  # a winner holds the lock until every driver has tried, however slow its start
    lock.release()


@pytest.mark.parametrize("start", ["absent", "stale"])
def test_of_drivers_starting_together_exactly_one_wins(run_url, start):
    if start == "stale":
        lock_store(f"{run_url}/{LOCK_NAME}", {}).create(foreign_record(60))
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(5), context.Queue()
    workers = [context.Process(target=_contend, args=(run_url, barrier, results)) for _ in range(5)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    outcomes = [results.get(timeout=5) for _ in workers]
    assert sorted(kind for kind, _ in outcomes) == ["refused"] * 4 + ["won"]


def _create(url: str, barrier, results) -> None:
    store = lock_store(url, {"skip_instance_cache": True})
    barrier.wait()
    results.put(store.create("mine") is not None)


def test_the_s3_endpoint_creates_atomically_as_s3_does(s3_endpoint, make_bucket, monkeypatch):
    """The contention tests above rely on the endpoint's conditional create being atomic, as on S3. Every
    lookup of an object is slowed here to widen any gap between moto's check and its write (without the
    conftest's lock, most rounds had two or more winners)."""
    from moto.s3.models import S3Backend

    lookup = S3Backend.get_object

    def slow_lookup(self, *args, **kwargs):
        found = lookup(self, *args, **kwargs)
        time.sleep(0.02)
        return found

    monkeypatch.setattr(S3Backend, "get_object", slow_lookup)
    bucket = make_bucket("lock")
    context = multiprocessing.get_context("fork")
    for round_ in range(3):
        barrier, results = context.Barrier(4), context.Queue()
        creators = [context.Process(target=_create, args=(f"s3://{bucket}/r{round_}/{LOCK_NAME}", barrier, results))
                    for _ in range(4)]
        for c in creators:
            c.start()
        for c in creators:
            c.join(60)
        assert sorted(results.get(timeout=5) for _ in creators) == [False, False, False, True], round_


def _create_until_stopped(url: str, stop, intruded) -> None:
    store = lock_store(url, {})
    while not stop.is_set():
        if store.create("intruder") is not None:
            intruded.set()
            return


def test_a_local_takeover_never_frees_the_lock_name(tmp_path):
    """A swap replaces the lock in place, so a driver creating meanwhile never slips in. (Moving the old lock
    aside before linking the new one left a gap: once, two of five drivers starting together both won.)"""
    url = str(tmp_path / "run" / LOCK_NAME)
    store = lock_store(url, {})
    version = store.create("0")
    context = multiprocessing.get_context("fork")
    stop, intruded = context.Event(), context.Event()
    creator = context.Process(target=_create_until_stopped, args=(url, stop, intruded))
    creator.start()
    try:
        for turn in range(1, 2000):
            version = store.swap(str(turn), version)
            assert version == str(turn) and not intruded.is_set(), f"turn {turn}: another driver created the lock"
    finally:
        stop.set()
        creator.join(10)
    assert not intruded.is_set()


def test_a_folder_without_flock_is_refused_at_start_naming_it(tmp_path, monkeypatch):
    """Some shared mounts (Lustre without -o flock) answer flock with ENOSYS: the run stops at once with a
    ConfigError naming the folder, before any lock is written (not at the first heartbeat or takeover)."""
    import errno
    import fcntl

    from arflow_scale.config import ConfigError

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)  # the mount's answer; no such mount can be made here
    with pytest.raises(ConfigError, match=f"run.storage_path: {tmp_path / 'run'} is on a filesystem without flock"):
        RunLock(str(tmp_path / "run")).acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [f".{LOCK_NAME}.guard"]


def test_write_then_verify_storage(tmp_path):
    """Storage without conditional writes (here fsspec's memory://) reads its write back before it counts."""
    from arflow_scale.train.lock_store import VerifiedLockStore

    lock = RunLock("memory://runs/verified", heartbeat_seconds=30)
    assert isinstance(lock.store, VerifiedLockStore)
    lock.store.settle_seconds = 0.05
    lock.acquire()
    try:
        other = RunLock("memory://runs/verified")
        other.store.settle_seconds = 0.05
        with pytest.raises(RunLockHeld):
            other.acquire()
    finally:
        lock.release()


def test_s3_read_of_a_version_replaced_after_its_listing_reads_again(s3_endpoint, make_bucket):
    """s3fs reads with If-Match on the ETag it last saw; a lock swapped by another driver in between is read
    again, never an error (a race lost by the reader, as in the contention test above)."""
    url = f"s3://{make_bucket('lock')}/runs/run/{LOCK_NAME}"
    reader = lock_store(url, {})
    first = reader.create(foreign_record(0, pid=1))
    reader.fs.ls(reader.path.rsplit("/", 1)[0])  # the reader's listing now holds the first version's ETag
    other = lock_store(url, {"skip_instance_cache": True})  # another driver: its own client
    second = other.swap(foreign_record(0, pid=2), first)
    assert second is not None and second != first
    text, version = reader.read()
    assert version == second and json.loads(text)["pid"] == 2
