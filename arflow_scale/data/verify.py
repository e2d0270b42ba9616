"""`arflow data inspect --verify`: every shard through the checks the stream itself makes, and more.

Per shard: present, its size, both checksums (sha256 and CRC-32, where the stream checks one), then the
stream's own verification and decoding (`consumer.verify_and_decode`) of every sample: the sample count,
each sample's class and file type, decodable bytes of the manifest's shape. So a shard passes only if the
stream would use all of it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .consumer import verify_and_decode
from .manifest import Manifest, ShardInfo, checksum_mismatch
from .storage import read_bytes


def shard_problem(manifest: Manifest, index: int, storage_options: dict | None = None, *, retries: int = 5,
                  retry_backoff: float = 0.5) -> str | None:
    """What is wrong with shard `index` of `manifest` (None: the stream would read all of it)."""
    shard: ShardInfo = manifest.shards[index]
    try:
        data = read_bytes(manifest.shard_url(shard), storage_options, retries=retries, backoff=retry_backoff)
    except FileNotFoundError:
        return "missing"
    if len(data) != shard.bytes:
        return f"{len(data)} bytes, manifest says {shard.bytes}"
    if bad := checksum_mismatch(shard, data, thorough=True):
        return f"{' and '.join(bad)} mismatch"
    try:
        verify_and_decode(data, manifest, index, range(shard.count), verify=True)
    except Exception as err:  # noqa: BLE001 - whatever the stream would reject the shard for
        return f"the stream rejects it: {type(err).__name__}: {err}"
    return None


def verify_shards(manifest: Manifest, storage_options: dict | None = None, *, retries: int = 5,
                  retry_backoff: float = 0.5, workers: int = 4) -> list[dict[str, str]]:
    """Every shard of `manifest` checked (`shard_problem`, `workers` at once) -> [{"shard", "problem"}]."""

    def check(index: int) -> dict[str, str] | None:
        problem = shard_problem(manifest, index, storage_options, retries=retries, retry_backoff=retry_backoff)
        return None if problem is None else {"shard": manifest.shards[index].path, "problem": problem}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [p for p in pool.map(check, range(len(manifest.shards))) if p is not None]
