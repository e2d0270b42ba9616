"""FARMER: an autoregressive flow over pixels with an autoregressive mixture prior (docs/farmer.md).

log p(x~ | y) = log p_prior(F(x~) | y) + log|det dF/dx~|, exact, for the dequantized image x~.
Images are float in [-1, 1] from uint8 as v / 127.5 - 1, so one pixel level is BIN_WIDTH = 2/255
wide; bits/dim = -(log p(x~ | y) + D log BIN_WIDTH) / (D ln 2), D = C*H*W, and a density uniform
over the 256 levels scores exactly 8 (docs/farmer.md §5).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from .farmer_flow import FarmerFlow, check_labels
from .farmer_prior import FarmerPrior
from .farmer_sizes import FarmerArgs
from .rng import normal, uniform

if TYPE_CHECKING:
    from .farmer_distill import FarmerInverseStudent

BIN_WIDTH = 2.0 / 255.0  # one uint8 level in [-1, 1] units
LOG_BIN_WIDTH = math.log(BIN_WIDTH)


def dequantize(x: torch.Tensor, generator: Optional[torch.Generator], noise_std: float = 0.0) -> torch.Tensor:
    """x + BIN_WIDTH * (u - 1/2), u ~ U[0, 1)^D, plus noise_std * N(0, 1) when noise_std > 0."""
    x_tilde = x + BIN_WIDTH * (uniform(x.shape, generator, x) - 0.5)
    if noise_std > 0:
        x_tilde = x_tilde + noise_std * normal(x.shape, generator, x)
    return x_tilde


def bits_per_dim_from_log_density(log_density: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Continuous log-density of x~ (nats, any shape) -> discrete bits per dimension (same shape)."""
    return -(log_density + num_dims * LOG_BIN_WIDTH) / (num_dims * math.log(2.0))


def drop_labels(y: torch.Tensor, probability: float, null_class: int,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Each label becomes `null_class` with `probability` (classifier-free guidance training)."""
    if probability <= 0:
        return y
    drop = uniform(y.shape, generator, torch.empty(0, dtype=torch.float32, device=y.device)) < probability
    return torch.where(drop, torch.full_like(y, null_class), y)


class FARMER(nn.Module):
    """Flow + prior, trained jointly on the exact NLL; `sample` inverts the flow (or a student)."""

    def __init__(self, args: FarmerArgs):
        super().__init__()
        self.args = args
        self.null_class = args.num_classes
        self.flow = FarmerFlow(args)
        self.prior = FarmerPrior(args)

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        a = self.args
        want = (a.in_channels, a.image_size, a.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"FARMER: x must be (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        check_labels(y, x.shape[0], "FARMER")

    def log_density(self, x_tilde: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Continuous log p(x~ | y) (B,) in nats: prior log-density of F(x~) + flow log-determinant."""
        self._check(x_tilde, y)
        z, logdet = self.flow(x_tilde, y if self.args.flow_conditioning else None)
        return self.prior.log_prob(z, y) + logdet

    def log_prob(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None
                 ) -> torch.Tensor:
        """log P(x | y) estimate (B,) in nats for images on the 256-level grid: one uniform dequantization.

        = log p(x~ | y) + D log BIN_WIDTH; its expectation over the noise lower-bounds the discrete
        log-likelihood (Jensen), with equality for a density constant within each pixel bin.
        """
        return self.log_density(dequantize(x, generator), y) + self.args.num_dims * LOG_BIN_WIDTH

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None
                     ) -> torch.Tensor:
        """Mean over the batch of -log_prob / (D ln 2): the number the trainer logs (uniform model: 8)."""
        return -self.log_prob(x, y, generator).mean() / (self.args.num_dims * math.log(2.0))

    def loss(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator],
             noise_std: Optional[float] = None) -> torch.Tensor:
        """Training objective: bits/dim of x dequantized with uniform + Gaussian noise, labels dropped.

        Draw order from `generator`: uniform noise, Gaussian noise (if noise_std > 0), label drops
        (if class_dropout > 0). noise_std defaults to args.noise_std (pass a schedule's value to anneal).
        """
        self._check(x, y)
        noise_std = self.args.noise_std if noise_std is None else noise_std
        x_tilde = dequantize(x, generator, noise_std)
        y = drop_labels(y, self.args.class_dropout, self.null_class, generator)
        return bits_per_dim_from_log_density(self.log_density(x_tilde, y), self.args.num_dims).mean()

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator],
                noise_std: Optional[float] = None) -> torch.Tensor:
        """The training objective `loss` (scalar bits/dim): a wrapping engine that hooks forward (DeepSpeed,
        ZeRO-3's parameter gathering) computes it."""
        return self.loss(x, y, generator, noise_std)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, candidates: Optional[int] = None,
               student: Optional["FarmerInverseStudent"] = None, denoise: bool = True) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] for `labels` (B,): prior sample, then the flow's inverse.

        cfg_scale 1 is plain conditional sampling; otherwise resampling guidance with `candidates`
        proposals per token (default args.cfg_candidates). `student` replaces the sequential inverse
        by one pass. With args.noise_std > 0 and `denoise`, one score step x + sigma^2 grad log p.
        """
        labels = labels.to(self.prior.pos.device)
        check_labels(labels, labels.shape[0], "FARMER.sample")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class):
            raise ValueError(f"FARMER.sample: labels must be in [0, {self.null_class}], got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        z = self.prior.sample(labels, cfg_scale, temperature, generator, candidates)
        flow_labels = labels if self.args.flow_conditioning else None
        x = student(z, flow_labels) if student is not None else self.flow.inverse(z, flow_labels)
        if denoise and self.args.noise_std > 0:
            x = self.denoise(x, labels, self.args.noise_std)
        return x.clamp(-1.0, 1.0)

    def denoise(self, x: torch.Tensor, y: torch.Tensor, noise_std: float) -> torch.Tensor:
        """Tweedie step x + sigma^2 * grad_x log p(x | y) for a model trained on sigma-noised data (TarFlow)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (score,) = torch.autograd.grad(self.log_density(x, y).sum(), x)
        return (x + noise_std ** 2 * score).detach()
