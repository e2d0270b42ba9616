"""The dense ablation (`full_attention`) on flex_attention: block-causal softmax with a block mask.

On CUDA flex_attention is compiled (one fused Triton kernel forward and backward, the mask read
per 128x128 block: fully masked blocks are skipped, no (L x L) mask in memory). Elsewhere it runs
flex's eager implementation, which materialises the scores and has no backward on CPU (torch 2.13):
that path exists so the semantics can be tested without a GPU.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .attention import _check_shapes, full_attention


@functools.lru_cache(maxsize=32)
def block_causal_mask(length: int, chunk_size: int, device: str) -> BlockMask:
    """Token i sees token j iff chunk(j) <= chunk(i); cached per (length, chunk, device)."""

    def earlier_or_same_chunk(batch, head, q_idx, kv_idx):
        return kv_idx // chunk_size <= q_idx // chunk_size

    return create_block_mask(earlier_or_same_chunk, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (static shapes: one graph per sequence length)."""
    return torch.compile(flex_attention, dynamic=False)


def full_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                        state: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`full_attention` on flex_attention: q, k, v (B, H, L, D) -> out (B, H, L, D), (k, v).

    With a state (the KV cache of earlier chunks, used when sampling) it falls back to the
    reference `full_attention`. Under autocast q, k, v are cast to the autocast dtype, as SDPA would.
    """
    if state is not None:
        return full_attention(q, k, v, chunk_size, state)
    _check_shapes(q, k, v, chunk_size)
    keys, values = k, v
    if torch.is_autocast_enabled(q.device.type):
        low = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(low) for t in (q, k, v))
    mask = block_causal_mask(q.shape[2], chunk_size, str(q.device))
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=mask), (keys, values)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=mask), (keys, values)
