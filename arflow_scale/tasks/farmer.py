"""FARMER as a model family: an autoregressive flow over pixels with a mixture prior, trained on the exact
likelihood (bits/dim), sampled with temperature and resampling guidance; its second stage distils the flow's
sequential inverse into a one-pass student (docs/farmer.md)."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from arflow_scale.model.config import ModelConfig, farmer_args_of
from arflow_scale.model.farmer import FARMER, bits_per_dim_from_log_density, dequantize
from arflow_scale.model.farmer_distill import FarmerOneStep
from arflow_scale.model.farmer_flops import (count_parameters, count_student_parameters, flow_forward_flops,
                                             forward_flops, prior_forward_flops, student_forward_flops)

from .base import ModelTask, SampleSettings, StateDict

STUDENT_ONLY = ("student_depth", "distill_prior_fraction")  # FarmerArgs a distillation stage sets apart


def one_image(images: torch.Tensor) -> torch.Tensor:
    """A training batch (B, 1, C, H, W) -> (B, C, H, W); FARMER models one image per sample."""
    if images.dim() != 5 or images.shape[1] != 1:
        raise ValueError(f"FARMER trains on one image per sample: images must be (B, 1, C, H, W), "
                         f"got {tuple(images.shape)} (model.k must be 1)")
    return images[:, 0]


def dequantize_each(x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Images (B, C, H, W) uniformly dequantized sample by sample, sample b's noise from seeds[b] alone."""
    if len(seeds) != x.shape[0]:
        raise ValueError(f"dequantize_each: {len(seeds)} seeds for {x.shape[0]} images")
    return torch.cat([dequantize(x[b:b + 1], torch.Generator().manual_seed(seed)) for b, seed in enumerate(seeds)])


class FarmerTask(ModelTask):
    """The joint stage: flow and prior trained together on bits/dim of uniformly dequantized pixels."""

    family = "farmer"
    loss_metric = "bits_per_dim"

    def __init__(self, model_cfg: ModelConfig):
        super().__init__(model_cfg)
        if model_cfg.vae is not None:  # `arflow train` takes a VAE from latent shards' manifest
            raise ValueError(f"model.vae: {model_cfg.vae!r}: FARMER models pixels (its bits/dim count the 256 "
                             f"levels of uint8 shards); train it on image shards")
        self.args = farmer_args_of(model_cfg)

    def build_model(self) -> nn.Module:
        return FARMER(self.args)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """The model's forward (it computes its own objective, so DeepSpeed's hooks see the whole pass)."""
        return model(one_image(images), labels, generator)

    def validation_losses(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          seeds: list[int]) -> torch.Tensor:
        """Held-out bits/dim per image (B,): one uniform dequantization from seeds[b], no noise, no label
        dropped (the discrete bound of §5)."""
        x_tilde = dequantize_each(one_image(images), seeds)
        return bits_per_dim_from_log_density(model.log_density(x_tilde, labels), self.args.num_dims)

    def sample(self, model: nn.Module, labels: torch.Tensor, settings: SampleSettings,
               generator: torch.Generator) -> torch.Tensor:
        """FARMER.sample, or FarmerOneStep.sample for a distilled run's model (the same arguments)."""
        return model.sample(labels, cfg_scale=settings.cfg_scale, temperature=settings.temperature,
                            generator=generator)

    def forward_flops(self) -> int:
        return forward_flops(self.args)

    def count_parameters(self) -> int:
        return count_parameters(self.args)

    def sample_flops(self, settings: SampleSettings) -> int:
        """The prior token by token (guidance runs the null class beside) and the flow's inverse; each about
        one forward pass of matmuls (docs/farmer.md §7)."""
        guided = settings.cfg_scale != 1.0
        return prior_forward_flops(self.args) * (2 if guided else 1) + flow_forward_flops(self.args)

    @property
    def tokens_per_image(self) -> int:
        return self.args.num_tokens

    def student_task(self, teacher: ModelTask, weights: StateDict) -> "FarmerDistillTask":
        """The one-step inverse stage over a FARMER teacher whose model section matches this one (all but
        the student's own keys)."""
        if not isinstance(teacher, FarmerTask) or isinstance(teacher, FarmerDistillTask):
            raise ValueError(f"distill.teacher: a model.family {teacher.family} checkpoint; the student of "
                             f"FARMER's inverse needs a FARMER teacher")
        differ = [f"{f.name} {getattr(teacher.args, f.name)!r} (this run: {getattr(self.args, f.name)!r})"
                  for f in dataclasses.fields(self.args)
                  if f.name not in STUDENT_ONLY and getattr(teacher.args, f.name) != getattr(self.args, f.name)]
        if differ:
            raise ValueError("distill.teacher: the teacher's model differs from this run's model section: "
                             + ", ".join(differ) + "; use the teacher's model section")
        return FarmerDistillTask(self.model_cfg, teacher.model_from_weights(weights))


class FarmerDistillTask(FarmerTask):
    """The distillation stage: only the one-step inverse student trains (mean squared pixel error against the
    frozen teacher flow's exact pairs); samples take the teacher's prior and one student pass."""

    loss_metric = "distill_mse"

    def __init__(self, model_cfg: ModelConfig, teacher: FARMER):
        super().__init__(model_cfg)
        self.teacher = teacher

    def build_model(self) -> nn.Module:
        return FarmerOneStep(self.teacher, self.args)

    def validation_losses(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          seeds: list[int]) -> torch.Tensor:
        """Held-out mean squared pixel error per image (B,) on exact data pairs (F(x~), x~), x~ from seeds[b]."""
        x_tilde = dequantize_each(one_image(images), seeds)
        flow_labels = labels if self.args.flow_conditioning else None
        z, _ = model.teacher_on(x_tilde.device).flow(x_tilde, flow_labels)
        return (model.student(z, flow_labels).float() - x_tilde.float()).pow(2).flatten(1).mean(dim=1)

    def forward_flops(self) -> int:
        """One image's pair (the flow forward, or for prior pairs a prior sample and the inverse: about one
        forward pass of each, §7) and the student."""
        prior_share = self.args.distill_prior_fraction * prior_forward_flops(self.args)
        return int(flow_forward_flops(self.args) + prior_share + student_forward_flops(self.args))

    def count_parameters(self) -> int:
        return count_student_parameters(self.args)

    def sample_flops(self, settings: SampleSettings) -> int:
        guided = settings.cfg_scale != 1.0
        return prior_forward_flops(self.args) * (2 if guided else 1) + student_forward_flops(self.args)
