"""In-memory training data for benchmarks and GPU checks: no shards, no storage, no decoding."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from arflow_scale.config import Config
from arflow_scale.tasks import ModelTask


class InMemoryBatches:
    """One fixed random batch repeated forever, with a stream's interface (state, skipped shards)."""

    def __init__(self, batch_size: int, images_per_sample: int, image_shape: tuple[int, int, int],
                 num_classes: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand((batch_size, images_per_sample, *image_shape), generator=generator) * 2 - 1
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        self.batches, self.skipped_shards = 0, 0
        self.corrupt_shards: list[int] = []
        self.dropped_classes: list[int] = []

    def __iter__(self):
        while True:
            self.batches += 1
            yield self.images, self.labels

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])

    def load_state_dicts(self, states: list[dict[str, int]]) -> None:
        """Any world size: continue the count of the rank that drew most."""
        self.batches = max(int(state["batches"]) for state in states)


@dataclass(frozen=True)
class InMemoryStreams:
    """A stream factory for `train(..., stream_factory=)`: rank r trains on its own fixed random batch."""

    def __call__(self, cfg: Config, task: ModelTask, rank: int, world_size: int) -> InMemoryBatches:
        return InMemoryBatches(cfg.data.batch_size, task.images_per_sample, task.image_shape, task.num_classes,
                               cfg.train.seed + rank)
