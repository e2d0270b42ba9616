"""Compact sets of one class's sample ids, for stream states that cross world sizes.

A set is a bitmap over the class's samples in manifest order (its shards in manifest order, each shard's
positions in order), packed 8 per byte and written as base64 text: a state stays JSON-able and loads with
`torch.load(weights_only=True)`. ImageNet's 1300 images of a class take 220 characters.
"""
from __future__ import annotations

import base64

import numpy as np

from .manifest import Manifest
from .units import SAMPLE_BITS


class ClassSampleSets:
    """Encodes and decodes sets of sample ids per class of one manifest (the layout is computed once)."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self._shards: dict[int, list[int]] = {c: [] for c in range(manifest.num_classes)}
        for idx, shard in enumerate(manifest.shards):
            self._shards[shard.cls].append(idx)
        self._starts: dict[int, np.ndarray] = {}  # class -> first bit of each of its shards, then the total

    def _layout(self, cls: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices, first bit of each shard + the class's sample count) of class `cls`."""
        if cls not in self._starts:
            counts = [self.manifest.shards[i].count for i in self._shards[cls]]
            self._starts[cls] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        return np.asarray(self._shards[cls], np.int64), self._starts[cls]

    def encode(self, cls: int, ids) -> str:
        """Sample ids of class `cls` -> base64 text of their bitmap."""
        shards, starts = self._layout(cls)
        ids = np.fromiter(ids, np.int64)
        where = np.searchsorted(shards, ids >> SAMPLE_BITS)
        positions = ids & ((1 << SAMPLE_BITS) - 1)
        inside = where < len(shards)
        if not inside.all() or not (shards[where] == ids >> SAMPLE_BITS).all() \
                or not (positions < np.diff(starts)[where]).all():
            raise ValueError(f"class {cls}: sample ids outside the class's shards in {self.manifest.url}")
        bits = np.zeros(int(starts[-1]), bool)
        bits[starts[where] + positions] = True
        return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode("ascii")

    def decode(self, cls: int, text: str) -> set[int]:
        """Base64 text of a bitmap of class `cls` -> the set of its sample ids; a bitmap of another length
        (another manifest) raises ValueError."""
        shards, starts = self._layout(cls)
        packed = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), np.uint8)
        if len(packed) != (int(starts[-1]) + 7) // 8:
            raise ValueError(f"class {cls}: a bitmap of {len(packed)} bytes does not fit the class's "
                             f"{int(starts[-1])} samples in {self.manifest.url}")
        bits = np.flatnonzero(np.unpackbits(packed, bitorder="little")[: int(starts[-1])])
        which = np.searchsorted(starts, bits, side="right") - 1
        return set(((shards[which] << SAMPLE_BITS) | (bits - starts[which])).tolist())
