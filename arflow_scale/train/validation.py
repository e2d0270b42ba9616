"""The held-out validation loss during training (`val_loss`, `val_loss_ema`).

The validation set (data/validation.py) is cut into fixed batches of `eval.val_batch_size` sequences; batch j is
evaluated by rank j mod W, every rank runs the same number of forward passes (ZeRO-3 gathers parameters in each),
and the per-sequence losses are gathered and averaged in sequence order in float64. So the number depends on the
weights, the manifest and the seed alone, not on the world size.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from arflow_scale.config import Config
from arflow_scale.data.manifest import read_manifest
from arflow_scale.data.validation import ValidationSet, load_validation_set
from arflow_scale.tasks import ModelTask

log = logging.getLogger(__name__)


def sequence_seed(seed: int, index: int) -> int:
    """The seed of validation sequence `index`'s noise levels and noise (a 63-bit integer)."""
    digest = hashlib.sha256(f"arflow-val/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Validator:
    """Evaluates a model on the validation set, this rank's share of it, and returns the set's mean loss."""

    def __init__(self, task: ModelTask, validation: ValidationSet, *, seed: int, batch_size: int, rank: int,
                 world_size: int, device: torch.device, bf16: bool):
        self.task, self.set, self.device, self.bf16 = task, validation, device, bf16
        self.seeds = [sequence_seed(seed, i) for i in range(len(validation))]
        batches = [range(start, min(start + batch_size, len(validation)))
                   for start in range(0, len(validation), batch_size)]
        self.mine = batches[rank::world_size]
        self.padding = batches[0]  # evaluated and dropped by ranks with fewer batches (equal forward counts)
        self.rounds = math.ceil(len(batches) / world_size)
        self.world_size = world_size

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Mean held-out loss of `model` over the whole set (a collective when the world size is above 1)."""
        losses: dict[int, float] = {}
        for round_index in range(self.rounds):
            batch = self.mine[round_index] if round_index < len(self.mine) else self.padding
            values = self._batch_losses(model, batch)
            if round_index < len(self.mine):
                losses.update(zip(batch, values))
        if self.world_size > 1:
            parts: list[Optional[dict[int, float]]] = [None] * self.world_size
            dist.all_gather_object(parts, losses)
            losses = {i: value for part in parts for i, value in part.items()}
        return math.fsum(losses[i] for i in range(len(self.set))) / len(self.set)

    def _batch_losses(self, model: nn.Module, batch: range) -> list[float]:
        images = self.set.images[batch.start:batch.stop].to(self.device)
        labels = self.set.labels[batch.start:batch.stop].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            values = self.task.validation_losses(model, images, labels, self.seeds[batch.start:batch.stop])
        return values.double().cpu().tolist()


def open_validator(cfg: Config, task: ModelTask, *, rank: int, world_size: int, device: torch.device,
                   bf16: bool) -> Optional[Validator]:
    """The run's Validator, or None when its shards hold no validation split (then `eval.val_every` must be 0)."""
    manifest = read_manifest(cfg.data.manifest, cfg.data.storage_options)
    if not manifest.shard_indices("val"):
        if cfg.eval.val_every:
            raise ValueError(f"eval.val_every: {cfg.eval.val_every}, but {manifest.url} has no validation split "
                             f"(write the shards with --val-per-class N, run.prepare_val_per_class for demo data)")
        return None
    validation = load_validation_set(cfg.data.manifest, k=task.images_per_sample, sequences=cfg.eval.val_sequences,
                                     seed=cfg.train.seed, storage_options=cfg.data.storage_options)
    log.info("validation: %d held-out sequences of %s", len(validation), manifest.url)
    return Validator(task, validation, seed=cfg.train.seed, batch_size=cfg.eval.val_batch_size, rank=rank,
                     world_size=world_size, device=device, bf16=bf16)
