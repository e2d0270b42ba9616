"""One consumer (rank, DataLoader worker) of a SequenceStream: shard split, class readers, batches.

See `stream.py` for the split policy, the determinism scheme and the state layout.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from einops import rearrange

from arflow_scale.config.data import DataConfig

from .class_reader import ClassDead, ClassReader
from .decode import CorruptShard, decode_shard
from .manifest import Manifest, checksum_mismatch
from .prefetch import UnitPrefetcher, _Cancelled
from .sample_sets import ClassSampleSets
from .storage import filesystem, with_retries
from .units import SAMPLE_BITS, _Unit, plan_units

UnitSamples = tuple[list[int], list[np.ndarray]]  # a unit's sample ids and decoded samples, in order


def verify_and_decode(data: bytes, manifest: Manifest, shard: int, positions: range, verify: bool) -> list[np.ndarray]:
    """Shard `shard`'s bytes -> its decoded samples at `positions`: the work a stream does per unit.

    Raises CorruptShard when the size (or, with `verify`, the checksum: `checksum_mismatch`) differs
    from the manifest, or the bytes do not decode to what the manifest describes.
    """
    info = manifest.shards[shard]
    if len(data) != info.bytes:
        raise CorruptShard(f"{len(data)} bytes, manifest says {info.bytes} (truncated?)")
    if verify and (bad := checksum_mismatch(info, data)):
        raise CorruptShard(f"{bad[0]} does not match the manifest")
    return decode_shard(data, info.path, manifest.sample_ext, manifest.sample_shape, info.cls, info.count,
                        positions, check_headers=not verify)


@dataclass(frozen=True)
class StreamSpec:
    """What every consumer of one stream reads and how: the data section, the manifest and its present
    shards, K and the stream's place in the run (seed, rank, world size)."""

    data: DataConfig
    manifest: Manifest
    shards: tuple[int, ...]
    k: int
    seed: int
    rank: int
    world_size: int

    @property
    def workers(self) -> int:
        """Logical loader workers per rank (at least one, the rank itself)."""
        return max(self.data.num_workers, 1)


