"""Input embeddings: per-image patch embedding, shared 2-D sin-cos positions, timestep and label."""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions (M,) -> (M, dim) as [sin, cos] of positions times geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = rearrange(positions.double(), "m -> m 1") * rearrange(omega, "f -> 1 f")
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid*grid, dim), row-major like the patch order (DiT)."""
    if dim % 4 != 0:
        raise ValueError(f"sincos_pos_embed_2d: dim {dim} must be a multiple of 4")
    coords = torch.arange(grid)
    rows = sincos_1d(dim // 2, coords.repeat_interleave(grid))
    cols = sincos_1d(dim // 2, coords.repeat(grid))
    return torch.cat([cols, rows], dim=1).float()


class PatchEmbed(nn.Module):
    """Each image of (B, K, C, H, W) -> (B, K, N, width) tokens by a strided conv, N = (H/p)^2."""

    def __init__(self, in_channels: int, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        tokens = self.proj(rearrange(x, "b k c h w -> (b k) c h w"))
        return rearrange(tokens, "(b k) d gh gw -> b k (gh gw) d", b=batch)


class TimestepEmbedder(nn.Module):
    """t (...) in [0, 1], fed unscaled -> (..., width): 256-d sinusoid then a 2-layer MLP."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """t (...) -> (..., frequency_dim) as [cos, sin] with periods up to 10000."""
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = rearrange(t.float(), "... -> ... 1") * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y (B,) long in [0, num_classes] -> (B, width); row num_classes is the CFG null class."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)
