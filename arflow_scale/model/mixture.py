"""Diagonal Gaussian mixtures and the resampling classifier-free guidance (docs/farmer.md §3, §7).

A mixture over R^d with K components and batch shape (...):
p(x) = sum_k softmax(logits)_k prod_j N(x_j; means_kj, exp(log_scales_kj)^2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange

from .rng import gumbel_argmax, normal

HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class DiagonalMixture:
    """logits (..., K), means (..., K, d), log_scales (..., K, d)."""

    logits: torch.Tensor
    means: torch.Tensor
    log_scales: torch.Tensor

    @staticmethod
    def num_params(components: int, dim: int) -> int:
        """Size of the raw parameter vector `from_params` reads: K logits, K*d means, K*d log-scales."""
        return components * (1 + 2 * dim)

    @classmethod
    def from_params(cls, raw: torch.Tensor, components: int, dim: int) -> "DiagonalMixture":
        """raw (..., K * (1 + 2d)) as [logits | means | log_scales] -> a mixture of batch shape (...)."""
        if raw.shape[-1] != cls.num_params(components, dim):
            raise ValueError(f"DiagonalMixture: last dim {raw.shape[-1]} != K*(1+2d) = "
                             f"{cls.num_params(components, dim)} for K={components}, d={dim}")
        logits, rest = raw.split([components, 2 * components * dim], dim=-1)
        means, log_scales = rearrange(rest, "... (two k d) -> two ... k d", two=2, k=components)
        return cls(logits, means, log_scales)

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def __getitem__(self, index) -> "DiagonalMixture":
        """Index the batch dims: mixture[:4] keeps the first 4 rows."""
        return DiagonalMixture(self.logits[index], self.means[index], self.log_scales[index])

    def expand(self, *batch_shape: int) -> "DiagonalMixture":
        """Broadcast the batch shape (no copy), e.g. one shared mixture per token: (B, 1) -> (B, N)."""
        k, d = self.means.shape[-2:]
        return DiagonalMixture(self.logits.expand(*batch_shape, k), self.means.expand(*batch_shape, k, d),
                               self.log_scales.expand(*batch_shape, k, d))

    def component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """x (S..., ..., d) -> log N(x; component k) (S..., ..., K), batch dims broadcast from the right."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"DiagonalMixture: x has {x.shape[-1]} channels, the mixture {self.dim}")
        standard = (rearrange(x, "... d -> ... 1 d") - self.means) * torch.exp(-self.log_scales)
        return (-0.5 * standard ** 2 - self.log_scales - HALF_LOG_TWO_PI).sum(dim=-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x (S..., ..., d) -> log p(x) (S..., ...) in nats."""
        log_weights = torch.log_softmax(self.logits, dim=-1)
        return torch.logsumexp(log_weights + self.component_log_probs(x), dim=-1)

    def sample(self, generator: Optional[torch.Generator] = None, temperature: float = 1.0,
               num_samples: Optional[int] = None) -> torch.Tensor:
        """A draw (..., d), or (num_samples, ..., d); temperature scales every component's std.

        temperature 1 samples p exactly, 0 returns the mean of the drawn component.
        """
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        lead = () if num_samples is None else (num_samples,)
        logits = self.logits.expand(*lead, *self.logits.shape)
        component = gumbel_argmax(logits, generator)  # (S..., ...)
        index = rearrange(component, "... -> ... 1 1").expand(*component.shape, 1, self.dim)
        means = torch.gather(self.means.expand(*lead, *self.means.shape), -2, index).squeeze(-2)
        log_scales = torch.gather(self.log_scales.expand(*lead, *self.log_scales.shape), -2, index).squeeze(-2)
        noise = normal(means.shape, generator, means)
        return means + temperature * torch.exp(log_scales) * noise


def guided_resample(cond: DiagonalMixture, uncond: DiagonalMixture, scale: float, candidates: int,
                    generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> torch.Tensor:
    """Sampling-importance-resampling toward p_cond^scale * p_uncond^(1 - scale): -> (..., d).

    Draw `candidates` proposals from cond (at `temperature`), weight each by
    (p_cond / p_uncond)^(scale - 1) (untempered densities), pick one by those weights.
    scale == 1 is exactly one draw from cond (no proposals, same random stream as cond.sample).
    """
    if candidates < 1:
        raise ValueError(f"candidates: must be >= 1, got {candidates}")
    if scale == 1.0:
        return cond.sample(generator, temperature)
    proposals = cond.sample(generator, temperature, num_samples=candidates)  # (M, ..., d)
    log_weights = (scale - 1.0) * (cond.log_prob(proposals) - uncond.log_prob(proposals))  # (M, ...)
    pick = gumbel_argmax(log_weights, generator, dim=0)  # (...)
    index = rearrange(pick, "... -> 1 ... 1").expand(1, *proposals.shape[1:])
    return torch.gather(proposals, 0, index).squeeze(0)
