"""Exponential moving average of the weights that works under every ZeRO stage.

How it works. After each optimizer step every rank updates, in fp32,
``shadow <- decay * shadow + (1 - decay) * weight`` over the weights *it holds locally*:

- ZeRO 0 (`layout` "full"): every rank holds the full parameters, so every rank keeps the full EMA
  (identical copies; only rank 0 writes it to a checkpoint), of the optimizer's fp32 masters when
  given them (bf16: DeepSpeed's mixed-precision wrapper keeps one per parameter).
- ZeRO 1, 2 ("fragments"): the optimizer's fp32 master weights are partitioned: a rank holds, of
  each parameter, the contiguous piece of its flattened elements that falls in its partition
  (DeepSpeed's ``param._hp_mapping``; none for some parameters). The EMA is kept over exactly those
  fp32 masters, so it is exact in bf16 (not an average of bf16-rounded weights) and its memory falls
  with the world size.
- ZeRO-3 ("zero3"): a rank holds only its partition of each parameter, ``param.ds_tensor`` (a flat
  slice of ``ceil(numel / world)`` elements, zero-padded on the last rank), and the EMA is kept over
  that slice of the fp32 masters (the optimizer's `get_local_fp32_param`).

A partitioned EMA records where its slice starts in each flattened parameter; `consolidate` (used by
export / sampling from checkpoint files) and `full_state_dict` (live, one gather to rank 0 when it
needs the full EMA: sample grids, hashes) place the ranks' slices there, drop any padding and restore the
shapes. The update is elementwise, so the partitioned EMA equals the EMA of the gathered weights.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from arflow_scale.checkpoint.weights import consolidate


def _layout(params: dict[str, torch.nn.Parameter]) -> str:
    if any(hasattr(p, "ds_tensor") for p in params.values()):
        return "zero3"
    if any(hasattr(p, "_hp_mapping") for p in params.values()):
        return "fragments"
    return "full"


def _dp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class EMA:
    """fp32 EMA over the locally held weights of `module` (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, decay: float, masters: dict[int, torch.Tensor] | None = None):
        """masters: {id(param): fp32 master} kept by a mixed-precision optimizer without ZeRO (updated in
        place every step; `engine.wrapper_masters`): the EMA averages those instead of the bf16 weights."""
        self.decay = float(decay)
        self._masters = dict(masters or {})
        params = dict(module.named_parameters())
        self.layout = _layout(params)
        self.partitioned = self.layout != "full"
        self.shadow: dict[str, torch.Tensor] = {
            name: self._local(p).detach().float().clone() for name, p in params.items()}
        self.starts: dict[str, int] = {name: self._start(p) for name, p in params.items()}
        self.meta: dict[str, dict[str, Any]] = {
            name: {"shape": list(p.ds_shape) if self.layout == "zero3" else list(p.shape),
                   "numel": int(p.ds_numel) if self.layout == "zero3" else p.numel()}
            for name, p in params.items()}

    def _local(self, param: torch.nn.Parameter) -> torch.Tensor:
        """What this rank holds of `param`: its ZeRO-3 partition, its fp32 master fragment (ZeRO 1-2;
        empty when the rank holds none), or the parameter itself."""
        if self.layout == "zero3":
            optimizer = getattr(param, "_z3_optimizer", None)  # its fp32 master partition when it has one
            master = optimizer.get_local_fp32_param(param) if optimizer is not None else None
            return param.ds_tensor if master is None else master
        if self.layout == "fragments":
            mapping = param._hp_mapping
            return mapping.get_hp_fragment() if mapping is not None else param.data.new_empty(0, dtype=torch.float32)
        return self._masters.get(id(param), param.data)

    def _start(self, param: torch.nn.Parameter) -> int:
        """Where this rank's slice starts in the flattened parameter."""
        if self.layout == "zero3":
            return _dp_rank() * param.ds_tensor.numel()
        if self.layout == "fragments" and param._hp_mapping is not None:
            return int(param._hp_mapping.lp_fragment_address.start)
        return 0

    def local_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """{name: what this rank holds of the weight}: the pieces the EMA averages (see `_local`)."""
        return {name: self._local(param) for name, param in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weight, for every locally held weight."""
        for name, local in self.local_weights(module).items():
            if local.numel():
                self.shadow[name].lerp_(local.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of tensors/lists/numbers (loads with torch.load(weights_only=True))."""
        return {"decay": self.decay, "partitioned": self.partitioned, "layout": self.layout,
                "shadow": self.shadow, "starts": self.starts, "meta": self.meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        layout = state.get("layout", "zero3" if state["partitioned"] else "full")
        if missing or layout != self.layout:
            raise ValueError(f"EMA state does not match the model (differing keys: {sorted(missing)[:5]}, "
                             f"layout {layout} vs {self.layout})")
        for name, tensor in state["shadow"].items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state for {name}: shape {tuple(tensor.shape)} != "
                                 f"{tuple(self.shadow[name].shape)} (different world size?)")
            self.shadow[name].copy_(tensor)

    @torch.no_grad()
    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Take this rank's pieces of full EMA weights {name: tensor} (an EMA consolidated from a checkpoint
        that another number of ranks wrote): each slice from where it starts, zero padding past the end."""
        differing = set(self.shadow) ^ set(full)
        if differing:
            raise ValueError(f"EMA weights do not match the model (differing keys: {sorted(differing)[:5]})")
        for name, shadow in self.shadow.items():
            flat = full[name].reshape(-1)
            if flat.numel() != self.meta[name]["numel"]:
                raise ValueError(f"EMA weights for {name}: {flat.numel()} elements, the model has "
                                 f"{self.meta[name]['numel']}")
            piece = flat[self.starts[name]: self.starts[name] + shadow.numel()].float()
            shadow.zero_().reshape(-1)[: piece.numel()].copy_(piece)

    def full_state_dict(self, dst: int | None = None) -> dict[str, torch.Tensor] | None:
        """The full EMA weights {name: fp32 tensor}; a collective when partitioned (all ranks call it).
        With `dst`, only that rank receives them (the others get None): no rank but it holds a copy
        of the whole model for a moment."""
        if not self.partitioned:
            return {name: t.clone() for name, t in self.shadow.items()}
        names = sorted(self.shadow)
        local = torch.cat([self.shadow[n].reshape(-1) for n in names])
        layouts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(layouts, [(self.starts[n], self.shadow[n].numel()) for n in names])
        longest = max(sum(size for _, size in layout) for layout in layouts)
        padded = torch.cat([local, local.new_zeros(longest - local.numel())])
        receives = dst is None or dist.get_rank() == dst
        gathered = [torch.empty_like(padded) for _ in layouts] if receives else None
        if dst is None:
            dist.all_gather(gathered, padded)
        else:
            dist.gather(padded, gathered, dst=dst)
        if not receives:
            return None
        shadows, starts = [], []
        for flat, layout in zip(gathered, layouts):
            pieces = torch.split(flat[: sum(size for _, size in layout)], [size for _, size in layout])
            shadows.append(dict(zip(names, pieces)))
            starts.append({n: start for n, (start, _) in zip(names, layout)})
        return consolidate(shadows, self.meta, starts)
