"""The model section of a run config: family, size (registry name like `XL/2`), overrides, input geometry,
K, attention, the VAE whose latents it models, and FARMER's knobs (`model.farmer`). The size registries and
every geometry check live in the model package, beside the model that needs them; `validate` dispatches on
the family.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal, Optional

from arflow_scale.schema import build, check, fail

from .farmer_sizes import FarmerArgs, farmer_args
from .vae_identity import VaeIdentity

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
class FarmerConfig:
    """FARMER's own keys (`model.farmer`, family farmer only): overrides of its size registry entry and of
    `FarmerArgs`; None keeps the registry's or FarmerArgs' value (docs/farmer.md §9), the one source of those
    defaults. Size, geometry, classes, class_dropout and mlp_ratio come from the model section itself."""

    flow_blocks: Optional[int] = None
    flow_depth: Optional[int] = None
    flow_width: Optional[int] = None
    flow_heads: Optional[int] = None
    prior_depth: Optional[int] = None
    prior_width: Optional[int] = None
    prior_heads: Optional[int] = None
    mixture_components: Optional[int] = None
    informative_channels: Optional[int] = None  # None: max(1, token_dim // 6)
    noise_std: Optional[float] = None  # training Gaussian noise on top of dequantization (None: 0)
    flow_conditioning: Optional[bool] = None  # None: an unconditional flow
    cfg_candidates: Optional[int] = None  # proposals per token of the resampling guidance (None: 16)
    student_depth: Optional[int] = None  # the one-step inverse student (None: flow_blocks * flow_depth)
    distill_prior_fraction: Optional[float] = None  # distillation pairs from prior samples, not data (None: 0)

    def overrides(self) -> dict:
        """The keys that are set, as FarmerArgs fields."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class ModelConfig:
    family: Literal["arflow", "farmer"] = "arflow"  # the model family (arflow_scale.tasks) that trains on this section
    size: str = "tiny/2"  # registry name and patch size, like DiT: S/2, B/4, XL/2, tiny/2, custom/2
    depth: Optional[int] = None  # overrides of the registry entry (scaled variants)
    width: Optional[int] = None
    heads: Optional[int] = None
    in_channels: int = 3  # 3 for pixels, 4 for SD-VAE latents
    image_size: int = 8  # pixels (or latent side)
    k: int = 5  # images per sequence (ARFlow); FARMER models one image per sample and requires 1
    num_classes: int = 10
    attention: Literal["hybrid", "full", "intra"] = "hybrid"  # ARFlow's; FARMER's attention is causal softmax
    # kernels of the attention: torch (the plain-PyTorch reference), triton (fused hybrid kernels, flex_attention
    # for full; CUDA), triton_sdpa (as triton, the hybrid's softmax inside each image by SDPA's cuDNN/flash
    # kernels), auto: triton on CUDA where the kernels support the shapes, torch elsewhere
    attention_backend: Literal["auto", "torch", "triton", "triton_sdpa"] = "auto"
    activation_checkpointing: str = "none"  # "none", "all", or "every:N" (every N-th block)
    class_dropout: float = 0.1  # label dropout per sequence, for CFG
    mlp_ratio: float = 4.0
    # Latent models: the diffusers AutoencoderKL folder or hub id that decodes samples to pixels; null for
    # pixel models, or to take the VAE the shards' manifest records (`arflow train` fills it in).
    vae: Optional[str] = None
    vae_scale_factor: Optional[float] = None  # latents = z * this; null: the VAE config's (0.18215 for SD)
    # The VAE's identity (hashes, scale, shapes), filled in by `arflow train` from the VAE or the manifest and
    # checked wherever the VAE is loaded again (sample grids, FID, a resumed run); not meant to be written.
    vae_identity: Optional[VaeIdentity] = None
    farmer: FarmerConfig = dataclasses.field(default_factory=FarmerConfig)  # family farmer only

    @property
    def patch_size(self) -> int:
        return int(SIZE_PATTERN.match(self.size).group(2))

    @property
    def size_name(self) -> str:
        return SIZE_PATTERN.match(self.size).group(1)

    def validate(self) -> None:
        if self.family == "farmer":
            validate_farmer(self)
            return
        check(self.farmer == FarmerConfig(), "farmer", "FARMER's keys apply to model.family: farmer only")
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
        self._validate_vae()

    def _validate_vae(self) -> None:
        scale, identity = self.vae_scale_factor, self.vae_identity
        check(scale is None or (math.isfinite(scale) and scale > 0), "vae_scale_factor",
              f"must be a positive number (or null for the VAE's own), got {scale}")
        check(self.vae is None or bool(self.vae.strip()), "vae", "must name a folder or hub id, or be null")
        if identity is None:
            return
        check(self.vae is not None, "vae_identity", "is set but model.vae names no VAE")
        check(scale is None or scale == identity.scale_factor, "vae_scale_factor",
              f"{scale} differs from the scale factor {identity.scale_factor} of the run's VAE "
              f"(model.vae_identity, {identity.source})")
        check(self.in_channels == identity.latent_channels, "in_channels",
              f"{self.in_channels}, but the VAE {identity.source} makes {identity.latent_channels}-channel latents")

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


def farmer_args_of(cfg: ModelConfig) -> FarmerArgs:
    """The FarmerArgs of a FARMER model section (ValueError naming the FarmerArgs field on a bad value)."""
    return farmer_args(cfg.size, image_size=cfg.image_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
                       class_dropout=cfg.class_dropout, mlp_ratio=cfg.mlp_ratio, **cfg.farmer.overrides())


def _farmer_key(field: str) -> str:
    """The model-section key of a FarmerArgs field named in an error."""
    if field in ("size", "patch"):
        return "size"
    return f"farmer.{field}" if field in {f.name for f in dataclasses.fields(FarmerConfig)} else field


def validate_farmer(cfg: ModelConfig) -> None:
    """A FARMER section: one image per sample, no ARFlow-only keys, and its registry's geometry checks."""
    check(cfg.k == 1, "k", f"{cfg.k}, but FARMER models one image per sample: set model.k: 1")
    for key in ("depth", "width", "heads"):
        check(getattr(cfg, key) is None, key,
              "an ARFlow registry override; FARMER's shapes are model.farmer keys (e.g. farmer.flow_width)")
    check(cfg.activation_checkpointing == "none", "activation_checkpointing",
          f"{cfg.activation_checkpointing!r}: FARMER has no activation checkpointing; use none")
    check(cfg.vae is None and cfg.vae_identity is None, "vae",
          f"{cfg.vae!r}: FARMER models pixels (its bits/dim count the 256 levels of uint8 shards); use image shards")
    try:
        farmer_args_of(cfg)
    except ValueError as err:
        field, _, message = str(err).partition(": ")
        fail(_farmer_key(field), message)


def model_config(size: str | ModelConfig, **overrides) -> ModelConfig:
    """A validated ModelConfig from a size name like `XL/2` or a config, plus field overrides."""
    data = {**dataclasses.asdict(size), **overrides} if isinstance(size, ModelConfig) else {"size": size, **overrides}
    return build(ModelConfig, data)
