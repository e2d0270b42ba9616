"""The model-family interface: everything the training, checkpoint, sampling and FID infrastructure needs
from a model family, and nothing else. ARFlow is the first family; a second one adds a module here and
touches no infrastructure (docs/architecture.md).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from arflow_scale.model.config import ModelConfig

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SampleSettings:
    """How to draw samples (sample grids, `arflow sample`, FID tasks); families read what applies to them."""

    sampler: str  # ode | sde (ARFlow)
    steps: int  # integration steps (ARFlow)
    cfg_scale: float  # classifier-free guidance scale; 1.0 is unguided
    guided_channels: Optional[int] = None  # guide only the first channels (the reference's latent habit)
    temperature: float = 1.0  # scales the sampling noise (FARMER's mixture components); 1.0 is exact
    compile: Optional[bool] = None  # the sampling step compiled (CUDA graphs on GPU); None: on CUDA only


class ModelTask(ABC):
    """One model family bound to its config section: build, loss of a batch, sampling, FLOPs, weights."""

    family: ClassVar[str]
    loss_metric: ClassVar[str] = "loss"  # the name its training loss is logged under

    def __init__(self, model_cfg: ModelConfig):
        self.model_cfg = model_cfg

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (seed torch first for identical weights on every rank)."""

    @abstractmethod
    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """Scalar training loss of a batch: images (B, S, C, H, W) with S = images_per_sample, labels (B,);
        every random draw from the CPU `generator` (a resumed run draws the same)."""

    @abstractmethod
    def validation_losses(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          seeds: list[int]) -> torch.Tensor:
        """Per-sample held-out loss (B,) in the unit of `loss_metric`; sample b's random draws come from seeds[b]
        alone (no dropout), so a sample scores the same in every batch of the same shape."""

    @abstractmethod
    def sample(self, model: nn.Module, labels: torch.Tensor, settings: SampleSettings,
               generator: torch.Generator) -> torch.Tensor:
        """Images (B, C, H, W) in the data space of the shards (pixels in [-1, 1], or latents) for labels (B,)."""

    @abstractmethod
    def forward_flops(self) -> int:
        """Matmul FLOPs (2 per MAC) of one forward pass over one training sample (a sequence for ARFlow)."""

    @abstractmethod
    def count_parameters(self) -> int:
        """Trainable parameters of `build_model()`, computed analytically."""

    @abstractmethod
    def sample_flops(self, settings: SampleSettings) -> int:
        """Matmul FLOPs of drawing one image with `settings` (sweep cost estimates)."""

    def student_task(self, teacher: "ModelTask", weights: StateDict) -> "ModelTask":
        """The task of a distillation stage (`distill.teacher`): this section's student, trained against the
        frozen model of `teacher` (the teacher run's task) carrying `weights` (its EMA). A ValueError names
        what does not fit; families without such a stage refuse it."""
        raise ValueError(f"distill.teacher: model.family {self.family} has no distillation stage")

    @property
    def images_per_sample(self) -> int:
        """Images of one class drawn together as one training sample (ARFlow: K)."""
        return 1

    @property
    def tokens_per_image(self) -> int:
        return 1

    @property
    def num_classes(self) -> int:
        return self.model_cfg.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the shards store it."""
        cfg = self.model_cfg
        return (cfg.in_channels, cfg.image_size, cfg.image_size)

    def compile_units(self, model: nn.Module) -> list[nn.Module]:
        """The modules `train.compile` compiles one by one, in place (torchtitan's per-block compile): the
        repeated transformer blocks. Default: the model's `blocks` ModuleList, else the whole model."""
        blocks = getattr(model, "blocks", None)
        return list(blocks) if isinstance(blocks, nn.ModuleList) else [model]

    def model_from_weights(self, state_dict: StateDict, device: str | torch.device = "cpu") -> nn.Module:
        """A plain (non-distributed) model carrying `state_dict`, in eval mode; a foreign state dict is a
        ValueError naming the mismatched keys."""
        model = self.build_model()
        result = model.load_state_dict(state_dict, strict=False)
        buffers = {name for name, _ in model.named_buffers()}
        missing = [k for k in result.missing_keys if k not in buffers]
        if missing or result.unexpected_keys:
            raise ValueError(f"weights do not fit the {self.family} model {self.model_cfg.size}: missing "
                             f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        return model.to(device).eval()
