"""Injected faults: transient storage errors (flaky fsspec protocol, a real S3 outage), corrupt /
truncated / checksum-mismatched shards, missing shards, a folder without manifest."""
from __future__ import annotations

import json
import logging
import shutil
import uuid
import warnings
from pathlib import Path

import boto3
import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from arflow_scale.data import SequenceStream, StorageError, write_shards
from test_data_stream import decode, id_source, take

PER_CLASS, PER_SHARD = 40, 5


class FlakyFileSystem(LocalFileSystem):
    """Local files behind a protocol whose first `failures_left` reads raise ConnectionResetError."""

    protocol = ("flaky",)
    failures_left = 0
    failures_seen = 0

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("flaky://"):] if path.startswith("flaky://") else path)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode and FlakyFileSystem.failures_left > 0:
            FlakyFileSystem.failures_left -= 1
            FlakyFileSystem.failures_seen += 1
            raise ConnectionResetError(f"injected transient failure reading {path}")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    url = tmp_path_factory.mktemp("pristine") / "shards"
    write_shards(id_source([PER_CLASS] * 5), str(url), samples_per_shard=PER_SHARD, progress=False)
    return url


@pytest.fixture()
def data(pristine, tmp_path) -> Path:
    """A private copy of the id shards the test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "shards"))


def shard_ids(cls: int, number: int) -> set[int]:
    start = cls * PER_CLASS + number * PER_SHARD
    return set(range(start, start + PER_SHARD))


def seen_ids(batches) -> set[int]:
    return {int(i) for images, _ in batches for i in decode(images)[0].ravel()}


def test_transient_errors_retried_then_clear_error(data):
    url = f"flaky://{data}"
    FlakyFileSystem.failures_left, FlakyFileSystem.failures_seen = 3, 0
    stream = SequenceStream.open(url, k=3, batch_size=4, retries=4, retry_backoff=0.01)  # manifest read retried
    assert FlakyFileSystem.failures_seen == 3
    assert len(take(stream, 3)) == 3
    fresh = SequenceStream.open(url, k=3, batch_size=4, retries=2, retry_backoff=0.01)
    FlakyFileSystem.failures_left, FlakyFileSystem.failures_seen = 10**6, 0  # storage goes away
    with pytest.raises(StorageError, match=r"flaky://.*/shards/c\d{4}-\d{5}\.tar: failed after 3 attempts"):
        take(fresh, 1)
    assert FlakyFileSystem.failures_seen == 3
    # The same error surfaces through DataLoader workers (forked with the storage still broken).
    FlakyFileSystem.failures_left = 0
    with_workers = SequenceStream.open(url, k=3, batch_size=4, retries=2, retry_backoff=0.01, num_workers=2)
    FlakyFileSystem.failures_left = 10**6
    with pytest.raises(StorageError, match=r"flaky://.*/shards/c\d{4}-\d{5}\.tar: failed after 3 attempts"):
        take(with_workers, 1)
    FlakyFileSystem.failures_left = 0


def test_real_s3_outage_retried_then_error(s3_endpoint):
    """Stop a real moto S3 server mid-stream: the read fails, is retried, and succeeds once the
    server is back (restarted when the first retry is announced); with the server gone for good
    the retries run out and the error names the shard URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = f"outage-{uuid.uuid4().hex[:8]}"  # moto's store is per process, shared by its servers
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    options = {"endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    write_shards(id_source([12, 12]), f"s3://{bucket}/ids", samples_per_shard=6, progress=False,
                 storage_options=options)
    stream = SequenceStream.open(f"s3://{bucket}/ids", k=3, batch_size=2, retries=6, retry_backoff=0.05,
                            storage_options=options)
    fresh = SequenceStream.open(f"s3://{bucket}/ids", k=3, batch_size=2, retries=1, retry_backoff=0.05,
                           storage_options=options)
    server.stop()
    restarted = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    retries_seen = []

    class RestartOnRetry(logging.Handler):
        def emit(self, record):
            retries_seen.append(record.getMessage())
            if len(retries_seen) == 1:
                restarted.start()

    handler = RestartOnRetry(level=logging.WARNING)
    storage_log = logging.getLogger("arflow_scale.data.storage")
    storage_log.addHandler(handler)
    try:
        images, _ = next(iter(stream))
    finally:
        storage_log.removeHandler(handler)
        restarted.stop()
    assert len(retries_seen) == 1 and f"s3://{bucket}/ids/shards/" in retries_seen[0]
    assert images.shape == (2, 3, 1, 4, 4)
    with pytest.raises(StorageError, match=rf"s3://{bucket}/ids/shards/c000\d-0000\d\.tar: failed after 2 attempts"):
        next(iter(fresh))


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "checksum":  # same size, one byte changed inside a PNG payload
        path.write_bytes(raw[:700] + bytes([raw[700] ^ 0xFF]) + raw[701:])
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # "bad_png": every PNG signature broken, size kept; caught by decoding, not sha256
        path.write_bytes(raw.replace(b"\x89PNG", b"\x00BAD"))


