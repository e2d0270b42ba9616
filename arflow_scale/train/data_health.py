"""The data problems of all ranks, gathered at a log interval: corrupt shards skipped and classes dropped.

Every rank's stream knows only its own: rank 0 logs the whole run's (`skipped_shards`: distinct corrupt
shards over all ranks; `classes_dropped`: distinct classes some rank's loader worker no longer draws from)
and the console shows a notice whenever they change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from .args import TrainingStream


@dataclass(frozen=True)
class DataHealth:
    """Over all ranks: corrupt shards (manifest indices) and, per dropped class, the ranks that dropped it."""

    corrupt_shards: tuple[int, ...] = ()
    dropped: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (class, ranks)

    def metrics(self) -> dict[str, float]:
        return {"skipped_shards": float(len(self.corrupt_shards)), "classes_dropped": float(len(self.dropped))}

    def describe(self) -> str:
        classes = "; ".join(f"class {c} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                            for c, r in self.dropped)
        return (f"data: {len(self.corrupt_shards)} corrupt shard(s) skipped over all ranks, "
                f"{len(self.dropped)} class(es) dropped" + (f" ({classes})" if classes else ""))


def gather_data_health(stream: TrainingStream) -> DataHealth:
    """Every rank's corrupt shards and dropped classes, combined (a collective: every rank calls it)."""
    mine = (list(stream.corrupt_shards), list(stream.dropped_classes))
    every = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    shards = sorted({s for corrupt, _ in every for s in corrupt})
    ranks_of: dict[int, list[int]] = {}
    for rank, (_, dropped) in enumerate(every):
        for cls in dropped:
            ranks_of.setdefault(cls, []).append(rank)
    return DataHealth(tuple(shards), tuple((c, tuple(r)) for c, r in sorted(ranks_of.items())))


class DataHealthWatch:
    """Rank 0's memory of the last health it reported: a console line only when something changed."""

    def __init__(self) -> None:
        self.last = DataHealth()

    def notice(self, health: DataHealth) -> Optional[str]:
        if health == self.last:
            return None
        self.last = health
        return health.describe()
