"""SequenceStream: class-grouped shards -> batches of K distinct same-class samples, resumable.

Consumers. Rank r's DataLoader worker w is consumer c = r * W + w of C = world_size * W (W =
max(num_workers, 1)). Shard split policy, per class with n shards: if n >= C, shard j goes whole
to consumer j % C (disjoint shards); if n < C, consumer c reads shard c % n, shared with the other
consumers c' = c (mod n), each keeping every g-th sample (g = consumers sharing it, offset c // n):
disjoint samples, and each shard is read by about C / n consumers instead of all of them. So every
consumer sees every class; a class whose share for a consumer is below K samples is left out of
that consumer's class choice, with a warning.

Flips. A flip mirrors an image (or a stored latent along W); for latents written with flip copies
(manifest `latents.flip_copy`) it takes the stored latents of the mirror image instead.

Determinism. Each class of a consumer is read epoch by epoch (its units in an order drawn from
(seed, rank, world, W, worker, class, epoch)) into an in-class shuffle buffer of sample ids; batch j
of a worker draws classes, buffer positions and flips from a generator seeded with
(seed, rank, world, W, worker, j). The resumable state is therefore small: per worker its batch
count and, per touched class, (epoch, unit position, offset, buffered sample ids); buffered
samples are re-read lazily on resume. With W > 0 DataLoader workers, batch n comes from worker
n % W, each worker ships a state delta with every batch, and the state reflects only delivered
batches, so resuming after batch n continues with exactly batch n + 1.

Another world size. `load_state_dicts` takes the states of all ranks of a run (any world size, any number
of loader workers) and continues the whole run's position, not a rank's (`resume.py`): per class, what
every old consumer had consumed in its current pass (read, or skipped after an earlier resize, and not
still in its shuffle buffer) is skipped in one *resized pass* of the new consumers, which reads every
other sample of the class once (buffered, never drawn samples included); full passes follow. The bound:
  - reads: no sample is read twice within a pass, none is lost (each sample's read count after the
    resized pass is what it would be after the old consumers had finished their passes; old consumers
    that were a pass apart stay a pass apart);
  - draws: as without a resize, a consumer draws from its shuffle buffer of capacity C = max(min(
    shuffle_buffer, its share of the class), K), so of the first m samples a new consumer draws from a
    class (m = what its resized pass holds) at most C come from the pass after it and may repeat an
    earlier draw; the others are distinct samples of the resized pass (tests/test_data_resize.py).
The new consumers' class choices, buffer positions and flips come from (seed, new rank, new world size,
W, worker, j), with j continuing from the largest old batch count: seeded and reproducible, but not the
batches an uninterrupted run would have drawn. Corrupt shards found before stay skipped.

Faults. Transient storage errors are retried (storage.with_retries) then raise StorageError naming
the shard URL. A corrupt / truncated / checksum-mismatched shard is skipped with one warning and
counted in `skipped_shards`. A manifest naming a missing shard fails at open (or is skipped with
`skip_missing`).

Prefetch and decoding. With `prefetch` = P > 0 each consumer runs two daemon threads that fetch,
verify (size, checksum) and decode up to P upcoming units (a class hints its next unit when it opens the
current one) while the consumer draws and batches, so storage latency and decoding overlap the
batching; hashing and PNG decoding release the GIL, so the two threads decode in parallel. Verified
.npy shards laid out as our writer lays them out are split with a few whole-shard array operations
(decode.uniform_npy_block); any other shard goes through webdataset's tar grouping. A unit is
decoded whole before any of it is used: a shard with one undecodable sample is skipped entirely.
Which samples a unit holds never depends on timing, so batches and state are identical for any P.
Errors keep their meaning: a background fetch retries like a direct one and its StorageError is
raised when the unit is needed; corrupt bytes are reported then too. The threads stop (and are
joined) when the iterator is closed or garbage collected. Memory per consumer: per class one decoded
unit plus up to P prefetched (decoded) units and `shuffle_buffer` decoded samples.
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np

from arflow_scale.config.data import DataConfig
from arflow_scale.schema import build

from .consumer import ConsumerStream, StreamSpec
from .manifest import Manifest, read_manifest
from .resume import STATE_VERSION, resized_worker_states
from .storage import list_files
from .units import plan_units, unit_size

MEMORY_WARN_BYTES = 16 << 30  # decoded samples held per consumer above which the stream warns
READ_AMPLIFICATION_WARN = 2.0  # shard bytes fetched per byte kept above which the stream warns
log = logging.getLogger(__name__)


def _identity(item: Any) -> Any:
    return item


def _worker_dataset(spec: StreamSpec, worker_states: list[dict], start: int):
    """IterableDataset whose DataLoader worker i plays logical worker (i + start) % W."""
    import torch
    from torch.utils.data import IterableDataset, get_worker_info

    class _Workers(IterableDataset):
        def __iter__(self) -> Iterator:
            info = get_worker_info()
            torch.set_num_threads(1)
            logical = (info.id + start) % info.num_workers
            consumer = ConsumerStream(spec, logical, worker_states[logical])
            try:
                while True:
                    images, labels, delta = consumer.next_batch()
                    yield images, labels, logical, delta
            finally:
                consumer.close()

    return _Workers()


class SequenceStream:
    """Infinite iterator of (images (B, K, C, H, W) float in [-1, 1] or latents, labels (B,) long)."""

    def __init__(self, data: DataConfig, *, k: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        """data: a validated data section (`data.manifest` names the shards); k images per sequence; this
        stream is rank `rank` of `world_size`."""
        for name, value, low in (("k", k, 1), ("world_size", world_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"SequenceStream: {name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"SequenceStream: rank must lie in 0..{world_size - 1}, got {rank}")
        if not data.manifest:
            raise ValueError("data.manifest: no shard folder / manifest URL configured")
        self.url = data.manifest
        self.storage_options = dict(data.storage_options)
        self.manifest: Manifest = read_manifest(data.manifest, self.storage_options, retries=data.retries,
                                                retry_backoff=data.retry_backoff)
        shards = self._available_shards(data.skip_missing, data.retries, data.retry_backoff)
        self.num_workers = data.num_workers
        self._spec = StreamSpec(data=data, manifest=self.manifest, shards=tuple(shards), k=k, seed=seed, rank=rank,
                                world_size=world_size)
        self.missing_shards = len(self.manifest.shard_indices("train")) - len(shards)
        self._state = self._fresh_state()
        self._warn_about_costs()

    @classmethod
    def from_config(cls, data: DataConfig, k: int, seed: int, rank: int, world_size: int) -> "SequenceStream":
        """The stream of rank `rank` for a run's data section."""
        return cls(data, k=k, seed=seed, rank=rank, world_size=world_size)

    @classmethod
    def open(cls, manifest_url: str, *, k: int, seed: int = 0, rank: int = 0, world_size: int = 1,
             **data_fields: Any) -> "SequenceStream":
        """A stream over `manifest_url` with data-section fields given by name (validated as the config is,
        a bad value naming its key); the other fields take DataConfig's defaults."""
        return cls(build(DataConfig, {"manifest": manifest_url, **data_fields}, "data"), k=k, seed=seed,
                   rank=rank, world_size=world_size)

    def _warn_about_costs(self) -> None:
        held = self.memory_estimate()
        log.info("%s: up to %.1f MiB of decoded samples per loader worker", self.url, held / 2**20)
        if held > MEMORY_WARN_BYTES:
            warnings.warn(f"{self.url}: each loader worker may hold about {held / 2**30:.1f} GiB of decoded samples "
                          f"({self.manifest.num_classes} classes x (current shard unit + shuffle buffer)); write "
                          f"smaller shards (--samples-per-shard) or lower data.shuffle_buffer", RuntimeWarning)
        amplification = self.read_amplification()
        if amplification > READ_AMPLIFICATION_WARN:
            consumers = self._spec.world_size * self._spec.workers
            warnings.warn(f"{self.url}: classes have fewer shards than the {consumers} loader workers of all ranks, "
                          f"so each reads whole shards to keep a share of their samples: {amplification:.1f}x the "
                          f"bytes it uses; write the shards with --min-shards-per-class {consumers}", RuntimeWarning)

    def _available_shards(self, skip_missing: bool, retries: int, backoff: float) -> list[int]:
        """Indices of manifest shards present in storage; missing ones -> error or skip."""
        present = list_files(self.manifest.url, self.storage_options, retries=retries, backoff=backoff)
        missing = [i for i in self.manifest.shard_indices("train") if self.manifest.shards[i].path not in present]
        if missing and not skip_missing:
            first = self.manifest.shard_url(self.manifest.shards[missing[0]])
            raise FileNotFoundError(f"{self.manifest.url}: manifest names {len(missing)} missing shard(s), "
                                    f"e.g. {first}; pass skip_missing=True (data.skip_missing) to skip them")
        if missing:
            warnings.warn(f"{self.manifest.url}: skipping {len(missing)} missing shard(s): "
                          f"{[self.manifest.shards[i].path for i in missing[:5]]}", RuntimeWarning)
        return [i for i in self.manifest.shard_indices("train") if i not in set(missing)]

    def _first_worker_plan(self) -> dict:
        """The shard units of this rank's first loader worker, per class (`consumer.plan_units`)."""
        spec = self._spec
        return plan_units(self.manifest, list(spec.shards), spec.rank * spec.workers, spec.world_size * spec.workers)

    def memory_estimate(self) -> int:
        """Bytes of decoded samples one consumer (rank, loader worker) can hold at once: per class its
        largest unit and its shuffle buffer, plus `prefetch` prepared units (computed for this rank's
        first loader worker; the others hold about as much)."""
        spec, plan = self._spec, self._first_worker_plan()
        sizes = {c: [unit_size(self.manifest, u) for u in units] for c, units in plan.items()}
        samples = sum(max(s, default=0) + min(spec.data.shuffle_buffer, sum(s)) for s in sizes.values())
        samples += spec.data.prefetch * max((max(s, default=0) for s in sizes.values()), default=0)
        return samples * int(np.prod(self.manifest.sample_shape)) * np.dtype(self.manifest.dtype).itemsize

    def read_amplification(self) -> float:
        """Shard bytes one consumer fetches per epoch over the bytes of the samples it keeps (1.0 when
        every class has at least as many shards as there are consumers; see the split policy)."""
        fetched = kept = 0.0
        for units in self._first_worker_plan().values():
            for unit in units:
                shard = self.manifest.shards[unit.shard]
                fetched += shard.bytes
                kept += shard.bytes * unit_size(self.manifest, unit) / shard.count
        return fetched / kept if kept else 1.0

    # ----- state -----
    def _fresh_state(self) -> dict:
        workers = max(self.num_workers, 1)
        return {"version": STATE_VERSION, "batches": 0, **self._identity(),
                "workers": [{"batch": 0, "classes": {}, "bad": [], "dead": []} for _ in range(workers)]}

    def _identity(self) -> dict:
        spec = self._spec
        return {"seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size,
                "num_workers": spec.data.num_workers, "k": spec.k, "batch_size": spec.data.batch_size,
                "num_shards": len(self.manifest.shards)}

    def state_dict(self) -> dict:
        """Plain python state (JSON-able) after the last delivered batch."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batch the state was taken at; settings must match."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"SequenceStream state: unsupported version {state.get('version') if isinstance(state, dict) else state!r}")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"SequenceStream state: {key} = {state.get(key)!r} but this stream has {value!r}")
        self._state = copy.deepcopy(state)

    def load_state_dicts(self, states: Sequence[dict]) -> None:
        """Continue a run from the saved states of ALL its ranks (any order), on any world size and number of
        loader workers. The same world size and loader workers: exactly `load_state_dict` of this rank's
        state (bit-identical batches). Otherwise every class continues its pass without the samples any old
        rank had consumed in it (the bound on repeats is in the module docstring); seed, K and the manifest
        must be the run's, batch_size may differ."""
        spec = self._spec
        if all(isinstance(s, dict) and s.get("world_size") == spec.world_size
               and s.get("num_workers") == spec.data.num_workers for s in states) \
                and sorted(s.get("rank") for s in states) == list(range(spec.world_size)):
            self.load_state_dict(next(s for s in states if s["rank"] == spec.rank))
            return
        batch, workers = resized_worker_states(spec, states, len(self.manifest.shards))
        self._state = {**self._fresh_state(), "batches": batch * spec.workers, "workers": workers}

    def _apply(self, worker: int, delta: dict) -> None:
        record = self._state["workers"][worker]
        record["batch"] = delta["batch"]
        record["classes"].update(delta["classes"])
        record["bad"], record["dead"] = delta["bad"], delta["dead"]
        self._state["batches"] += 1

    @property
    def batches(self) -> int:
        """Batches delivered so far (including before a resume)."""
        return self._state["batches"]

    @property
    def skipped_shards(self) -> int:
        """Distinct corrupt shards skipped so far (a counter the trainer can log)."""
        return len({s for w in self._state["workers"] for s in w["bad"]})

    @property
    def corrupt_shards(self) -> list[int]:
        """Manifest indices of the corrupt shards this rank skipped so far."""
        return sorted({s for w in self._state["workers"] for s in w["bad"]})

    @property
    def dropped_classes(self) -> list[int]:
        """Classes some loader worker of this rank no longer draws from (its share is below K samples, or
        all its shards of the class are corrupt)."""
        return sorted({c for w in self._state["workers"] for c in w["dead"]})

    @property
    def epoch(self) -> int:
        """Completed passes: every sample of every usable class was read at least this often."""
        epochs = [w["classes"].get(str(c), {"epoch": 0})["epoch"] for w in self._state["workers"]
                  for c in range(self.manifest.num_classes) if c not in w["dead"]]
        return min(epochs, default=0)

    # ----- iteration -----
    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self.num_workers == 0:
            consumer = ConsumerStream(self._spec, 0, copy.deepcopy(self._state["workers"][0]))
            try:
                while True:
                    images, labels, delta = consumer.next_batch()
                    self._apply(0, delta)
                    yield images, labels
            finally:
                consumer.close()
        from torch.utils.data import DataLoader

        start = self._state["batches"] % self.num_workers
        dataset = _worker_dataset(self._spec, copy.deepcopy(self._state["workers"]), start)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            prefetch_factor=2)
        for images, labels, worker, delta in loader:
            expected = self._state["batches"] % self.num_workers
            if worker != expected:
                raise RuntimeError(f"SequenceStream: batch from worker {worker}, expected {expected}")
            self._apply(worker, delta)
            yield images, labels
