"""VaeIdentity: which VAE made (or must decode) a set of latents, as a small record to store and compare.

No torch or diffusers here, so a shard manifest, a run config (`model.vae_identity`), a checkpoint or an
export can carry it cheaply; `arflow_scale.model.vae.LatentVAE.identity()` builds it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from arflow_scale.schema import check

ENCODE_MODES = ("mean", "sample")
# Fields that name where the weights came from or how images were encoded, not what decodes latents.
NOT_FOR_DECODING = ("source", "encode_mode")


@dataclass(frozen=True)
class VaeIdentity:
    """A VAE and the latent convention around it: latents = (posterior z - shift_factor) * scale_factor."""
    source: str  # hub id or local folder it was loaded from (informational: copies of it compare equal)
    config_sha256: str  # sha256 of the config keys the VAE's config.json sets (not diffusers' defaults)
    weights_sha256: str  # sha256 of its state dict as loaded (names, dtypes, shapes, bytes)
    scale_factor: float  # latents are multiplied by this once on the way in, divided once on the way out
    shift_factor: float  # subtracted before scaling, added back after unscaling (0.0 for SD's VAEs)
    latent_channels: int
    downsample: int  # pixels per latent along each side (8 for SD's VAEs)
    image_channels: int  # channels of the images it encodes and decodes (3 = RGB)
    encode_mode: str  # "mean": posterior mean; "sample": one posterior draw per image

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "VAE identity") -> "VaeIdentity":
        """Validate and build; an error names `where` and the bad key or value."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object with keys {[f.name for f in fields(cls)]}, got {data!r}")
        kinds = {"source": str, "config_sha256": str, "weights_sha256": str, "scale_factor": (int, float),
                 "shift_factor": (int, float), "latent_channels": int, "downsample": int, "image_channels": int,
                 "encode_mode": str}
        values = {}
        for name, kind in kinds.items():
            if name not in data:
                raise ValueError(f"{where}: missing key {name!r}")
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{where}: key {name!r} has bad value {value!r}")
            values[name] = float(value) if kind == (int, float) else value
        identity = cls(**values)
        for key, why in identity.problems():
            raise ValueError(f"{where}: key {key!r} has bad value {values[key]!r} ({why})")
        return identity

    def problems(self) -> list[tuple[str, str]]:
        """(key, what a good value is) for every value out of range ([] = a usable identity)."""
        found = []
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
            found.append(("scale_factor", "must be > 0"))
        if not math.isfinite(self.shift_factor):
            found.append(("shift_factor", "must be finite"))
        for name in ("latent_channels", "downsample", "image_channels"):
            if getattr(self, name) < 1:
                found.append((name, "must be >= 1"))
        if self.encode_mode not in ENCODE_MODES:
            found.append(("encode_mode", f"expected one of {ENCODE_MODES}"))
        return found

    def validate(self) -> None:
        """As a config section (`model.vae_identity`): a bad value is a ConfigError naming its key."""
        for key, why in self.problems():
            check(False, key, f"bad value {getattr(self, key)!r} ({why})")

    def differences(self, other: "VaeIdentity", ignore: tuple[str, ...] = ("source",)) -> list[str]:
        """['field: mine != other's', ...] for every field outside `ignore` that differs ([] = same)."""
        return [f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
                for f in fields(self) if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]

    def require_same(self, other: "VaeIdentity", mine: str = "this VAE", theirs: str = "the expected VAE",
                     ignore: tuple[str, ...] = ("source",)) -> None:
        """Raise ValueError naming both sides and each differing field unless they match.

        ignore=NOT_FOR_DECODING when only decoding matters (e.g. a checkpoint's latents and the VAE
        that will turn its samples into pixels)."""
        if diff := self.differences(other, ignore):
            raise ValueError(f"VAE mismatch between {mine} ({self.source}) and {theirs} ({other.source}): "
                             f"{'; '.join(diff)}")
