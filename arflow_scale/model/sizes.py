"""Resolved architecture numbers of a model section: the registry entry with its overrides applied."""
from __future__ import annotations

from dataclasses import dataclass

from arflow_scale.schema import check

from .config import SIZE_PATTERN, SIZE_TABLE, ModelConfig

SIZES = SIZE_TABLE  # name -> (depth, width, heads); head dim 64 for the paper sizes (docs/arflow.md §2.6)

FREQUENCY_DIM = 256  # sinusoidal timestep embedding size (DiT/SiT)


@dataclass(frozen=True)
class ModelDims:
    """Resolved architecture numbers of a ModelConfig."""

    depth: int
    width: int
    heads: int
    patch: int
    in_channels: int
    image_size: int
    k: int
    num_classes: int
    mlp_hidden: int
    attention: str

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def sequence_length(self) -> int:
        return self.k * self.tokens_per_image


def parse_size(size: str) -> tuple[str, int]:
    """`"XL/2"` -> ("XL", 2); a bad name raises ConfigError naming the key `size`."""
    ModelConfig(size=size).validate()
    match = SIZE_PATTERN.match(size)
    return match.group(1), int(match.group(2))


def resolve(cfg: ModelConfig) -> ModelDims:
    """Registry entry of cfg.size with cfg.depth/width/heads overrides applied (cfg is validated first)."""
    check(cfg.family == "arflow", "family", f"resolve() reads ARFlow sections, got {cfg.family!r} (see tasks)")
    cfg.validate()
    depth, width, heads = cfg.resolved_shape()
    return ModelDims(depth=depth, width=width, heads=heads, patch=cfg.patch_size, in_channels=cfg.in_channels,
                     image_size=cfg.image_size, k=cfg.k, num_classes=cfg.num_classes,
                     mlp_hidden=int(width * cfg.mlp_ratio), attention=cfg.attention)
