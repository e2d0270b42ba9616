"""The model section of a run config: family, size (registry name like `XL/2`), overrides, input geometry,
K, attention. The size registry and every geometry check live here, beside the model that needs them.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal, Optional

from arflow_scale.schema import build, check

# name -> (depth, width, heads); head dim 64 for the paper sizes (docs/arflow.md §2.6).
SIZE_TABLE: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 18),
}
SIZE_PATTERN = re.compile(rf"^({'|'.join(SIZE_TABLE)}|custom)/(\d+)$")
PATCH_SIZES = (1, 2, 4, 8)


@dataclass
class ModelConfig:
    family: Literal["arflow"] = "arflow"  # the model family (arflow_scale.tasks) that trains on this section
    size: str = "tiny/2"  # registry name and patch size, like DiT: S/2, B/4, XL/2, tiny/2, custom/2
    depth: Optional[int] = None  # overrides of the registry entry (scaled variants)
    width: Optional[int] = None
    heads: Optional[int] = None
    in_channels: int = 3  # 3 for pixels, 4 for SD-VAE latents
    image_size: int = 8  # pixels (or latent side)
    k: int = 5  # images per sequence
    num_classes: int = 10
    attention: Literal["hybrid", "full", "intra"] = "hybrid"
    # kernels of the attention: torch (the plain-PyTorch reference), triton (fused hybrid kernels, flex_attention
    # for full; CUDA), auto: triton on CUDA where the kernels support the shapes, torch elsewhere
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    activation_checkpointing: str = "none"  # "none", "all", or "every:N" (every N-th block)
    class_dropout: float = 0.1  # label dropout per sequence, for CFG
    mlp_ratio: float = 4.0

    @property
    def patch_size(self) -> int:
        return int(SIZE_PATTERN.match(self.size).group(2))

    @property
    def size_name(self) -> str:
        return SIZE_PATTERN.match(self.size).group(1)

    def validate(self) -> None:
        check(bool(SIZE_PATTERN.match(self.size)), "size",
              f"{self.size!r} is not NAME/PATCH with NAME in {', '.join(SIZE_TABLE)}, custom (e.g. 'XL/2')")
        check(self.patch_size in PATCH_SIZES, "size",
              f"patch size {self.patch_size} not in {', '.join(map(str, PATCH_SIZES))}")
        if self.size_name == "custom":
            for key in ("depth", "width", "heads"):
                check(getattr(self, key) is not None, key, "required when size is custom/P")
        for key in ("depth", "width", "heads"):
            value = getattr(self, key)
            check(value is None or value > 0, key, f"must be positive, got {value}")
        _, width, heads = self.resolved_shape()
        check(width % heads == 0, "width" if self.width is not None else "heads",
              f"width {width} not divisible by heads={heads}")
        check(width % 4 == 0, "width", f"{width} must be a multiple of 4 (2-D sin-cos position embedding)")
        check(self.in_channels > 0, "in_channels", f"must be positive, got {self.in_channels}")
        check(self.image_size > 0 and self.image_size % self.patch_size == 0, "image_size",
              f"{self.image_size} must be a positive multiple of the patch size {self.patch_size}")
        check(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        check(self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        check(0.0 <= self.class_dropout < 1.0, "class_dropout", f"must be in [0, 1), got {self.class_dropout}")
        check(self.mlp_ratio > 0, "mlp_ratio", f"must be positive, got {self.mlp_ratio}")
        ac = self.activation_checkpointing
        ok = ac in ("none", "all") or (re.fullmatch(r"every:[1-9]\d*", ac) is not None)
        check(ok, "activation_checkpointing", f"{ac!r} is not 'none', 'all' or 'every:N'")

    def resolved_shape(self) -> tuple[int, int, int]:
        """(depth, width, heads): the registry entry of `size` with the overrides applied."""
        base = SIZE_TABLE.get(self.size_name, (None, None, None))
        return tuple(getattr(self, key) if getattr(self, key) is not None else default
                     for key, default in zip(("depth", "width", "heads"), base))

    @property
    def checkpoint_every_n(self) -> int:
        """0 = no activation checkpointing, 1 = every block, n = every n-th block."""
        ac = self.activation_checkpointing
        return 0 if ac == "none" else 1 if ac == "all" else int(ac.split(":")[1])


def model_config(size: str | ModelConfig, **overrides) -> ModelConfig:
    """A validated ModelConfig from a size name like `XL/2` or a config, plus field overrides."""
    data = {**dataclasses.asdict(size), **overrides} if isinstance(size, ModelConfig) else {"size": size, **overrides}
    return build(ModelConfig, data)
