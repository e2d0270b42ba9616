"""One consumer (rank, DataLoader worker) of a SequenceStream: shard split, class readers, batches.

See `stream.py` for the split policy, the determinism scheme and the state layout.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import io
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .manifest import Manifest
from .storage import filesystem, with_retries

SAMPLE_BITS = 24  # sample id = shard index << 24 | position in shard


class CorruptShard(ValueError):
    """A shard's bytes do not match its manifest entry or cannot be decoded."""


class _ClassDead(RuntimeError):
    """No usable samples left for a class (all its shards corrupt)."""


@dataclass(frozen=True)
class _Unit:
    """Samples of shard `shard` at positions p with p % stride == offset."""
    shard: int
    offset: int
    stride: int


def plan_units(manifest: Manifest, shards: list[int], consumer: int, consumers: int) -> dict[int, list[_Unit]]:
    """This consumer's units per class (policy in the module docstring)."""
    by_class: dict[int, list[int]] = {c: [] for c in range(manifest.num_classes)}
    for idx in shards:
        by_class[manifest.shards[idx].cls].append(idx)
    plan = {}
    for cls, idxs in by_class.items():
        n = len(idxs)
        if n >= consumers:  # whole shards: shard j -> consumer j % C
            plan[cls] = [_Unit(s, 0, 1) for j, s in enumerate(idxs) if j % consumers == consumer]
        elif n:  # shard c % n, shared by the consumers c' = c (mod n), split by sample position
            sharing = len(range(consumer % n, consumers, n))
            plan[cls] = [_Unit(idxs[consumer % n], consumer // n, sharing)]
        else:
            plan[cls] = []
    return plan


class _Cancelled(RuntimeError):
    """The prefetcher was closed while a fetch was pending (not transient: never retried)."""


class UnitPrefetcher:
    """Prepares hinted units (fetch, verify, split) in `threads` daemon threads, at most `depth`
    units ahead (prepared or in preparation), while the consumer decodes the current ones.

    Hints are prepared oldest first; `take(unit)` returns a prepared result (waiting if it is in
    flight), re-raising the storage error its fetch ended with, or None when the unit was not
    prepared (the caller reads it itself). What a unit holds never depends on timing, so batches do
    not either. `close()` stops the threads and waits for the fetches in flight.
    """

    def __init__(self, prepare: Callable[[_Unit, threading.Event], Any], depth: int, threads: int = 2):
        self.prepare, self.depth, self.num_threads = prepare, depth, max(1, min(threads, depth))
        self.hints: collections.deque[_Unit] = collections.deque()
        self.ready: dict[_Unit, tuple[bool, Any]] = {}  # unit -> (ok, result or exception)
        self.in_flight: set[_Unit] = set()
        self.discarded: set[int] = set()  # corrupt shards: never prepared or kept again
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def hint(self, unit: _Unit) -> None:
        with self.cond:
            if (self.stopping.is_set() or unit.shard in self.discarded or unit in self.ready
                    or unit in self.in_flight or unit in self.hints):
                return
            self.hints.append(unit)
            if not self.threads:
                self.threads = [threading.Thread(target=self._work, name="arflow-shard-prefetch", daemon=True)
                                for _ in range(self.num_threads)]
                for thread in self.threads:
                    thread.start()
            self.cond.notify_all()

    def take(self, unit: _Unit) -> Any | None:
        with self.cond:
            if unit in self.hints:  # not started: the caller reads it now rather than wait in line
                self.hints.remove(unit)
                return None
            while unit in self.in_flight:
                self.cond.wait()
            if unit not in self.ready:
                return None
            ok, value = self.ready.pop(unit)
            self.cond.notify_all()
        if not ok:
            raise value
        return value

    def discard(self, shard: int) -> None:
        """Forget prepared or hinted units of `shard` (it turned out corrupt)."""
        with self.cond:
            self.discarded.add(shard)
            for unit in [u for u in self.ready if u.shard == shard]:
                del self.ready[unit]
            self.hints = collections.deque(u for u in self.hints if u.shard != shard)
            self.cond.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        with self.cond:
            self.stopping.set()
            self.hints.clear()
            self.ready.clear()
            self.cond.notify_all()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.stopping.is_set() and not (
                        self.hints and len(self.ready) + len(self.in_flight) < self.depth):
                    self.cond.wait()
                if self.stopping.is_set():
                    return
                unit = self.hints.popleft()
                self.in_flight.add(unit)
            try:
                result = (True, self.prepare(unit, self.stopping))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer at take()
                result = (False, err)
            with self.cond:
                self.in_flight.discard(unit)
                if not self.stopping.is_set() and unit.shard not in self.discarded:
                    self.ready[unit] = result
                self.cond.notify_all()


def unit_size(manifest: Manifest, unit: _Unit) -> int:
    return len(range(unit.offset, manifest.shards[unit.shard].count, unit.stride))


def _ustar_members(data: bytes, url: str) -> list[dict] | None:
    """Regular files of a plain USTAR archive (what our writer makes); None if anything else."""
    members, pos, end_of_data = [], 0, len(data)
    while pos + 512 <= end_of_data:
        header = data[pos: pos + 512]
        if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar" or header[124] & 0x80:
            return None if header != bytes(512) else members  # zero block = end of archive
        if int(header[148:156].split(b"\0", 1)[0] or b"0", 8) != sum(header) - sum(header[148:156]) + 256:
            raise CorruptShard(f"bad tar header checksum at byte {pos}")
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0]
        start = pos + 512
        if start + size > end_of_data:
            raise CorruptShard(f"tar member {name} runs past the end of the shard (truncated)")
        members.append({"fname": f"{prefix.decode()}/{name}" if prefix else name,
                        "data": data[start: start + size], "__url__": url})
        pos = start + (size + 511) // 512 * 512
    return members


def tar_members(data: bytes, url: str) -> list[dict]:
    """Tar bytes -> [{"fname", "data", "__url__"}] for webdataset's group_by_keys.

    Plain USTAR headers are parsed directly (Python's tarfile costs ~50 us per member, most of a
    stream's time on small images); any other tar goes through webdataset's tar_file_iterator.
    """
    members = _ustar_members(data, url)
    if members is None:
        from webdataset import tariterators

        members = [{**f, "__url__": url} for f in tariterators.tar_file_iterator(io.BytesIO(data))]
    return members


@functools.lru_cache(maxsize=64)
def _npy_layout(header: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """An .npy file's header bytes -> (shape, dtype, fortran order, data offset), parsed by numpy."""
    buf = io.BytesIO(header)
    version = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in .npy samples")
    return shape, dtype, fortran, buf.tell()


def load_npy(data: bytes) -> np.ndarray:
    """.npy bytes -> array, like np.load(allow_pickle=False); the header parse is cached (every
    sample of a shard has the same one), the data is a read-only view of `data`."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12 or data[6] not in (1, 2):
        return np.load(io.BytesIO(data), allow_pickle=False)  # other versions; numpy's own errors
    header_len = int.from_bytes(data[8:10], "little") if data[6] == 1 else int.from_bytes(data[8:12], "little")
    shape, dtype, fortran, offset = _npy_layout(bytes(data[:(10 if data[6] == 1 else 12) + header_len]))
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f".npy data holds {len(data) - offset} bytes, header needs {count * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def decode_sample(sample: dict, ext: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tar sample -> uint8 (H, W, C) image or the stored latent array; checks the shape."""
    if ext == "png":
        from PIL import Image

        with Image.open(io.BytesIO(sample["png"]), formats=("PNG",)) as img:
            arr = np.asarray(img)
        arr = arr[..., None] if arr.ndim == 2 else arr
        ok = arr.shape == (shape[1], shape[2], shape[0])
    else:
        arr = load_npy(sample["npy"])
        ok = arr.shape == tuple(shape)
    if not ok:
        raise CorruptShard(f"sample {sample.get('__key__')} has shape {arr.shape}, manifest says {shape}")
    return arr


class ConsumerStream:
    """One consumer (rank, worker): builds batches and tracks its resumable state."""

    def __init__(self, spec: dict, worker: int, state: dict):
        self.spec, self.worker = spec, worker
        self.manifest: Manifest = spec["manifest"]
        workers = max(spec["num_workers"], 1)
        self.key = [spec["seed"], spec["rank"], spec["world_size"], workers, worker]
        consumer = spec["rank"] * workers + worker
        self.units = plan_units(self.manifest, spec["shards"], consumer, spec["world_size"] * workers)
        self.batch = int(state.get("batch", 0))
        self.bad = set(state.get("bad", []))
        self.dead = set(state.get("dead", []))
        self.warned: set[int] = set(self.bad)
        self.readers = {c: _ClassReader(self, c, u) for c, u in self.units.items()}
        small = [c for c, r in self.readers.items() if r.owned < spec["k"]]
        if small and not state.get("batch"):
            warnings.warn(f"{self.manifest.url}: classes {small} have fewer than K={spec['k']} samples for "
                          f"consumer rank {spec['rank']} worker {worker}; they are left out", RuntimeWarning)
        self.dead |= set(small)
        for cls, cls_state in state.get("classes", {}).items():
            self.readers[int(cls)].load_state(cls_state)
        counts = self.manifest.class_counts()
        self.weights = {c: float(counts[c]) for c in self.readers}
        self._fs = None
        depth = int(spec.get("prefetch", 0))
        self.prefetcher = UnitPrefetcher(self.prepare_unit, depth) if depth > 0 else None

    def close(self) -> None:
        """Stop the prefetch thread (waits for the fetch in flight)."""
        if self.prefetcher is not None:
            self.prefetcher.close()

    # ----- shard reading -----
    def fs(self):
        if self._fs is None:
            self._fs = filesystem(self.manifest.url, self.spec["storage_options"])[0]
        return self._fs

    def load_unit(self, unit: _Unit, allow_bad: bool = False) -> list[tuple[int, dict]] | None:
        """Read and verify a unit's shard -> [(sample id, undecoded sample)], None if corrupt."""
        if unit.shard in self.bad and not allow_bad:
            return None
        info = self.manifest.shards[unit.shard]
        data = self._fetch(unit.shard)
        try:
            return self._split_unit(data, info, unit)
        except Exception as err:  # noqa: BLE001 - anything wrong inside the bytes = corrupt shard
            self.mark_bad(unit.shard, err)
            return None

    def open_unit(self, unit: _Unit, upcoming: _Unit | None) -> list[tuple[int, dict]] | None:
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

    def prepare_unit(self, unit: _Unit, cancel: threading.Event) -> list[tuple[int, dict]] | Exception:
        """Prefetch thread: fetch, verify and split a unit -> [(sample id, undecoded sample)], or the
        corrupt-shard error (reported by the consumer when it opens the unit)."""
        data = self._fetch(unit.shard, cancel)
        try:
            return self._split_unit(data, self.manifest.shards[unit.shard], unit)
        except Exception as err:  # noqa: BLE001 - anything wrong inside the bytes = corrupt shard
            return err

    def _fetch(self, shard: int, cancel: threading.Event | None = None) -> bytes:
        """A shard's bytes, retried; errors name its URL."""
        url = self.manifest.shard_url(self.manifest.shards[shard])
        _, path = filesystem(url, self.spec["storage_options"])

        def read() -> bytes:
            if cancel is not None and cancel.is_set():
                raise _Cancelled(f"{url}: prefetch cancelled")
            return self.fs().cat_file(path)

        try:
            return with_retries(read, url, retries=self.spec["retries"],
                                backoff=self.spec["retry_backoff"], what="read")
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

    def decode(self, sample: dict) -> np.ndarray:
        return decode_sample(sample, self.manifest.sample_ext, self.manifest.sample_shape)

    def _split_unit(self, data: bytes, info, unit: _Unit) -> list[tuple[int, dict]]:
        from webdataset import tariterators

        if len(data) != info.bytes:
            raise CorruptShard(f"{len(data)} bytes, manifest says {info.bytes} (truncated?)")
        if self.spec["verify_checksums"] and hashlib.sha256(data).hexdigest() != info.sha256:
            raise CorruptShard("sha256 does not match the manifest")
        samples = list(tariterators.group_by_keys(tar_members(data, info.path)))
        if len(samples) != info.count:
            raise CorruptShard(f"{len(samples)} samples, manifest says {info.count}")
        out = []
        for pos in range(unit.offset, info.count, unit.stride):
            sample = samples[pos]
            if int(sample["cls"]) != info.cls or self.manifest.sample_ext not in sample:
                raise CorruptShard(f"sample {sample['__key__']} is not a {self.manifest.sample_ext} "
                                   f"sample of class {info.cls}")
            out.append((unit.shard << SAMPLE_BITS | pos, sample))
        return out

    # ----- batches -----
    def _choose(self, rng: np.random.Generator) -> int:
        alive = [c for c in self.readers if c not in self.dead]
        if not alive:
            raise RuntimeError(f"{self.manifest.url}: no class has usable samples left for rank "
                               f"{self.spec['rank']} worker {self.worker} ({len(self.bad)} corrupt shards)")
        if self.spec["class_sampling"] == "uniform":
            return alive[int(rng.integers(len(alive)))]
        weights = np.asarray([self.weights[c] for c in alive])
        return alive[int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum(), side="right"))]

    def next_batch(self) -> tuple[Any, Any, dict]:
        """-> (images (B, K, C, H, W), labels (B,), state delta after this batch)."""
        import torch
        from einops import rearrange

        spec = self.spec
        rng = np.random.default_rng(self.key + [self.batch])
        labels, sequences, touched = [], [], set()
        for _ in range(spec["batch_size"]):
            while True:
                cls = self._choose(rng)
                try:
                    sequences.append(self.readers[cls].draw(spec["k"], rng))
                    break
                except _ClassDead:
                    self.dead.add(cls)
                    warnings.warn(f"{self.manifest.url}: class {cls} has no usable samples left "
                                  f"(corrupt shards); it is left out", RuntimeWarning)
            labels.append(cls)
            touched.add(cls)
        arr = np.stack([a for seq in sequences for a in seq])  # (B*K, H, W, C) or (B*K, *latent)
        arr = rearrange(arr, "(b k) ... -> b k ...", b=len(sequences))
        if spec["flip"]:
            flips = rng.random(arr.shape[:2]) < 0.5
            flip_axis = 3 if self.manifest.sample_ext == "png" else arr.ndim - 1
            mask = rearrange(flips, "b k -> b k" + " 1" * (arr.ndim - 2))
            arr = np.where(mask, np.flip(arr, flip_axis), arr)
        if self.manifest.sample_ext == "png":  # numpy, not torch: no intra-op threads in the loader
            pixels = rearrange(arr, "b k h w c -> b k c h w")
            scaled = np.empty(pixels.shape, np.float32)  # same float32 ops as x.float() / 127.5 - 1
            np.divide(pixels, np.float32(127.5), out=scaled)
            images = torch.from_numpy(np.subtract(scaled, np.float32(1.0), out=scaled))
        else:
            images = torch.from_numpy(np.ascontiguousarray(arr))
        self.batch += 1
        delta = {"batch": self.batch, "classes": {str(c): self.readers[c].state() for c in sorted(touched)},
                 "bad": sorted(self.bad), "dead": sorted(self.dead)}
        return images, torch.from_numpy(np.asarray(labels, dtype=np.int64)), delta


