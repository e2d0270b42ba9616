"""The global batch on any number of workers: which micro-batch and gradient accumulation a world size gets.

The global batch (sequences per optimizer step over all ranks) is `train.global_batch_size`, by default
`data.batch_size x cluster.num_workers x train.grad_accum` of the config (the range's max for an elastic
`min..max`). When a run continues on another number
of workers it stays the same: with `train.elastic_batch=accumulate` (default) each rank keeps its micro-batch
`data.batch_size` and the gradient accumulation adapts; with `per_rank` the accumulation stays `train.grad_accum`
and the micro-batch adapts. A global batch the world size cannot divide is a ConfigError naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from arflow_scale.config import Config
from arflow_scale.schema import check


@dataclass(frozen=True)
class BatchPlan:
    """Sequences per rank per micro-step, micro-steps per optimizer step, and the ranks."""

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def global_batch_size(cfg: Config) -> int:
    """The configured global batch: `train.global_batch_size`, else batch_size x num_workers (the most of a
    range) x grad_accum."""
    if cfg.train.global_batch_size is not None:
        return cfg.train.global_batch_size
    return cfg.data.batch_size * cfg.cluster.worker_range[1] * cfg.train.grad_accum


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """The micro-batch and accumulation that keep the configured global batch on `world_size` ranks."""
    total = global_batch_size(cfg)
    if cfg.train.elastic_batch == "accumulate":
        per_step = cfg.data.batch_size * world_size
        check(total % per_step == 0, "train.global_batch_size",
              f"{total} sequences is not a multiple of data.batch_size x workers = {cfg.data.batch_size} x "
              f"{world_size} = {per_step} (train.elastic_batch=accumulate keeps the micro-batch and adapts the "
              f"gradient accumulation); choose a global batch divisible by {per_step} or train.elastic_batch=per_rank")
        return BatchPlan(micro_batch=cfg.data.batch_size, grad_accum=total // per_step, world_size=world_size)
    per_micro = cfg.train.grad_accum * world_size
    check(total % per_micro == 0, "train.global_batch_size",
          f"{total} sequences is not a multiple of train.grad_accum x workers = {cfg.train.grad_accum} x "
          f"{world_size} = {per_micro} (train.elastic_batch=per_rank keeps the accumulation and adapts the "
          f"micro-batch); choose a global batch divisible by {per_micro} or train.elastic_batch=accumulate")
    return BatchPlan(micro_batch=total // per_micro, grad_accum=cfg.train.grad_accum, world_size=world_size)


def with_plan(cfg: Config, plan: BatchPlan) -> Config:
    """`cfg` with the plan's micro-batch (`data.batch_size`) and accumulation (`train.grad_accum`): what the
    engine, the stream and the loop of one world size use. Unchanged when the plan is the config's own."""
    if (plan.micro_batch, plan.grad_accum) == (cfg.data.batch_size, cfg.train.grad_accum):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=plan.micro_batch),
                               train=dataclasses.replace(cfg.train, grad_accum=plan.grad_accum,
                                                         global_batch_size=plan.global_batch))
