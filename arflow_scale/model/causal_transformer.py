"""Pre-LayerNorm transformer over a token sequence, causal or bidirectional, with a KV cache.

Shared by the FARMER flow blocks and prior (causal) and the one-step inverse student
(bidirectional); docs/farmer.md §2, §3, §8. With a `KVCache` a causal stack continues the
sequence fed so far, one token (or several) at a time, and gives the outputs the whole
sequence fed at once would give at those positions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class KVCache:
    """Keys and values of every layer for the tokens fed so far, each (B, H, L, head_dim).

    Appending concatenates, so feeding L tokens one at a time copies O(L^2) elements per layer.
    """

    def __init__(self, depth: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * depth
        self.values: list[Optional[torch.Tensor]] = [None] * depth

    @property
    def length(self) -> int:
        """Tokens held by the last layer (all layers hold the same after a full step)."""
        last = self.keys[-1]
        return 0 if last is None else last.shape[2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append this step's k, v to `layer`; return all keys, values and the count before the step."""
        past_k, past_v = self.keys[layer], self.values[layer]
        past = 0 if past_k is None else past_k.shape[2]
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v, past


class SelfAttention(nn.Module):
    """Multi-head softmax attention: (B, L, W) -> (B, L, W); causal ones see only earlier positions."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(h), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        past = 0
        if cache is not None:
            k, v, past = cache.extend(layer, k, v)
        if not self.causal:
            out = F.scaled_dot_product_attention(q, k, v)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif q.shape[2] == 1:  # one new token sees every cached one
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # several new tokens after a cached prefix: causal mask shifted by `past`
            query_pos = torch.arange(q.shape[2], device=q.device) + past
            mask = rearrange(torch.arange(k.shape[2], device=q.device), "j -> 1 j") <= rearrange(query_pos, "i -> i 1")
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class TransformerLayer(nn.Module):
    """h + attn(LN(h)), then h + MLP(LN(h)); MLP = Linear, tanh-GELU, Linear."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, causal: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.norm2 = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, mlp_hidden), nn.Linear(mlp_hidden, width)

    def forward(self, h: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), cache, layer)
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h)), approximate="tanh"))


class Transformer(nn.Module):
    """`depth` layers and a final LayerNorm: (B, L, W) -> (B, L, W)."""

    def __init__(self, width: int, depth: int, heads: int, mlp_hidden: int, causal: bool):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_hidden, causal) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def forward(self, h: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            h = layer(h, cache, index)
        return self.norm(h)
