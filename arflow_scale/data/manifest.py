"""The shard folder's `manifest.json`: format version, sample shape/dtype, classes, per-shard facts.

A folder is a dataset only once its manifest exists (the writer writes it last). Each shard holds
samples of ONE class; the manifest records its relative path, class, sample count, bytes, sha256
and CRC-32. The stream checks the CRC-32 of every shard it reads (`checksum_mismatch`): it guards
against corruption as well as sha256 does at a third of the cost; `arflow data inspect --verify`
checks both. A latent folder encoded by our VAE path also records how (`LatentEncoding`: the VAE's
identity, image size, latent shape, flip copies); manifests without it still read (`latents` None).
`verify.py` re-reads a folder's shards and checks them as the stream would.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from arflow_scale.model.vae_identity import VaeIdentity
from .storage import join_url, read_bytes

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SAMPLE_EXTENSIONS = ("png", "npy")
SPLITS = ("train", "val")  # val shards are held out: never streamed for training, read by the validation set


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the folder, e.g. "shards/c0003-00001.tar"
    cls: int
    count: int
    bytes: int
    sha256: str
    crc32: int | None = None  # zlib CRC-32 of the shard; None in manifests written before it was recorded
    split: str = "train"  # "train", or "val" for held-out validation shards


@dataclass(frozen=True)
class LatentEncoding:
    """How a latent folder was encoded: by which VAE, from which image size, into which shape."""
    vae: VaeIdentity
    image_size: int  # images were resized (ADM center crop) to this side before encoding
    latent_shape: tuple[int, int, int]  # (c, h, w) of one image's latents, scale factor applied
    flip_copy: bool = False  # each stored sample is (2, c, h, w): the image's latents, then its mirror image's
    sample_seed: int | None = None  # vae.encode_mode "sample": the seed of the per-image posterior draws

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of one stored .npy sample."""
        return (2, *self.latent_shape) if self.flip_copy else tuple(self.latent_shape)

    def to_dict(self) -> dict[str, Any]:
        return {"vae": self.vae.to_dict(), "image_size": self.image_size, "latent_shape": list(self.latent_shape),
                "flip_copy": self.flip_copy, "sample_seed": self.sample_seed}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "LatentEncoding":
        """Validate and build; errors name `where` (the manifest) and the bad key."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: key 'latents' has bad value {data!r}")
        for key, kind in (("vae", dict), ("image_size", int), ("latent_shape", list), ("flip_copy", bool)):
            if key not in data:
                raise ValueError(f"{where}: missing key 'latents.{key}'")
            if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
                raise ValueError(f"{where}: key 'latents.{key}' has bad value {data[key]!r}")
        shape = data["latent_shape"]
        if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(f"{where}: key 'latents.latent_shape' has bad value {shape!r} (expected [c, h, w])")
        seed = data.get("sample_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{where}: key 'latents.sample_seed' has bad value {seed!r}")
        return cls(vae=VaeIdentity.from_dict(data["vae"], where=f"{where}: latents.vae"),
                   image_size=data["image_size"], latent_shape=tuple(shape), flip_copy=data["flip_copy"],
                   sample_seed=seed)


@dataclass
class Manifest:
    class_names: list[str]
    sample_shape: tuple[int, ...]  # stored: (C, H, W) for images; the encoder's output shape for latents
    dtype: str  # stored dtype: "uint8" for png images, e.g. "float32" for npy latents
    sample_ext: str  # "png" or "npy"
    shards: list[ShardInfo]
    format_version: int = FORMAT_VERSION
    source: dict[str, Any] = field(default_factory=dict)
    url: str = ""  # folder URL this manifest was read from (not stored)
    latents: LatentEncoding | None = None  # how the latents were encoded; None for images and other encoders

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def item_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image a stream yields (with flip copies: one of a stored sample's two)."""
        return tuple(self.latents.latent_shape) if self.latents else tuple(self.sample_shape)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def class_counts(self, split: str = "train") -> list[int]:
        """Samples per class in `split`, index = class id."""
        counts = [0] * self.num_classes
        for shard in self.shards:
            if shard.split == split:
                counts[shard.cls] += shard.count
        return counts

    def shard_indices(self, split: str) -> list[int]:
        """Indices (into `shards`) of the shards of one split."""
        return [i for i, shard in enumerate(self.shards) if shard.split == split]

    def shard_url(self, shard: ShardInfo) -> str:
        return join_url(self.url, shard.path)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("url")
        out["sample_shape"] = list(self.sample_shape)
        out["latents"] = self.latents.to_dict() if self.latents else None
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
                                  crc32=None if crc32 is None else int(crc32), split=str(raw.get("split", "train")))
                if shard.crc32 is not None and not 0 <= shard.crc32 < 2 ** 32:
                    raise ValueError(f"crc32 {shard.crc32} is not a 32-bit checksum")
                if shard.split not in SPLITS:
                    raise ValueError(f"split {shard.split!r} is not one of {SPLITS}")
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
        latents = None if data.get("latents") is None else LatentEncoding.from_dict(data["latents"], where)
        if latents is not None and (ext != "npy" or latents.stored_shape != shape):
            raise ValueError(f"{where}: key 'latents' describes npy samples of shape {list(latents.stored_shape)}, "
                             f"the manifest has {ext} samples of shape {list(shape)}")
        return cls(class_names=names, sample_shape=shape, dtype=need("dtype", str), sample_ext=ext,
                   shards=shards, format_version=version, source=dict(data.get("source") or {}),
                   url=url, latents=latents)


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