class ConsumerStream:
    """One consumer (rank, worker): builds batches and tracks its resumable state."""

    def __init__(self, spec: StreamSpec, worker: int, state: dict):
        self.spec, self.worker = spec, worker
        self.manifest: Manifest = spec.manifest
        workers = spec.workers
        self.key = [spec.seed, spec.rank, spec.world_size, workers, worker]
        consumer = spec.rank * workers + worker
        self.units = plan_units(self.manifest, list(spec.shards), consumer, spec.world_size * workers)
        self.batch = int(state.get("batch", 0))
        self.bad = set(state.get("bad", []))
        self.dead = set(state.get("dead", []))
        self.warned: set[int] = set(self.bad)
        self._sample_sets: ClassSampleSets | None = None
        self.readers = {c: ClassReader(self, c, u) for c, u in self.units.items()}
        small = [c for c, r in self.readers.items() if r.owned < spec.k]
        if small and not state.get("batch"):
            warnings.warn(f"{self.manifest.url}: classes {small} have fewer than K={spec.k} samples for "
                          f"consumer rank {spec.rank} worker {worker}; they are left out", RuntimeWarning)
        self.dead |= set(small)
        for cls, cls_state in state.get("classes", {}).items():
            self.readers[int(cls)].load_state(cls_state)
        counts = self.manifest.class_counts()
        self.weights = {c: float(counts[c]) for c in self.readers}
        self._alive_cache: tuple[int, list[int], np.ndarray] | None = None
        self._fs = None
        depth = spec.data.prefetch
        self.prefetcher = UnitPrefetcher(self.prepare_unit, depth) if depth > 0 else None

    def close(self) -> None:
        """Stop the prefetch thread (waits for the fetch in flight)."""
        if self.prefetcher is not None:
            self.prefetcher.close()

    def sample_sets(self) -> ClassSampleSets:
        """The codec of the per-class sample-id sets in resized states (built on first use)."""
        if self._sample_sets is None:
            self._sample_sets = ClassSampleSets(self.manifest)
        return self._sample_sets

    # ----- shard reading -----
    def fs(self):
        if self._fs is None:
            self._fs = filesystem(self.manifest.url, self.spec.data.storage_options)[0]
        return self._fs

    def load_unit(self, unit: _Unit, allow_bad: bool = False) -> UnitSamples | None:
        """Read, verify and decode a unit -> (sample ids, decoded samples), None if corrupt."""
        if unit.shard in self.bad and not allow_bad:
            return None
        data = self._fetch(unit.shard)
        try:
            return self._decode_unit(data, unit)
        except Exception as err:  # noqa: BLE001 - anything wrong inside the bytes = corrupt shard
            self.mark_bad(unit.shard, err)
            return None

    def open_unit(self, unit: _Unit, upcoming: _Unit | None) -> UnitSamples | None:
        """A class reader's next unit (prefetched if it was), then hint `upcoming` for prefetch."""
        if unit.shard in self.bad:
            return None
        prepared = self.prefetcher.take(unit) if self.prefetcher is not None else None
        if prepared is None:
            samples = self.load_unit(unit)
        elif isinstance(prepared, Exception):  # corrupt bytes, found in the background
            self.mark_bad(unit.shard, prepared)
            samples = None
        else:
            samples = prepared
        if self.prefetcher is not None and upcoming is not None and upcoming.shard not in self.bad:
            self.prefetcher.hint(upcoming)
        return samples

    def prepare_unit(self, unit: _Unit, cancel: threading.Event) -> UnitSamples | Exception:
        """Prefetch thread: fetch, verify and decode a unit -> (sample ids, decoded samples), or the
        corrupt-shard error (reported by the consumer when it opens the unit). PNG decoding and
        hashing release the GIL, so two prefetch threads decode in parallel with the batching."""
        data = self._fetch(unit.shard, cancel)
        try:
            return self._decode_unit(data, unit)
        except Exception as err:  # noqa: BLE001 - anything wrong inside the bytes = corrupt shard
            return err

    def _fetch(self, shard: int, cancel: threading.Event | None = None) -> bytes:
        """A shard's bytes, retried; errors name its URL."""
        url = self.manifest.shard_url(self.manifest.shards[shard])
        _, path = filesystem(url, self.spec.data.storage_options)

        def read() -> bytes:
            if cancel is not None and cancel.is_set():
                raise _Cancelled(f"{url}: prefetch cancelled")
            return self.fs().cat_file(path)

        try:
            return with_retries(read, url, retries=self.spec.data.retries,
                                backoff=self.spec.data.retry_backoff, what="read")
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: shard disappeared after the stream opened") from None

    def mark_bad(self, shard: int, err: Exception) -> None:
        """Skip `shard` from now on; warn once per shard."""
        self.bad.add(shard)
        if self.prefetcher is not None:
            self.prefetcher.discard(shard)
        if shard not in self.warned:
            self.warned.add(shard)
            url = self.manifest.shard_url(self.manifest.shards[shard])
            warnings.warn(f"skipping corrupt shard {url}: {type(err).__name__}: {err}", RuntimeWarning)

    def _decode_unit(self, data: bytes, unit: _Unit) -> UnitSamples:
        positions = range(unit.offset, self.manifest.shards[unit.shard].count, unit.stride)
        arrays = verify_and_decode(data, self.manifest, unit.shard, positions, self.spec.data.verify_checksums)
        return [unit.shard << SAMPLE_BITS | pos for pos in positions], arrays

    # ----- batches -----
    def _alive(self) -> tuple[list[int], np.ndarray]:
        """Classes still drawn from and their cumulative class-size weights; rebuilt only when a class
        dies (`dead` only grows), not per sequence (ImageNet has 1000 classes)."""
        if self._alive_cache is None or self._alive_cache[0] != len(self.dead):
            alive = [c for c in self.readers if c not in self.dead]
            self._alive_cache = (len(self.dead), alive, np.cumsum([self.weights[c] for c in alive]))
        return self._alive_cache[1], self._alive_cache[2]

    def _choose(self, rng: np.random.Generator) -> int:
        alive, cumulative = self._alive()
        if not alive:
            raise RuntimeError(f"{self.manifest.url}: no class has usable samples left for rank "
                               f"{self.spec.rank} worker {self.worker} ({len(self.bad)} corrupt shards)")
        if self.spec.data.class_sampling == "uniform":
            return alive[int(rng.integers(len(alive)))]
        return alive[int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))]

    def next_batch(self) -> tuple[Any, Any, dict]:
        """-> (images (B, K, C, H, W), labels (B,), state delta after this batch)."""
        import torch

        spec = self.spec
        rng = np.random.default_rng(self.key + [self.batch])
        labels, sequences, touched = [], [], set()
        for _ in range(spec.data.batch_size):
            while True:
                cls = self._choose(rng)
                try:
                    sequences.append(self.readers[cls].draw(spec.k, rng))
                    break
                except ClassDead:
                    self.dead.add(cls)
                    warnings.warn(f"{self.manifest.url}: class {cls} has no usable samples left "
                                  f"(corrupt shards); it is left out", RuntimeWarning)
            labels.append(cls)
            touched.add(cls)
        flips = rng.random((len(sequences), spec.k)) < 0.5 if spec.data.flip else None
        flip_copies = self.manifest.latents is not None and self.manifest.latents.flip_copy
        images = torch.from_numpy(assemble_batch(sequences, flips, self.manifest.sample_ext == "png", flip_copies))
        self.batch += 1
        delta = {"batch": self.batch, "classes": {str(c): self.readers[c].state() for c in sorted(touched)},
                 "bad": sorted(self.bad), "dead": sorted(self.dead)}
        return images, torch.from_numpy(np.asarray(labels, dtype=np.int64)), delta


