"""Where things are inside a checkpoint folder, and how its name encodes the step.

`<run>/checkpoint_<step:09d>/` (every rank uploads its files into it, its file list last):
  deepspeed/<DS_TAG>/     DeepSpeed `save_checkpoint` output: model, optimizer, scheduler
  ema/rank_<r>.pt         EMA (rank 0 only when its layout is "full"; every rank's piece otherwise)
  data/rank_<r>.pt        the data stream's state_dict() of rank r
  rng/rank_<r>.pt         torch / numpy / python RNG states of rank r
  meta.json               the CheckpointRecord (rank 0)
  config.yaml             the resolved Config, secrets masked (rank 0)
  ranks/rank_<r>.json     the files rank r wrote with their sizes: the checkpoint is complete only when
                          every rank's list is present and every file has its size.
"""
from __future__ import annotations

import re
from typing import Callable

DS_TAG = "state"
DS_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank files (ZeRO 1-3)
META = "meta.json"
CONFIG = "config.yaml"
DEEPSPEED = "deepspeed"
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:09d}"


def checkpoint_step(checkpoint_url: str) -> int:
    """The step of a checkpoint folder named by `checkpoint_dir_name` (.../checkpoint_000000400)."""
    return int(checkpoint_url.rstrip("/").rsplit("_", 1)[-1])


def rank_file(kind: str, rank: int) -> str:
    """Relative path of rank `rank`'s file of `kind` (ema, data, rng) in a checkpoint folder."""
    return f"{kind}/rank_{rank}.pt"


def rank_listing(rank: int) -> str:
    """Relative path of the list of files rank `rank` wrote (with their sizes)."""
    return f"ranks/rank_{rank}.json"


def files_of_rank(rank: int, ema_partitioned: bool) -> Callable[[str], bool]:
    """Whether a checkpoint file (its relative path) is needed to restore rank `rank` on the world size that
    wrote the checkpoint: the shared files and that rank's own (its EMA piece, or rank 0's full EMA)."""
    own = {rank_file("data", rank), rank_file("rng", rank), rank_file("ema", rank if ema_partitioned else 0)}

    def needed(rel: str) -> bool:
        if rel.startswith(("ema/", "data/", "rng/", "ranks/")):
            return rel in own
        match = DS_RANK_FILE.match(rel.rsplit("/", 1)[-1])
        return match is None or int(match.group(1)) == rank

    return needed


def param_group_names(ndims: dict[str, int]) -> list[tuple[list[str], bool]]:
    """{parameter name: ndim} -> [(names, decayed)] per AdamW group: matrices (ndim >= 2, decayed),
    then the rest, each sorted; empty groups dropped. The order of the optimizer's param groups, and so
    of DeepSpeed's fp32 master copies inside a checkpoint."""
    names = sorted(ndims)
    groups = [([n for n in names if ndims[n] >= 2], True), ([n for n in names if ndims[n] < 2], False)]
    return [(members, decayed) for members, decayed in groups if members]
