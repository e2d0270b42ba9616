"""Flow-matching objective over a causal sequence of images (docs/arflow.md §4).

Per sequence: t_1..t_K ~ U[0, 1) sorted ascending (noisiest first), x_t = t x + (1 - t) eps,
target velocity u = x - eps, plain MSE; the label is replaced by the null class with probability
`class_dropout` per sequence. All randomness comes from an explicit CPU generator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ARFlow inside a DeepSpeed engine / DDP / torch.compile wrapper (or the model itself)."""
    while not hasattr(model, "null_class"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise ValueError(f"{type(model).__name__} is not an ARFlow model (no null_class attribute)")
        model = inner
    return model


def draw_noise_levels(batch: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, K) i.i.d. U[0, 1) sorted ascending along the sequence."""
    return torch.rand(batch, k, generator=generator).sort(dim=1).values


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, eps (B, K, C, H, W), t (B, K) -> x_t = t x + (1 - t) eps and velocity target x - eps."""
    t = rearrange(t, "b k -> b k 1 1 1").to(x.dtype)
    return t * x + (1 - t) * eps, x - eps


def drop_labels(y: torch.Tensor, null_class: int, class_dropout: float,
                generator: torch.Generator) -> torch.Tensor:
    """Replace each sequence's label by `null_class` with probability class_dropout."""
    drop = torch.rand(y.shape[0], generator=generator) < class_dropout
    return torch.where(drop.to(y.device), torch.full_like(y, null_class), y)


def flow_matching_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       generator: torch.Generator, class_dropout: float) -> torch.Tensor:
    """Scalar MSE between model velocity and x - eps; x (B, K, C, H, W) data, y (B,) long labels."""
    if generator.device.type != "cpu":
        raise ValueError(f"flow_matching_loss: generator must be a CPU torch.Generator, got {generator.device}")
    if not 0.0 <= class_dropout < 1.0:
        raise ValueError(f"flow_matching_loss: class_dropout must be in [0, 1), got {class_dropout}")
    batch, k = x.shape[:2]
    t = draw_noise_levels(batch, k, generator)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    y = drop_labels(y, unwrap_model(model).null_class, class_dropout, generator)
    t, eps = t.to(x.device), eps.to(device=x.device, dtype=x.dtype)
    x_t, target = interpolate(x, eps, t)
    velocity = model(x_t, t.to(x.dtype), y)
    return F.mse_loss(velocity.float(), target.float())


def sequence_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Per-sequence flow-matching MSE (B,) for held-out evaluation: sequence b's noise levels and noise come from
    a generator seeded with seeds[b] alone and no label is dropped, so a sequence scores the same in any batch
    of the same shape."""
    if len(seeds) != x.shape[0]:
        raise ValueError(f"sequence_losses: {len(seeds)} seeds for {x.shape[0]} sequences")
    levels, noise = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        levels.append(draw_noise_levels(1, x.shape[1], generator)[0])
        noise.append(torch.randn(x.shape[1:], generator=generator, dtype=torch.float32))
    t = torch.stack(levels).to(x.device)
    eps = torch.stack(noise).to(device=x.device, dtype=x.dtype)
    x_t, target = interpolate(x, eps, t)
    velocity = model(x_t, t.to(x.dtype), y)
    return (velocity.float() - target.float()).pow(2).flatten(1).mean(dim=1)