@pytest.mark.parametrize("how,verify", [("checksum", True), ("truncated", False), ("bad_png", False)])
def test_corrupt_shard_skipped_once_and_counted(data, how, verify):
    damage(data / "shards" / "c0001-00002.tar", how)
    stream = SequenceStream.open(str(data), k=3, batch_size=8, shuffle_buffer=8, verify_checksums=verify)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(stream, 40)  # 960 draws from 200 samples: several passes over class 1
    about = [w for w in caught if "c0001-00002.tar" in str(w.message)]
    assert len(about) == 1 and "corrupt" in str(about[0].message)
    assert stream.skipped_shards == 1
    ids = seen_ids(batches)
    assert not ids & shard_ids(1, 2)
    assert shard_ids(1, 3) <= ids  # the rest of the class still streams
    # A resumed stream keeps the count and does not warn again.
    resumed = SequenceStream.open(str(data), k=3, batch_size=8, shuffle_buffer=8, verify_checksums=verify)
    resumed.load_state_dict(stream.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        take(resumed, 5)
    assert resumed.skipped_shards == 1 and not [w for w in caught if "c0001-00002" in str(w.message)]


def edit_manifest(data: Path, edit) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["shards"]:
        edit(shard)
    (data / "manifest.json").write_text(json.dumps(manifest))


def corrupt_warnings(stream: SequenceStream, batches: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        take(stream, batches)
    return [str(w.message) for w in caught if "corrupt" in str(w.message)]


def test_stream_checks_crc32_or_sha256_of_older_manifests(data):
    """Streaming checks each shard's CRC-32; a manifest written without CRC-32s is checked by sha256;
    `inspect --verify` (verify_shards) checks both."""
    from arflow_scale.data.manifest import read_manifest
    from arflow_scale.data.verify import verify_shards

    damage(data / "shards" / "c0001-00002.tar", "checksum")
    (message,) = corrupt_warnings(SequenceStream.open(str(data), k=3, batch_size=8, shuffle_buffer=8), 40)
    assert "c0001-00002.tar" in message and "crc32 does not match" in message
    edit_manifest(data, lambda shard: shard.pop("crc32"))  # as written before CRC-32s were recorded
    (message,) = corrupt_warnings(SequenceStream.open(str(data), k=3, batch_size=8, shuffle_buffer=8), 40)
    assert "c0001-00002.tar" in message and "sha256 does not match" in message
    assert verify_shards(read_manifest(str(data))) == [{"shard": "shards/c0001-00002.tar", "problem": "sha256 mismatch"}]


def test_stream_relies_on_crc32_when_recorded(data):
    """With CRC-32s recorded the stream does not hash with sha256: a manifest whose sha256s are all
    wrong still streams every shard, while verify_shards names each one."""
    from arflow_scale.data.manifest import read_manifest
    from arflow_scale.data.verify import verify_shards

    edit_manifest(data, lambda shard: shard.update(sha256="0" * 64))
    stream = SequenceStream.open(str(data), k=3, batch_size=8, shuffle_buffer=8)
    assert not corrupt_warnings(stream, 40) and stream.skipped_shards == 0
    problems = verify_shards(read_manifest(str(data)))
    assert len(problems) == len(list((data / "shards").glob("*.tar")))
    assert {p["problem"] for p in problems} == {"sha256 mismatch"}


def test_class_with_only_corrupt_shards_left_out(data):
    for shard in (data / "shards").glob("c0004-*.tar"):
        damage(shard, "checksum")
    stream = SequenceStream.open(str(data), k=2, batch_size=10)
    with pytest.warns(RuntimeWarning):
        batches = take(stream, 10)
    assert stream.skipped_shards == PER_CLASS // PER_SHARD
    assert all((y != 4).all() for _, y in batches)


def test_missing_shard_error_or_skip(data):
    (data / "shards" / "c0002-00000.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing shard.*c0002-00000\.tar.*skip_missing"):
        SequenceStream.open(str(data), k=2, batch_size=4)
    with pytest.warns(RuntimeWarning, match="c0002-00000.tar"):
        stream = SequenceStream.open(str(data), k=2, batch_size=8, skip_missing=True)
    assert stream.missing_shards == 1
    ids = seen_ids(take(stream, 30))
    assert not ids & shard_ids(2, 0) and shard_ids(2, 1) <= ids


def test_no_manifest_clear_error(tmp_path, s3_endpoint, make_bucket):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.tar").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        SequenceStream.open(str(tmp_path / "stuff"), k=2, batch_size=2)
    bucket = make_bucket()
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nothing: no manifest.json"):
        SequenceStream.open(f"s3://{bucket}/nothing", k=2, batch_size=2)


def test_malformed_manifest_names_key(data):
    text = (data / "manifest.json").read_text().replace('"sample_ext": "png"', '"sample_ext": "jpg"')
    (data / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="manifest.json: key 'sample_ext' has bad value 'jpg'"):
        SequenceStream.open(str(data), k=2, batch_size=2)
    (data / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SequenceStream.open(str(data), k=2, batch_size=2)


def test_every_sample_of_healthy_data_streams(data):
    """Control for the fault tests: undamaged data streams all 200 ids, no warning, no skips."""
    stream = SequenceStream.open(str(data), k=3, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = seen_ids(take(stream, 40))
    assert ids == set(range(200)) and stream.skipped_shards == 0
    assert stream.epoch >= 1  # 40 batches of 8 sequences x 3 ids wrap the 200 ids at least once


@pytest.mark.parametrize("bad_path", ["../../etc/passwd", "/etc/passwd", "s3://other-bucket/x.tar", "shards/../../x.tar"])
def test_manifest_shard_paths_stay_inside_the_folder(data, bad_path):
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["path"] = bad_path
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shards\[0\]\.path = .* must be a relative path"):
        SequenceStream.open(str(data), k=2, batch_size=2)
