"""Consolidated fp32 weights from a checkpoint, at any ZeRO stage: the EMA (from every rank's piece) and
the raw training weights (from DeepSpeed's files). Every file loads with weights_only=True.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, NamedTuple, Optional

import torch

from arflow_scale.config import Config
from arflow_scale.data.storage import filesystem

from .layout import DEEPSPEED, DS_TAG, param_group_names, rank_file
from .safe_load import safe_load, weights_only_zero_to_fp32
from .store import read_config, read_record, resolve_checkpoint

StateDict = dict[str, torch.Tensor]


class CheckpointWeights(NamedTuple):
    """A run's Config and one set of its consolidated fp32 weights (unpacks as `cfg, weights`)."""

    config: Config
    weights: StateDict


def state_dict_sha256(state_dict: StateDict) -> str:
    """sha256 over sorted names and fp32 values: equal iff the weights are bitwise equal in fp32."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def consolidate(per_rank_shadows: list[StateDict], meta: dict[str, dict[str, Any]],
                per_rank_starts: Optional[list[dict[str, int]]] = None) -> StateDict:
    """Partitioned EMA slices of ranks 0..W-1 -> full tensors: each slice placed where it starts in the
    flattened parameter (without `per_rank_starts`, the ZeRO-3 layout: slices back to back), padding
    dropped, shapes restored."""
    full = {}
    for name, info in meta.items():
        pieces = [shadow[name].reshape(-1) for shadow in per_rank_shadows]
        if per_rank_starts is None:
            starts = [sum(p.numel() for p in pieces[:r]) for r in range(len(pieces))]
        else:
            starts = [s[name] for s in per_rank_starts]
        flat = pieces[0].new_zeros(max([info["numel"]] + [s + p.numel() for s, p in zip(starts, pieces)]))
        for start, piece in zip(starts, pieces):
            flat[start: start + piece.numel()] = piece
        full[name] = flat[: info["numel"]].reshape(info["shape"]).clone()
    return full


def load_ema_weights(checkpoint_url: str, storage_options: Optional[dict] = None) -> CheckpointWeights:
    """(Config, consolidated fp32 EMA state_dict) of a checkpoint (or a run's latest), any ZeRO stage."""
    checkpoint_url = resolve_checkpoint(checkpoint_url, storage_options)
    record = read_record(checkpoint_url, storage_options)
    fs, path = filesystem(checkpoint_url, storage_options)
    states = []
    for rank in range(record.world_size) if record.ema_partitioned else [0]:
        with fs.open(f"{path.rstrip('/')}/{rank_file('ema', rank)}", "rb") as f:
            states.append(torch.load(f, map_location="cpu", weights_only=True))
    return CheckpointWeights(read_config(checkpoint_url, storage_options), ema_from_states(states))


def ema_from_states(states: list[dict[str, Any]]) -> StateDict:
    """The full EMA weights from the EMA states of a checkpoint: every rank's when partitioned, else rank 0's."""
    if states[0]["partitioned"]:
        starts = [s["starts"] for s in states] if "starts" in states[0] else None  # older: ZeRO-3 only
        return consolidate([s["shadow"] for s in states], states[0]["meta"], starts)
    return {name: t.clone() for name, t in states[0]["shadow"].items()}


def zero0_fp32_weights(states: dict[str, Any], where: str) -> StateDict:
    """A ZeRO-0 DeepSpeed model-states file -> fp32 weights: the optimizer's fp32 masters when it kept
    them (bf16 training: `fp32_groups`, in param-group order), else the module's own weights."""
    module = states["module"]
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    if not masters:
        return {k: v.float().clone() for k, v in module.items()}
    names = [n for group, _ in param_group_names({n: t.ndim for n, t in module.items()}) for n in group]
    tensors = [t for group in masters for t in group]
    if len(names) != len(tensors) or any(module[n].shape != t.shape for n, t in zip(names, tensors)):
        raise ValueError(f"{where}: the fp32 master groups do not match the module's parameters "
                         f"({len(tensors)} tensors for {len(names)} parameters)")
    return {n: t.float().clone() for n, t in zip(names, tensors)}


def load_raw_weights(checkpoint_url: str, storage_options: Optional[dict] = None) -> StateDict:
    """Consolidated fp32 training weights from the DeepSpeed files (zero_to_fp32), any ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # a 4 s import

    checkpoint_url = resolve_checkpoint(checkpoint_url, storage_options)
    record = read_record(checkpoint_url, storage_options)
    fs, path = filesystem(checkpoint_url, storage_options)
    with tempfile.TemporaryDirectory(prefix="arflow_ds_") as tmp:
        local = os.path.join(tmp, DEEPSPEED)
        fs.get(f"{path.rstrip('/')}/{DEEPSPEED}", local, recursive=True)
        if record.zero_stage == 0:
            states = safe_load(os.path.join(local, DS_TAG, "mp_rank_00_model_states.pt"))
            return zero0_fp32_weights(states, checkpoint_url)
        with weights_only_zero_to_fp32():
            state = get_fp32_state_dict_from_zero_checkpoint(local, tag=DS_TAG)
        return {k: v.float().clone() for k, v in state.items()}
