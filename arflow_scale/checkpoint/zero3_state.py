"""The training state of a ZeRO-3 DeepSpeed checkpoint, one full parameter at a time: its fp32 master weight,
AdamW moments and step, assembled from the flat partitions of every rank that wrote it.

Layout (DeepSpeed's, as `zero_to_fp32` reads it): rank r's optimizer file holds flat fp32 groups (and AdamW
moments of the same length); walking the parameters in `param_shapes` order, each takes the next
ceil(numel / world) elements of every rank's flat groups, rank r holding elements [r * part, (r + 1) * part)
of the flattened parameter (the last rank zero-padded). Files are memory-mapped and loaded weights-only, so
only the slices being assembled are read.
"""
from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Any

import torch

from .safe_load import safe_load

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # what `full` assembles
ENGINE_KEYS = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")  # the engine's own counters


def optim_file(folder: Path, rank: int) -> Path:
    """Rank `rank`'s optimizer file (DeepSpeed prefixes it with `bf16_` when training in bf16)."""
    for prefix in ("", "bf16_"):
        path = folder / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if path.exists():
            return path
    raise FileNotFoundError(f"{folder}: no ZeRO-3 optimizer file of rank {rank} (zero_pp_rank_{rank}_mp_rank_00_"
                            f"optim_states.pt)")


def model_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


class Zero3State:
    """The state a ZeRO-3 checkpoint's `world_size` ranks wrote into DeepSpeed tag folder `folder`."""

    def __init__(self, folder: str | Path, world_size: int):
        folder = Path(folder)
        self.world_size = world_size
        model = safe_load(folder / model_file(0), mmap=True)
        self.engine_state: dict[str, Any] = {key: model.get(key) for key in ENGINE_KEYS}
        self.shapes: dict[str, list[int]] = {
            name: list(shape) for group in model["param_shapes"] for name, shape in group.items()}
        self._groups: dict[str, list[list[torch.Tensor]]] = {key: [] for key in STATE_KEYS}  # key -> rank -> group
        steps = set()
        for rank in range(world_size):
            where = optim_file(folder, rank)
            optim = safe_load(where, mmap=True)["optimizer_state_dict"]
            flats, state = optim["fp32_flat_groups"], optim["optimizer_state_dict"]["state"]
            if sorted(state) != list(range(len(flats))) or any(
                    state[i][k].numel() != flats[i].numel() for i in state for k in STATE_KEYS[1:]):
                raise ValueError(f"{where}: AdamW state does not match the {len(flats)} fp32 partition groups")
            self._groups["fp32"].append(list(flats))
            for key in STATE_KEYS[1:]:
                self._groups[key].append([state[i][key] for i in range(len(flats))])
            steps |= {float(state[i]["step"]) for i in state}
        if len(steps) != 1:
            raise ValueError(f"{folder}: the ranks' AdamW steps differ ({sorted(steps)})")
        self.step = steps.pop()
        self._offsets = self._place(folder)

    def _place(self, folder: Path) -> dict[str, tuple[int, int]]:
        """{name: (flat group, offset in it)} of each parameter's slice on every rank."""
        sizes = [g.numel() for g in self._groups["fp32"][0]]
        if any([g.numel() for g in groups] != sizes for groups in self._groups["fp32"]):
            raise ValueError(f"{folder}: the ranks' fp32 partition groups differ in size")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        places, offset = {}, 0
        for name, shape in self.shapes.items():
            part = math.ceil(math.prod(shape) / self.world_size)
            group = bisect.bisect_right(starts, offset) - 1
            if offset + part > starts[group] + sizes[group]:
                raise ValueError(f"{folder}: parameter {name} does not fit the fp32 partition groups")
            places[name] = (group, offset - starts[group])
            offset += part
        return places

    def full(self, name: str, key: str = "fp32") -> torch.Tensor:
        """The full fp32 tensor (the parameter's shape) of `key` (fp32, exp_avg, exp_avg_sq) of parameter `name`."""
        shape = self.shapes[name]
        numel = math.prod(shape)
        part = math.ceil(numel / self.world_size)
        group, offset = self._offsets[name]
        pieces = [ranks[group][offset: offset + part] for ranks in self._groups[key]]
        return torch.cat(pieces)[:numel].reshape(shape).float()