class _ClassReader:
    """One class of one consumer: epochs over its units feeding an in-class shuffle buffer."""

    def __init__(self, consumer: ConsumerStream, cls: int, units: list[_Unit]):
        self.consumer, self.cls, self.units = consumer, cls, units
        self.owned = sum(unit_size(consumer.manifest, u) for u in units)
        self.epoch, self.unit_pos, self.offset = 0, 0, 0
        self.buffer: list[tuple[int, np.ndarray]] = []
        self.current: list | None = None
        self.pending_ids: list[int] | None = None  # buffered ids to re-read after load_state
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            rng = np.random.default_rng(self.consumer.key + [self.cls, epoch])
            self._orders[epoch] = rng.permutation(len(self.units))
        return self._orders[epoch]

    def state(self) -> dict:
        ids = self.pending_ids if self.pending_ids is not None else [i for i, _ in self.buffer]
        return {"epoch": self.epoch, "unit": self.unit_pos, "offset": self.offset, "buffer": list(ids)}

    def load_state(self, state: dict) -> None:
        self.epoch, self.unit_pos, self.offset = int(state["epoch"]), int(state["unit"]), int(state["offset"])
        self.pending_ids, self.buffer, self.current = [int(i) for i in state["buffer"]], [], None

    def _materialize(self) -> None:
        """Re-read the samples a restored buffer refers to (lazily, on first use)."""
        ids, self.pending_ids = self.pending_ids, None
        arrays: dict[int, np.ndarray] = {}
        for shard in sorted({i >> SAMPLE_BITS for i in ids}):
            unit = next((u for u in self.units if u.shard == shard), _Unit(shard, 0, 1))
            samples = dict(self.consumer.load_unit(unit, allow_bad=True) or [])
            for i in ids:
                if i in samples and i not in arrays:
                    try:
                        arrays[i] = self.consumer.decode(samples[i])
                    except Exception as err:  # noqa: BLE001 - the shard changed since it was read
                        self.consumer.mark_bad(shard, err)
        self.buffer = [(i, arrays[i]) for i in ids if i in arrays]

    def _upcoming(self) -> _Unit | None:
        """The unit this class reads after the current one (for prefetch)."""
        if self.unit_pos + 1 < len(self.units):
            return self.units[self.order(self.epoch)[self.unit_pos + 1]]
        return self.units[self.order(self.epoch + 1)[0]] if self.units else None

    def read_next(self) -> tuple[int, np.ndarray]:
        bad_run = 0
        while True:
            if self.unit_pos >= len(self.units):
                self.epoch, self.unit_pos, self.offset = self.epoch + 1, 0, 0
            if self.current is None:
                unit = self.units[self.order(self.epoch)[self.unit_pos]]
                self.current = self.consumer.open_unit(unit, self._upcoming())
                if self.current is None:
                    bad_run += 1
                    if bad_run > len(self.units):
                        raise _ClassDead(self.cls)
                    self.unit_pos, self.offset = self.unit_pos + 1, 0
                    continue
            if self.offset < len(self.current):
                sample_id, sample = self.current[self.offset]
                self.offset += 1
                try:
                    return sample_id, self.consumer.decode(sample)
                except Exception as err:  # noqa: BLE001 - undecodable sample = corrupt shard
                    self.consumer.mark_bad(sample_id >> SAMPLE_BITS, err)
            self.current, self.unit_pos, self.offset = None, self.unit_pos + 1, 0

    def _pick(self, k: int, rng: np.random.Generator) -> list[int] | None:
        """K buffer positions holding distinct sample ids, in random order; None if impossible."""
        chosen, seen = [], set()
        for p in rng.permutation(len(self.buffer)).tolist():
            sample_id = self.buffer[p][0]
            if sample_id not in seen:
                seen.add(sample_id)
                chosen.append(p)
                if len(chosen) == k:
                    return chosen
        return None

    def draw(self, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        """K samples with distinct ids, removed from the buffer (refilled first)."""
        if self.pending_ids is not None:
            self._materialize()
        # Never buffer more than one pass of this class: keeps draws close to once per epoch.
        capacity = max(min(self.consumer.spec["shuffle_buffer"], self.owned), k)
        while len(self.buffer) < capacity:
            self.buffer.append(self.read_next())
        reads = 0
        while (chosen := self._pick(k, rng)) is None:  # duplicates across an epoch boundary
            self.buffer.append(self.read_next())
            reads += 1
            if reads > 2 * self.owned + capacity:
                raise _ClassDead(self.cls)
        out = [self.buffer[p][1] for p in chosen]
        for p in sorted(chosen, reverse=True):
            self.buffer[p] = self.buffer[-1]
            self.buffer.pop()
        return out
