"""Analytic parameter count, forward FLOPs per sequence and sampling FLOPs per image of an ARFlow config.

FLOPs count matrix products only, 2 per multiply-add (the convention of torch's FlopCounterMode,
Kaplan et al.); element-wise work is ignored. Training FLOPs per sequence ~= 3 * forward_flops.
"""
from __future__ import annotations

import dataclasses

from .config import ModelConfig
from .sizes import FREQUENCY_DIM, ModelDims, resolve


def _dims(cfg: ModelConfig | ModelDims) -> ModelDims:
    return cfg if isinstance(cfg, ModelDims) else resolve(cfg)


def count_parameters(cfg: ModelConfig | ModelDims) -> int:
    """Trainable parameters of `build_model(cfg)` (equal to the sum of numel, checked by a test)."""
    d = _dims(cfg)
    w, m, out = d.width, d.mlp_hidden, d.patch * d.patch * d.in_channels
    embed = d.in_channels * d.patch * d.patch * w + w  # conv patch embed
    embed += FREQUENCY_DIM * w + w + w * w + w  # timestep MLP
    embed += (d.num_classes + 1) * w  # label table with the null class
    attn = 3 * w * w + w * w + (w * w + w)  # qkv, gate (no bias), output projection
    if d.attention == "hybrid":
        attn += w * d.heads + d.heads  # decay projection
    block = attn + (w * m + m + m * w + w) + (w * 6 * w + 6 * w)  # + MLP + adaLN
    final = (w * 2 * w + 2 * w) + (w * out + out)
    return embed + d.depth * block + final


def attention_flops(d: ModelDims) -> int:
    """Attention-core FLOPs of one layer over one sequence of d.k images (mode dependent)."""
    n, k, hd, w = d.tokens_per_image, d.k, d.head_dim, d.width
    intra = 4 * k * n * n * w  # QK^T and AV inside each image
    if d.attention == "intra":
        return intra
    if d.attention == "full":
        length = k * n
        return 4 * length * length * w  # dense masked SDPA over the whole sequence
    kv = 2 * k * n * hd * w  # K_i^T V_i per image
    # decayed sums of chunk KV, one matmul over chunks; with one chunk it is an element-wise product
    states = 2 * (k + 1) * k * hd * w if k > 1 else 0
    readout = 2 * k * n * hd * w if k > 1 else 0  # decayed q times state (none for one image without history)
    return intra + kv + states + readout


def forward_flops(cfg: ModelConfig | ModelDims) -> int:
    """Forward FLOPs of one sequence of cfg.k images (matmul FLOPs, 2 per MAC)."""
    d = _dims(cfg)
    w, m, k = d.width, d.mlp_hidden, d.k
    tokens = d.sequence_length
    out = d.patch * d.patch * d.in_channels
    flops = 2 * tokens * d.in_channels * d.patch * d.patch * w  # patch embed
    flops += k * (2 * FREQUENCY_DIM * w + 2 * w * w)  # timestep MLP per image
    per_layer = 2 * tokens * w * (3 * w + w + w)  # qkv, gate, proj
    if d.attention == "hybrid":
        per_layer += 2 * tokens * w * d.heads  # decay projection
    per_layer += 2 * tokens * w * m * 2  # MLP
    per_layer += k * 2 * w * 6 * w  # adaLN per image
    per_layer += attention_flops(d)
    flops += d.depth * per_layer
    flops += k * 2 * w * 2 * w + 2 * tokens * w * out  # final adaLN + linear
    return flops


def sampling_flops(cfg: ModelConfig | ModelDims, steps: int, guided: bool = False) -> int:
    """Matmul FLOPs of drawing one sample with `steps` model calls through the cache (docs/arflow.md §5.1):
    each call is a forward over one image (the first one without history, as `forward_flops` at K = 1);
    under `hybrid` every later call also reads the carried state; under `full` call j (1-based) also attends
    to the cached keys of the j - 1 earlier images, so its cost grows with j. CFG (`guided`) doubles every call."""
    d = _dims(cfg)
    n, later_calls = d.tokens_per_image, max(steps - 1, 0)
    flops = steps * forward_flops(dataclasses.replace(d, k=1))
    if d.attention == "hybrid":  # decayed q times the carried (D, D) state, every layer
        flops += d.depth * later_calls * 2 * n * d.head_dim * d.width
    if d.attention == "full":  # QK^T and AV over the (j - 1) N cached keys, every layer
        flops += d.depth * 4 * n * n * d.width * (steps * later_calls // 2)
    return flops * (2 if guided else 1)
