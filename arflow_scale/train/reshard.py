"""Restoring a checkpoint that another number of ranks wrote: the training state re-partitioned for this world.

What each ZeRO stage's engine state takes (docs/checkpoints.md):
- ZeRO 0: nothing is partitioned (every rank holds the whole model, optimizer and schedule, saved once by rank
  0), so DeepSpeed's own `load_checkpoint` reads it on any number of ranks.
- ZeRO 1, 2: DeepSpeed's universal checkpoint: `ds_to_universal` turns the ranks' flat optimizer partitions into
  one folder per parameter (fp32 master, exp_avg, exp_avg_sq, step), which an engine built with
  `checkpoint.load_universal` loads into its own partitions.
- ZeRO 3: our own resharding: every parameter's full fp32 master and AdamW moments are assembled from the old
  ranks' flat partitions (`checkpoint.zero3_state`) and set into this engine's partitions with DeepSpeed's
  `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`; the schedule and step counters come from the
  model-states file.
The EMA is consolidated from every old rank's piece and each rank takes its slice of it; the data stream
continues through `load_state_dicts(all old ranks' states)`; rank r keeps its RNG state when the old world had
a rank r.
Every file is loaded weights-only.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from arflow_scale.checkpoint.layout import DEEPSPEED, DS_TAG, rank_file
from arflow_scale.checkpoint.record import CheckpointRecord
from arflow_scale.checkpoint.safe_load import safe_load, weights_only_torch_load
from arflow_scale.checkpoint.weights import ema_from_states
from arflow_scale.checkpoint.zero3_state import Zero3State

from .ema import EMA
from .rng import set_rng_state
from .state import load_engine

log = logging.getLogger(__name__)

RESHARD_PATHS = {0: "DeepSpeed's load (ZeRO-0 state is replicated)", 1: "DeepSpeed's universal checkpoint",
                 2: "DeepSpeed's universal checkpoint", 3: "full fp32 state resharded per parameter"}


def needs_universal(record: Optional[CheckpointRecord], world_size: int) -> bool:
    """Whether the engine that restores `record` on `world_size` ranks must load a universal checkpoint."""
    return record is not None and record.world_size != world_size and record.zero_stage in (1, 2)


def restore_resharded(folder: str | Path, *, record: CheckpointRecord, engine, ema: EMA, stream, rank: int,
                      world_size: int, scratch: str | Path) -> None:
    """Load the checkpoint in local `folder`, written by `record.world_size` ranks, into this rank of
    `world_size`; `scratch` is an empty local folder for intermediate files."""
    folder = Path(folder)
    if engine.zero_optimization_stage() != record.zero_stage:
        raise ValueError(f"{folder}: written at ZeRO stage {record.zero_stage}, this engine runs stage "
                         f"{engine.zero_optimization_stage()}")
    if record.zero_stage in (1, 2):
        load_universal(engine, folder / DEEPSPEED, Path(scratch))
    elif record.zero_stage == 3:
        load_zero3_state(engine, Zero3State(folder / DEEPSPEED / DS_TAG, record.world_size))
    else:
        load_engine(folder, engine)
    old_ranks = range(record.world_size) if record.ema_partitioned else [0]
    ema.load_full_state_dict(ema_from_states([safe_load(folder / rank_file("ema", r), mmap=True) for r in old_ranks]))
    if rank < record.world_size:
        set_rng_state(safe_load(folder / rank_file("rng", rank)))
    restore_stream(stream, [safe_load(folder / rank_file("data", r)) for r in range(record.world_size)])


def restore_stream(stream, states: list[dict[str, Any]]) -> None:
    """Continue the data stream of `len(states)` old ranks on this rank (`load_state_dicts`: the stream knows its
    rank and world size; see data/stream.py for what a change of world size may repeat)."""
    stream.load_state_dicts(states)


def load_universal(engine, deepspeed_folder: Path, scratch: Path) -> None:
    """ZeRO 1-2 on another world size: convert the DeepSpeed checkpoint to a universal one in `scratch` and load
    it (the engine was built with `checkpoint.load_universal`)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = scratch / "universal"
    args = argparse.Namespace(input_folder=str(deepspeed_folder / DS_TAG), output_folder=str(out / DS_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with weights_only_torch_load():
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            ds_to_universal(args)
        path, _ = engine.load_checkpoint(str(out), tag=DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{out}: DeepSpeed found no universal checkpoint with tag {DS_TAG!r}")


@torch.no_grad()
def load_zero3_state(engine, state: Zero3State) -> None:
    """Set a ZeRO-3 engine's fp32 masters, AdamW moments and step, its working weights, schedule and step
    counters from a checkpoint's full state (any world size wrote it)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = dict(engine.module.named_parameters())
    differing = set(params) ^ set(state.shapes)
    if differing:
        raise ValueError(f"the checkpoint's parameters differ from the model's: {sorted(differing)[:5]}")
    adam = engine.optimizer.optimizer  # torch AdamW over the flat fp32 partitions (its state is created lazily)
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        adam.state[flat] = {"step": torch.tensor(state.step, dtype=torch.float32),
                            "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    for name, param in params.items():
        safe_set_full_fp32_param(param, state.full(name, "fp32"))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, state.full(name, key), key)
        param.ds_tensor.copy_(safe_get_local_fp32_param(param))  # the weights the forward gathers
    counters = state.engine_state
    engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
