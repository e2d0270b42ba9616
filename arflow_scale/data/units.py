"""Shard units: which samples each consumer (rank, loader worker) of a stream reads, per class.

The split policy is described in `stream.py`. A unit is the part of one shard one consumer keeps (every
`stride`-th sample from `offset`); a sample is named by its id, shard index << SAMPLE_BITS | position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import Manifest

SAMPLE_BITS = 24  # sample id = shard index << 24 | position in shard


@dataclass(frozen=True)
class _Unit:
    """Samples of shard `shard` at positions p with p % stride == offset."""
    shard: int
    offset: int
    stride: int


def plan_units(manifest: Manifest, shards: list[int], consumer: int, consumers: int) -> dict[int, list[_Unit]]:
    """This consumer's units per class (policy in stream.py's docstring)."""
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


def unit_size(manifest: Manifest, unit: _Unit) -> int:
    return len(range(unit.offset, manifest.shards[unit.shard].count, unit.stride))


def unit_ids(manifest: Manifest, unit: _Unit) -> list[int]:
    """The sample ids of a unit, in the order a class reader takes them."""
    return [unit.shard << SAMPLE_BITS | pos for pos in range(unit.offset, manifest.shards[unit.shard].count,
                                                               unit.stride)]


def unit_order(key: list[int], cls: int, epoch: int, count: int) -> np.ndarray:
    """The order in which a consumer with seed key `key` reads its `count` units of class `cls` in `epoch`."""
    return np.random.default_rng(key + [cls, epoch]).permutation(count)


def trainable_classes(manifest: Manifest, shards: list[int], k: int, consumers: int) -> list[int]:
    """Classes from which at least one of `consumers` consumers can draw K distinct samples (a consumer
    whose share of a class is below K leaves the class out; a class without shards is never drawn)."""
    best = [0] * manifest.num_classes
    for consumer in range(consumers):
        for cls, units in plan_units(manifest, shards, consumer, consumers).items():
            best[cls] = max(best[cls], sum(unit_size(manifest, u) for u in units))
    return [cls for cls, owned in enumerate(best) if owned >= k]
