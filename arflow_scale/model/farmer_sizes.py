"""FARMER arguments and size registry (docs/farmer.md §9): `farmer_args("XL/16", image_size=256)`.

The model package is built from this frozen dataclass only (no `arflow_scale.config` import).
Geometry is checked when the dataclass is made; a bad value raises ValueError naming its field.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

SIZE_PATTERN = re.compile(r"^(tiny|S|B|L|XL)/(\d+)$")

# name -> architecture fields; the patch comes from the name (NAME/PATCH, as the ARFlow registry).
FARMER_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(flow_blocks=2, flow_depth=1, flow_width=32, flow_heads=2,
                 prior_depth=2, prior_width=32, prior_heads=2, mixture_components=4),
    "S": dict(flow_blocks=4, flow_depth=2, flow_width=384, flow_heads=6,
              prior_depth=12, prior_width=384, prior_heads=6, mixture_components=8),
    "B": dict(flow_blocks=4, flow_depth=4, flow_width=768, flow_heads=12,
              prior_depth=12, prior_width=768, prior_heads=12, mixture_components=8),
    "L": dict(flow_blocks=8, flow_depth=4, flow_width=1024, flow_heads=16,
              prior_depth=24, prior_width=1024, prior_heads=16, mixture_components=16),
    "XL": dict(flow_blocks=8, flow_depth=6, flow_width=1152, flow_heads=18,
               prior_depth=28, prior_width=1152, prior_heads=18, mixture_components=16),
}

INFORMATIVE_DIVISOR = 6  # default informative channels = token_dim // 6 (JetFormer keeps 128 of 768)


def _fail(field: str, message: str) -> None:
    raise ValueError(f"{field}: {message}")


@dataclass(frozen=True)
class FarmerArgs:
    """Everything that fixes a FARMER model's shape and its training-time randomness."""

    patch: int
    flow_blocks: int  # number of autoregressive flow blocks (token order alternates)
    flow_depth: int  # transformer layers per flow block
    flow_width: int
    flow_heads: int
    prior_depth: int  # layers of the autoregressive prior
    prior_width: int
    prior_heads: int
    mixture_components: int = 8  # Gaussian components per mixture
    image_size: int = 256
    in_channels: int = 3
    num_classes: int = 1000  # label table has one more row: the null class for CFG
    informative_channels: Optional[int] = None  # per token; None -> max(1, token_dim // 6)
    mlp_ratio: float = 4.0
    noise_std: float = 0.0  # training Gaussian noise on top of uniform dequantization ([-1, 1] units)
    class_dropout: float = 0.1  # probability of the null class per image in `loss`
    flow_conditioning: bool = False  # False: unconditional flow (JetFormer); True: class-conditioned (TarFlow)
    cfg_candidates: int = 16  # M of the resampling guidance
    student_depth: Optional[int] = None  # one-step inverse student; None -> flow_blocks * flow_depth
    distill_prior_fraction: float = 0.0  # share of a distillation batch drawn from the prior (§8)

    def __post_init__(self) -> None:
        for name in ("patch", "flow_blocks", "flow_depth", "flow_width", "flow_heads", "prior_depth",
                     "prior_width", "prior_heads", "mixture_components", "image_size", "in_channels",
                     "num_classes", "cfg_candidates"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, f"must be a positive integer, got {value!r}")
        if self.image_size % self.patch != 0:
            _fail("image_size", f"{self.image_size} not a multiple of patch={self.patch}")
        for prefix in ("flow", "prior"):
            width, heads = getattr(self, f"{prefix}_width"), getattr(self, f"{prefix}_heads")
            if width % heads != 0:
                _fail(f"{prefix}_width", f"{width} not divisible by {prefix}_heads={heads}")
            if width % 4 != 0:
                _fail(f"{prefix}_width", f"{width} not a multiple of 4 (2-D sin-cos positions)")
        if self.informative_channels is None:
            object.__setattr__(self, "informative_channels", max(1, self.token_dim // INFORMATIVE_DIVISOR))
        if not 1 <= self.informative_channels <= self.token_dim:
            _fail("informative_channels", f"{self.informative_channels} not in [1, token_dim={self.token_dim}]")
        if self.student_depth is None:
            object.__setattr__(self, "student_depth", self.flow_blocks * self.flow_depth)
        if self.student_depth < 1:
            _fail("student_depth", f"must be a positive integer, got {self.student_depth!r}")
        if not self.mlp_ratio > 0:
            _fail("mlp_ratio", f"must be positive, got {self.mlp_ratio}")
        if not self.noise_std >= 0:
            _fail("noise_std", f"must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.distill_prior_fraction <= 1.0:
            _fail("distill_prior_fraction", f"must be in [0, 1], got {self.distill_prior_fraction}")
        if not 0.0 <= self.class_dropout < 1.0:
            _fail("class_dropout", f"must be in [0, 1), got {self.class_dropout}")

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch

    @property
    def num_tokens(self) -> int:
        """N = (image_size / patch)^2."""
        return self.grid ** 2

    @property
    def token_dim(self) -> int:
        """D = patch * patch * in_channels: channels of a pixel token and of its latent."""
        return self.patch * self.patch * self.in_channels

    @property
    def redundant_channels(self) -> int:
        """Latent channels per token modelled by the shared mixture (may be 0)."""
        return self.token_dim - self.informative_channels

    @property
    def num_dims(self) -> int:
        """Dimensions of one image, C * H * W (the bits/dim denominator)."""
        return self.in_channels * self.image_size ** 2

    @property
    def flow_mlp_hidden(self) -> int:
        return int(self.flow_width * self.mlp_ratio)

    @property
    def prior_mlp_hidden(self) -> int:
        return int(self.prior_width * self.mlp_ratio)


def parse_farmer_size(size: str) -> tuple[str, int]:
    """`"XL/16"` -> ("XL", 16); a bad name raises ValueError naming `size`."""
    match = SIZE_PATTERN.match(size)
    if match is None:
        _fail("size", f"{size!r} is not NAME/PATCH with NAME in {', '.join(FARMER_SIZES)} (e.g. 'XL/16')")
    return match.group(1), int(match.group(2))


def farmer_args(size: str, **overrides) -> FarmerArgs:
    """Registry entry of `size` (NAME/PATCH) with field overrides -> validated FarmerArgs."""
    name, patch = parse_farmer_size(size)
    fields = {f.name for f in dataclasses.fields(FarmerArgs)}
    for key in overrides:
        if key not in fields:
            _fail(key, f"not a FarmerArgs field (fields: {', '.join(sorted(fields))})")
    if "patch" in overrides:
        _fail("patch", f"comes from the size name {size!r}; do not override it")
    return FarmerArgs(patch=patch, **{**FARMER_SIZES[name], **overrides})
