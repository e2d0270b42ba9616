"""The write side of checkpoints: every rank saves its part of the training state into a local folder (the
checkpointer uploads it into the checkpoint), and restores it on the world size that wrote it (another world
size: `reshard`). Layout: checkpoint/layout.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from arflow_scale.checkpoint.layout import CONFIG, DEEPSPEED, DS_TAG, META, rank_file, rank_listing
from arflow_scale.checkpoint.record import CheckpointRecord
from arflow_scale.checkpoint.safe_load import safe_checkpoint_engine

from .ema import EMA
from .rng import rng_state, set_rng_state


def save_state(folder: str | Path, *, engine, ema: EMA, stream, rank: int, record: CheckpointRecord,
               config_yaml: str) -> None:
    """Write this rank's part of a checkpoint into local `folder` (every rank calls it; rank 0 adds the
    record and the config)."""
    folder = Path(folder)
    engine.save_checkpoint(str(folder / DEEPSPEED), tag=DS_TAG)
    for sub in ("ema", "data", "rng", "ranks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if ema.partitioned or rank == 0:
        torch.save(ema.state_dict(), folder / rank_file("ema", rank))
    torch.save(stream.state_dict(), folder / rank_file("data", rank))
    torch.save(rng_state(), folder / rank_file("rng", rank))
    if rank == 0:
        (folder / META).write_text(record.to_json())
        (folder / CONFIG).write_text(config_yaml)
    write_listing(folder, rank)


def write_listing(folder: str | Path, rank: int) -> None:
    """Rank `rank`'s file list: every file in its local checkpoint folder with its size (written last)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.parent != folder / "ranks"}
    (folder / "ranks").mkdir(parents=True, exist_ok=True)
    (folder / rank_listing(rank)).write_text(json.dumps({"rank": rank, "files": files}))


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_engine(folder: str | Path, engine) -> None:
    """DeepSpeed's own load of the engine state in a local checkpoint folder (weights-only)."""
    safe_checkpoint_engine(engine)
    load_path, _ = engine.load_checkpoint(str(Path(folder) / DEEPSPEED), tag=DS_TAG,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"{folder}/{DEEPSPEED}: DeepSpeed found no checkpoint with tag {DS_TAG!r}")


def restore_state(folder: str | Path, *, engine, ema: EMA, stream, rank: int) -> CheckpointRecord:
    """Load this rank's state from a local checkpoint folder written by this world size; returns its record."""
    folder = Path(folder)
    record = CheckpointRecord.from_json((folder / META).read_text(), str(folder / META))
    load_engine(folder, engine)
    ema.load_state_dict(_load(folder / rank_file("ema", rank if ema.partitioned else 0)))
    stream.load_state_dict(_load(folder / rank_file("data", rank)))
    set_rng_state(_load(folder / rank_file("rng", rank)))
    return record
