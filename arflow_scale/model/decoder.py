"""Decoder: the one step from a model's sample space to pixels, built from the run's model section.

Pixel models: the identity. Latent models (`model.vae` set): `LatentVAE.decode`, which undoes the scale
(and shift) once. Sample grids, `arflow sample`, `arflow demo` and the FID sampling tasks all decode through
it; each builds one per call or task, so the VAE loads once there, not per batch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import ModelConfig
from .vae import DEFAULT_BATCH_SIZE, NOT_FOR_DECODING, LatentVAE


class Decoder:
    """Callable samples (B, C, h, w) in model space -> float images (B, C', H, W) in [-1, 1] (latents decoded,
    clamped; pixel samples returned as they are)."""

    def __init__(self, vae: Optional[LatentVAE] = None, batch_size: int = DEFAULT_BATCH_SIZE):
        self.vae, self.batch_size = vae, batch_size

    @classmethod
    def for_model(cls, model_cfg: ModelConfig, device: str | torch.device | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> "Decoder":
        """The identity without `model.vae`; else that VAE on `device` (None: CUDA if present), loaded once
        and checked against `model.vae_identity` when the run recorded one (a mismatch names both)."""
        if model_cfg.vae is None:
            return cls(None, batch_size)
        identity = model_cfg.vae_identity
        scale = identity.scale_factor if identity is not None else model_cfg.vae_scale_factor
        vae = LatentVAE.load(model_cfg.vae, scale_factor=scale, device=device)
        if identity is not None:
            vae.identity().require_same(identity, mine="the VAE loaded from model.vae", theirs="the run's VAE "
                                        "(model.vae_identity)", ignore=NOT_FOR_DECODING)
        channels = vae.identity().latent_channels
        if channels != model_cfg.in_channels:
            raise ValueError(f"model.vae {model_cfg.vae}: makes {channels}-channel latents, the model "
                             f"(model.in_channels) {model_cfg.in_channels}")
        return cls(vae, batch_size)

    @property
    def is_identity(self) -> bool:
        return self.vae is None

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return samples
        return self.vae.decode(samples, batch_size=self.batch_size)
