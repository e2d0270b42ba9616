"""ARFlow as a model family: the transformer over K same-class images, the flow-matching loss over sorted
noise levels and the autoregressive samplers (docs/arflow.md)."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from arflow_scale.flow import flow_matching_loss, sample, sequence_losses
from arflow_scale.model import build_model, count_parameters, forward_flops, resolve

from .base import ModelTask, SampleSettings


class ARFlowTask(ModelTask):
    family = "arflow"

    def build_model(self) -> nn.Module:
        return build_model(self.model_cfg)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        return flow_matching_loss(model, images, labels, generator, self.model_cfg.class_dropout)

    def validation_losses(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          seeds: list[int]) -> torch.Tensor:
        return sequence_losses(model, images, labels, seeds)

    def sample(self, model: nn.Module, labels: torch.Tensor, settings: SampleSettings,
               generator: torch.Generator) -> torch.Tensor:
        return sample(model, labels, sampler=settings.sampler, steps=settings.steps, cfg_scale=settings.cfg_scale,
                      guided_channels=settings.guided_channels, generator=generator, compile=settings.compile)

    def forward_flops(self) -> int:
        return forward_flops(self.model_cfg)

    def sample_flops(self, settings: SampleSettings) -> int:
        """One image through the model at every sampler step (CFG doubles the batch)."""
        per_call = forward_flops(dataclasses.replace(self.model_cfg, k=1))
        return per_call * settings.steps * (2 if settings.cfg_scale != 1.0 else 1)

    def count_parameters(self) -> int:
        return count_parameters(self.model_cfg)

    @property
    def images_per_sample(self) -> int:
        return self.model_cfg.k

    @property
    def tokens_per_image(self) -> int:
        return resolve(self.model_cfg).tokens_per_image
