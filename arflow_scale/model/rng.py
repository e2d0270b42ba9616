"""Seeded noise for FARMER: every draw comes from one torch.Generator (CPU unless given another).

Draws happen on the generator's device in the target dtype, then move to the target device, so a
CPU generator gives the same numbers whatever device the model runs on.
"""
from __future__ import annotations

from typing import Optional

import torch


def _draw(kind, shape: tuple[int, ...], generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return kind(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def uniform(shape: tuple[int, ...], generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) of `shape` in like's dtype, on like's device."""
    return _draw(torch.rand, tuple(shape), generator, like)


def normal(shape: tuple[int, ...], generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) of `shape` in like's dtype, on like's device."""
    return _draw(torch.randn, tuple(shape), generator, like)


def gumbel_argmax(logits: torch.Tensor, generator: Optional[torch.Generator], dim: int = -1) -> torch.Tensor:
    """A categorical draw with P(k) = softmax(logits)_k along `dim` (Gumbel-max trick)."""
    u = uniform(logits.shape, generator, logits).clamp_min(torch.finfo(logits.dtype).tiny)
    return (logits - torch.log(-torch.log(u))).argmax(dim=dim)
