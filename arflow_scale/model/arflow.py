"""The ARFlow transformer (docs/arflow.md §2): a SiT/DiT backbone over a causal sequence of K images.

x (B, K, C, H, W) -> per-image patch tokens (B, K, N, width) + shared 2-D sin-cos positions;
conditioning c (B, K, width) = label + time embedding per image; adaLN-Zero blocks around the
chunk-wise attention (one chunk = one image); zero-initialised final layer -> velocity.
One class serves training and sampling: with an `ARFlowCache` the model continues a sequence
one image (or several) at a time, carrying each layer's attention state.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .aligned import AlignedLinear
from .attention import chunk_attention, resolve_backend
from .config import ModelConfig, model_config
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from .sizes import FREQUENCY_DIM, ModelDims, resolve


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, K, N, W) with per-image shift/scale (B, K, 1, W)."""
    return x * (1 + scale) + shift


class ARFlowCache:
    """Per-layer attention states of the images seen so far; rows follow the batch rows.

    hybrid: (B, H, D, D) fp32 per layer; full: the (k, v) of all earlier tokens; intra: None.
    """

    def __init__(self, depth: int):
        self.states: list[object] = [None] * depth
        self.num_images = 0

    def reset(self) -> None:
        self.states = [None] * len(self.states)
        self.num_images = 0


class ChunkAttention(nn.Module):
    """The attention block (docs/arflow.md §3.1): q/k/v RMS norms, decay from x + c, per-head out norm, SiLU gate.

    backend: `model.attention_backend` (auto, torch, triton, triton_sdpa), resolved per call for the tensors' device.
    """

    def __init__(self, width: int, heads: int, mode: str, backend: str = "auto"):
        super().__init__()
        self.heads, self.head_dim, self.mode, self.backend = heads, width // heads, mode, backend
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.gate = nn.Linear(width, width, bias=False)
        self.decay = AlignedLinear(width, heads) if mode == "hybrid" else None
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, c: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        """x (B, K, N, W) modulated input, c (B, K, W) -> (B, K, N, W), new state."""
        num_images, tokens = x.shape[1], x.shape[2]
        qkv = rearrange(self.qkv(x), "b k n (three h d) -> three b h (k n) d", three=3, h=self.heads)
        q, k, v = (F.rms_norm(t, (self.head_dim,), eps=1e-6) for t in qkv)
        log_decay = None
        if self.decay is not None:
            log_decay = F.logsigmoid(self.decay(x + rearrange(c, "b k w -> b k 1 w"))) / 16
            log_decay = rearrange(log_decay, "b k n h -> b h (k n)")
        out, state = chunk_attention(self.mode, q, k, v, log_decay, tokens, state,
                                     backend=resolve_backend(self.backend, q))
        out = F.rms_norm(out, (self.head_dim,), eps=1e-6)
        out = rearrange(out, "b h (k n) d -> b k n (h d)", k=num_images)
        return self.proj(F.silu(self.gate(x)) * out), state


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ARFlowBlock(nn.Module):
    """adaLN-Zero transformer block; the 6 modulation vectors come from c per image."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, mode: str, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = ChunkAttention(width, heads, mode, backend)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        """x (B, K, N, W), c (B, K, W) -> (B, K, N, W), new attention state."""
        mods = rearrange(self.adaLN_modulation(c), "b k (six w) -> six b k 1 w", six=6)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = mods
        attn_out, state = self.attn(modulate(self.norm1(x), shift_attn, scale_attn), c, state)
        x = x + gate_attn * attn_out
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, state


class FinalLayer(nn.Module):
    """adaLN + LayerNorm + zero-initialised linear to patch pixels: (B, K, N, W) -> (B, K, N, p*p*C)."""

    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = rearrange(self.adaLN_modulation(c), "b k (two w) -> two b k 1 w", two=2)
        return self.linear(modulate(self.norm(x), shift, scale))


class ARFlow(nn.Module):
    """ARFlow velocity model: forward(x (B, K, C, H, W), t (B, K), y (B,), cache) -> (B, K, C, H, W)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.dims: ModelDims = resolve(config)
        d = self.dims
        self.null_class = d.num_classes
        self.x_embedder = PatchEmbed(d.in_channels, d.width, d.patch)
        self.t_embedder = TimestepEmbedder(d.width, FREQUENCY_DIM)
        self.y_embedder = LabelEmbedder(d.num_classes, d.width)
        grid = d.image_size // d.patch
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d.width, grid), persistent=False)
        self.blocks = nn.ModuleList(ARFlowBlock(d.width, d.heads, d.mlp_hidden, d.attention,
                                                config.attention_backend) for _ in range(d.depth))
        self.final_layer = FinalLayer(d.width, d.patch, d.in_channels)
        self.checkpoint_every_n = config.checkpoint_every_n
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, zero biases; N(0, 0.02) embeddings; adaLN and final layer zero (DiT)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        conv = self.x_embedder.proj
        nn.init.xavier_uniform_(rearrange(conv.weight.data, "o i h w -> o (i h w)"))
        nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def new_cache(self) -> ARFlowCache:
        """An empty cache for sampling one image at a time."""
        return ARFlowCache(len(self.blocks))

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        d = self.dims
        want = (d.in_channels, d.image_size, d.image_size)
        if x.dim() != 5 or tuple(x.shape[2:]) != want:
            raise ValueError(f"ARFlow: x must be (B, K, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if tuple(t.shape) != tuple(x.shape[:2]):
            raise ValueError(f"ARFlow: t must be (B, K) = {tuple(x.shape[:2])}, got {tuple(t.shape)}")
        if tuple(y.shape) != (x.shape[0],):
            raise ValueError(f"ARFlow: y must be (B,) = ({x.shape[0]},), got {tuple(y.shape)}")

    def _checkpointed(self, index: int) -> bool:
        n = self.checkpoint_every_n
        return n > 0 and index % n == 0 and torch.is_grad_enabled()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                cache: Optional[ARFlowCache] = None) -> torch.Tensor:
        """Velocity for K' images; with `cache` they continue the cached sequence (updated in place)."""
        self._check_inputs(x, t, y)
        num_images = x.shape[1]
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, K, N, W)
        c = self.t_embedder(t) + rearrange(self.y_embedder(y), "b w -> b 1 w")  # (B, K, W)
        for index, block in enumerate(self.blocks):
            state = cache.states[index] if cache is not None else None
            if self._checkpointed(index):
                h, state = checkpoint(block, h, c, state, use_reentrant=False)
            else:
                h, state = block(h, c, state)
            if cache is not None:
                cache.states[index] = state
        if cache is not None:
            cache.num_images += num_images
        out = self.final_layer(h, c)
        d = self.dims
        grid = d.image_size // d.patch
        return rearrange(out, "b k (gh gw) (p1 p2 c) -> b k c (gh p1) (gw p2)",
                         gh=grid, p1=d.patch, p2=d.patch)


def build_model(size: str | ModelConfig, **overrides) -> ARFlow:
    """`build_model("tiny/2", image_size=8, in_channels=1, num_classes=10, k=3)` -> ARFlow."""
    return ARFlow(model_config(size, **overrides))