def assemble_batch(sequences: list[list[np.ndarray]], flips: np.ndarray | None, pixels: bool,
                   flip_copies: bool = False) -> np.ndarray:
    """B sequences of K samples -> one array (B, K, ...), sample (b, k) mirrored where flips[b, k].

    pixels: uint8 (H, W, C) images -> float32 (B, K, C, H, W) in [-1, 1] (x / 127.5 - 1, in numpy:
    no intra-op threads in the loader); else stored latents (C, H, W) as they are, mirrored along W.
    flip_copies: each stored sample is (2, C, H, W), its latents and its mirror image's latents; the
    second is taken where flips[b, k], the first elsewhere (never a mirrored latent).
    Each sample is copied once into its slot, mirrored on the way, by one concatenate: (C, H, W)
    or (H, W, C) samples joined along their first axis are the (B, K, ...) batch's memory.
    """
    first = sequences[0][0]
    width_axis = 1 if pixels else first.ndim - 1
    mirror = (slice(None),) * width_axis + (slice(None, None, -1),)
    if flip_copies:
        chosen = np.zeros((len(sequences), len(sequences[0])), bool) if flips is None else flips
        samples = [sample[int(flip)] for seq, seq_flips in zip(sequences, chosen.tolist())
                   for sample, flip in zip(seq, seq_flips)]
    elif flips is None:
        samples = [sample for seq in sequences for sample in seq]
    else:
        samples = [sample[mirror] if flip else sample
                   for seq, seq_flips in zip(sequences, flips.tolist()) for sample, flip in zip(seq, seq_flips)]
    joined = np.concatenate(samples, axis=0)
    out = rearrange(joined, "(b k first) ... -> b k first ...", b=len(sequences), k=len(sequences[0]))
    if not pixels:
        return out
    channels_first = rearrange(out, "b k h w c -> b k c h w")
    scaled = np.empty(channels_first.shape, np.float32)
    np.divide(channels_first, np.float32(127.5), out=scaled)
    return np.subtract(scaled, np.float32(1.0), out=scaled)
