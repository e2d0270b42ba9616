"""FARMER's invertible autoregressive flow over pixel tokens (docs/farmer.md §1, §2).

Image (B, C, H, W) -> tokens (B, N, D), N = (H/p)^2 in raster order, D = p*p*C laid out
(p1 p2 c). Each of `flow_blocks` blocks is a causal transformer that, in its own token order
(raster for even blocks, reversed for odd ones, as TarFlow), maps
    z_i = (x_i - mu(x_<i)) * exp(s(x_<i)),    logdet = sum_i sum_d s_id,
with (mu, s) of the first token zero (identity). The inverse runs token by token per block.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .causal_transformer import Transformer
from .embeddings import LabelEmbedder, sincos_pos_embed_2d
from .farmer_sizes import FarmerArgs


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) raster-order patch tokens."""
    return rearrange(x, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=patch, p2=patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); inverse of `patchify` for square images."""
    grid = round(tokens.shape[1] ** 0.5)
    return rearrange(tokens, "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)", gh=grid, p1=patch, p2=patch, c=channels)


def check_labels(y: torch.Tensor, batch: int, who: str) -> None:
    """y must be an integer (B,) tensor (values up to num_classes, the null class)."""
    if tuple(y.shape) != (batch,) or y.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{who}: y must be an integer tensor of shape ({batch},), got {tuple(y.shape)} {y.dtype}")


class AutoregressiveFlowBlock(nn.Module):
    """One affine autoregressive block: tokens (B, N, D) <-> (B, N, D) in image order; `reverse` flips its order."""

    def __init__(self, args: FarmerArgs, reverse: bool):
        super().__init__()
        self.reverse = reverse
        width, dim = args.flow_width, args.token_dim
        self.embed = nn.Linear(dim, width)
        self.label = LabelEmbedder(args.num_classes, width) if args.flow_conditioning else None
        pos = sincos_pos_embed_2d(width, args.grid)
        self.register_buffer("pos", pos.flip(0) if reverse else pos, persistent=False)
        self.transformer = Transformer(width, args.flow_depth, args.flow_heads, args.flow_mlp_hidden, causal=True)
        self.head = nn.Linear(width, 2 * dim)  # -> (mu, s) of the next token; zero-init = identity block
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _ordered(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.flip(1) if self.reverse else tokens

    def _shift_scale(self, x: torch.Tensor, y: torch.Tensor, start: int = 0, cache=None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ordered tokens x (B, L, D) at positions start.. -> (mu, s) (B, L, D) for the token after each."""
        h = self.embed(x) + self.pos[start:start + x.shape[1]].to(x.dtype)
        if self.label is not None:
            h = h + rearrange(self.label(y), "b w -> b 1 w")
        mu, log_scale = self.head(self.transformer(h, cache)).chunk(2, dim=-1)
        acc = torch.promote_types(x.dtype, torch.float32)  # the affine map stays >= fp32 under autocast
        return mu.to(acc), log_scale.to(acc)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> z (B, N, D), logdet (B,) in nats; one parallel pass."""
        ordered = self._ordered(x)
        mu, log_scale = self._shift_scale(ordered, y)
        mu, log_scale = (F.pad(t[:, :-1], (0, 0, 1, 0)) for t in (mu, log_scale))  # token 0: identity
        z = (ordered.to(mu.dtype) - mu) * torch.exp(log_scale)
        return self._ordered(z), log_scale.sum(dim=(1, 2))

    def inverse(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z (B, N, D) -> x (B, N, D): N - 1 sequential one-token steps with a KV cache."""
        ordered = self._ordered(z)
        cache = self.transformer.new_cache()
        tokens = [ordered[:, 0]]
        for i in range(1, ordered.shape[1]):
            mu, log_scale = self._shift_scale(tokens[-1][:, None], y, start=i - 1, cache=cache)
            tokens.append((ordered[:, i] * torch.exp(-log_scale[:, 0]) + mu[:, 0]).to(z.dtype))
        return self._ordered(torch.stack(tokens, dim=1))


class FarmerFlow(nn.Module):
    """The AF: forward(x (B, C, H, W), y) -> (z (B, N, D), logdet (B,)); inverse(z, y) -> x."""

    def __init__(self, args: FarmerArgs):
        super().__init__()
        self.args = args
        self.blocks = nn.ModuleList(AutoregressiveFlowBlock(args, reverse=index % 2 == 1)
                                    for index in range(args.flow_blocks))

    def _check_image(self, x: torch.Tensor) -> None:
        a = self.args
        want = (a.in_channels, a.image_size, a.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"FarmerFlow: x must be (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")

    def _check_latent(self, z: torch.Tensor) -> None:
        want = (self.args.num_tokens, self.args.token_dim)
        if z.dim() != 3 or tuple(z.shape[1:]) != want:
            raise ValueError(f"FarmerFlow: z must be (B, {want[0]}, {want[1]}), got {tuple(z.shape)}")

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Data-space image -> latent tokens and log|det dz/dx| per image (nats)."""
        self._check_image(x)
        y = self._labels(y, x.shape[0], x.device)
        tokens = patchify(x, self.args.patch)
        logdet = torch.zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for block in self.blocks:
            tokens, block_logdet = block(tokens, y)
            logdet = logdet + block_logdet
        return tokens, logdet

    def inverse(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Latent tokens (B, N, D) -> image (B, C, H, W); sequential: flow_blocks * (N - 1) steps."""
        self._check_latent(z)
        y = self._labels(y, z.shape[0], z.device)
        for block in reversed(self.blocks):
            z = block.inverse(z, y)
        return unpatchify(z, self.args.patch, self.args.in_channels)

    def _labels(self, y: Optional[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        """The labels the blocks read; an unconditional flow accepts None (the null class)."""
        if y is None:
            if self.args.flow_conditioning:
                raise ValueError("FarmerFlow: y is required when flow_conditioning is True")
            return torch.full((batch,), self.args.num_classes, device=device, dtype=torch.long)
        check_labels(y, batch, "FarmerFlow")
        return y
