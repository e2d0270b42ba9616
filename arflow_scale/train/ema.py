"""Exponential moving average of the weights that works under every ZeRO stage, including ZeRO-3.

How it works. After each optimizer step every rank updates, in fp32,
``shadow <- decay * shadow + (1 - decay) * weight`` over the weights *it holds locally*:

- ZeRO 0, 1, 2: every rank holds the full parameters, so every rank keeps the full EMA (the ranks'
  copies are identical; only rank 0 writes it to a checkpoint).
- ZeRO-3: a rank holds only its partition of each parameter, ``param.ds_tensor`` (a flat slice of
  ``ceil(numel / world)`` elements, zero-padded on the last rank). The EMA is kept over exactly that
  slice, so it is partitioned like the weights themselves: no gather per step, no extra
  communication, and EMA memory per rank drops with the world size like ZeRO-3's weights do. Each
  rank saves its slice; `consolidate` (used by export / sampling) concatenates the slices in rank
  order, drops the padding and restores ``param.ds_shape``. `full_state_dict` does the same live, with
  one all-gather, when rank 0 needs the full EMA during training (sample grids, hashes).

The update is elementwise, so the partitioned EMA equals the EMA of the gathered weights exactly.
"""
from __future__ import annotations

from typing import Any

import torch


def _local_weight(param: torch.nn.Parameter) -> torch.Tensor:
    """The part of `param` this rank holds: the ZeRO-3 partition, else the parameter itself."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class EMA:
    """fp32 EMA over the locally held weights of `module` (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = float(decay)
        params = dict(module.named_parameters())
        self.partitioned = any(hasattr(p, "ds_tensor") for p in params.values())
        self.shadow: dict[str, torch.Tensor] = {
            name: _local_weight(p).detach().float().clone() for name, p in params.items()}
        self.meta: dict[str, dict[str, Any]] = {
            name: {"shape": list(p.ds_shape) if self.partitioned else list(p.shape),
                   "numel": int(p.ds_numel) if self.partitioned else p.numel()}
            for name, p in params.items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weight, for every locally held weight."""
        for name, param in module.named_parameters():
            self.shadow[name].lerp_(_local_weight(param).detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of tensors/lists/numbers (loads with torch.load(weights_only=True))."""
        return {"decay": self.decay, "partitioned": self.partitioned, "shadow": self.shadow,
                "meta": self.meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing or bool(state["partitioned"]) != self.partitioned:
            raise ValueError(f"EMA state does not match the model (differing keys: {sorted(missing)[:5]}, "
                             f"partitioned {state['partitioned']} vs {self.partitioned})")
        for name, tensor in state["shadow"].items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state for {name}: shape {tuple(tensor.shape)} != "
                                 f"{tuple(self.shadow[name].shape)} (different world size?)")
            self.shadow[name].copy_(tensor)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full EMA weights {name: fp32 tensor}; a collective under ZeRO-3 (all ranks call it)."""
        if not self.partitioned:
            return {name: t.clone() for name, t in self.shadow.items()}
        import torch.distributed as dist

        names = sorted(self.shadow)
        local = torch.cat([self.shadow[n].reshape(-1) for n in names])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        sizes = [self.shadow[n].numel() for n in names]
        per_rank = [dict(zip(names, torch.split(flat, sizes))) for flat in gathered]
        return consolidate(per_rank, self.meta)


def consolidate(per_rank_shadows: list[dict[str, torch.Tensor]],
                meta: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """ZeRO-3 EMA slices of ranks 0..W-1 -> full tensors: concatenate, drop padding, reshape."""
    full = {}
    for name, info in meta.items():
        flat = torch.cat([shadow[name].reshape(-1) for shadow in per_rank_shadows])
        full[name] = flat[: info["numel"]].reshape(info["shape"]).clone()
    return full
