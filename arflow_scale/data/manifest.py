"""The shard folder's `manifest.json`: format version, sample shape/dtype, classes, per-shard facts.

A folder is a dataset only once its manifest exists (the writer writes it last). Each shard holds
samples of ONE class; the manifest records its relative path, class, sample count, bytes, sha256
and CRC-32. The stream checks the CRC-32 of every shard it reads (`checksum_mismatch`): it guards
against corruption as well as sha256 does at a third of the cost; `arflow data inspect --verify`
checks both.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from .storage import join_url, read_bytes

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SAMPLE_EXTENSIONS = ("png", "npy")


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the folder, e.g. "shards/c0003-00001.tar"
    cls: int
    count: int
    bytes: int
    sha256: str
    crc32: int | None = None  # zlib CRC-32 of the shard; None in manifests written before it was recorded


@dataclass
class Manifest:
    class_names: list[str]
    sample_shape: tuple[int, ...]  # (C, H, W) for images; the encoder's output shape for latents
    dtype: str  # stored dtype: "uint8" for png images, e.g. "float32" for npy latents
    sample_ext: str  # "png" or "npy"
    shards: list[ShardInfo]
    format_version: int = FORMAT_VERSION
    source: dict[str, Any] = field(default_factory=dict)
    url: str = ""  # folder URL this manifest was read from (not stored)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def class_counts(self) -> list[int]:
        """Samples per class, index = class id."""
        counts = [0] * self.num_classes
        for shard in self.shards:
            counts[shard.cls] += shard.count
        return counts

    def shard_url(self, shard: ShardInfo) -> str:
        return join_url(self.url, shard.path)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("url")
        out["sample_shape"] = list(self.sample_shape)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any], url: str = "") -> "Manifest":
        """Validate and build; errors name the manifest URL and the bad key."""
        where = join_url(url, MANIFEST_NAME) if url else MANIFEST_NAME

        def need(key: str, kind: type | tuple) -> Any:
            if key not in data:
                raise ValueError(f"{where}: missing key {key!r}")
            if not isinstance(data[key], kind):
                raise ValueError(f"{where}: key {key!r} has bad value {data[key]!r}")
            return data[key]

        version = need("format_version", int)
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: format_version {version} is not supported (expected {FORMAT_VERSION})")
        names = [str(n) for n in need("class_names", list)]
        shape = tuple(int(d) for d in need("sample_shape", list))
        ext = need("sample_ext", str)
        if ext not in SAMPLE_EXTENSIONS:
            raise ValueError(f"{where}: key 'sample_ext' has bad value {ext!r} (expected png or npy)")
        shards = []
        for i, raw in enumerate(need("shards", list)):
            try:
                crc32 = raw.get("crc32")
                shard = ShardInfo(path=str(raw["path"]), cls=int(raw["cls"]), count=int(raw["count"]),
                                  bytes=int(raw["bytes"]), sha256=str(raw["sha256"]),
                                  crc32=None if crc32 is None else int(crc32))
                if shard.crc32 is not None and not 0 <= shard.crc32 < 2 ** 32:
                    raise ValueError(f"crc32 {shard.crc32} is not a 32-bit checksum")
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{where}: shards[{i}] is malformed ({err!r}): {raw!r}") from None
            parts = shard.path.replace("\\", "/").split("/")
            if not shard.path or shard.path.startswith("/") or "://" in shard.path or ".." in parts:
                raise ValueError(f"{where}: shards[{i}].path = {shard.path!r} must be a relative path "
                                 f"inside the shard folder")
            if not 0 <= shard.cls < len(names):
                raise ValueError(f"{where}: shards[{i}].cls = {shard.cls} is not a class id "
                                 f"(0..{len(names) - 1})")
            shards.append(shard)
        return cls(class_names=names, sample_shape=shape, dtype=need("dtype", str), sample_ext=ext,
                   shards=shards, format_version=version, source=dict(data.get("source") or {}),
                   url=url)


def split_manifest_url(url: str) -> tuple[str, str]:
    """A folder URL or its manifest.json URL -> (folder URL, manifest URL)."""
    url = url.rstrip("/")
    if url.endswith("/" + MANIFEST_NAME) or url == MANIFEST_NAME:
        folder = url[: -len(MANIFEST_NAME)].rstrip("/")
        return folder, url
    return url, join_url(url, MANIFEST_NAME)


def read_manifest(url: str, storage_options: dict | None = None, *, retries: int = 5,
                  retry_backoff: float = 0.5) -> Manifest:
    """Read and validate the manifest of the shard folder `url` (or of `url` = .../manifest.json)."""
    folder, manifest_url = split_manifest_url(url)
    try:
        raw = read_bytes(manifest_url, storage_options, retries=retries, backoff=retry_backoff)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME} there; not a shard folder written by "
                                f"`arflow data shards` (or the writer did not finish)") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{manifest_url}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{manifest_url}: top level must be an object")
    return Manifest.from_dict(data, url=folder)


def checksum_mismatch(shard: ShardInfo, data: bytes, *, thorough: bool = False) -> list[str]:
    """The checksums of `shard` that `data` does not match ([] = intact).

    Streaming checks the CRC-32 (sha256 where the manifest has none); `thorough` checks both.
    """
    bad = []
    if shard.crc32 is not None and zlib.crc32(data) != shard.crc32:
        bad.append("crc32")
    if (thorough or shard.crc32 is None) and hashlib.sha256(data).hexdigest() != shard.sha256:
        bad.append("sha256")
    return bad


def verify_shards(manifest: Manifest, storage_options: dict | None = None, *, retries: int = 5,
                  retry_backoff: float = 0.5, workers: int = 4) -> list[dict[str, str]]:
    """Re-read every shard and compare bytes, sha256 and CRC-32 with the manifest -> list of problems."""
    from concurrent.futures import ThreadPoolExecutor

    def check(shard: ShardInfo) -> dict[str, str] | None:
        url = manifest.shard_url(shard)
        try:
            data = read_bytes(url, storage_options, retries=retries, backoff=retry_backoff)
        except FileNotFoundError:
            return {"shard": shard.path, "problem": "missing"}
        if len(data) != shard.bytes:
            return {"shard": shard.path, "problem": f"{len(data)} bytes, manifest says {shard.bytes}"}
        if bad := checksum_mismatch(shard, data, thorough=True):
            return {"shard": shard.path, "problem": f"{' and '.join(bad)} mismatch"}
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [p for p in pool.map(check, manifest.shards) if p is not None]
