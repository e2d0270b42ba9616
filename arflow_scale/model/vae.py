"""LatentVAE: a frozen diffusers AutoencoderKL (the SD-VAE family) between images in [-1, 1] and scaled latents.

Convention (diffusers' pipelines): latents = (z - shift_factor) * scale_factor on the way in and
z = latents / scale_factor + shift_factor on the way out, each applied exactly once here; SD's VAEs
have scale 0.18215 and no shift. Weights load from safetensors only (never a pickle); a hub id is
downloaded by diffusers at the user's site, a local folder never touches the network.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch

from .vae_identity import ENCODE_MODES, NOT_FOR_DECODING, VaeIdentity

__all__ = ["LatentVAE", "VaeIdentity", "DEFAULT_BATCH_SIZE", "NOT_FOR_DECODING", "config_sha256",
           "state_dict_sha256"]

DEFAULT_BATCH_SIZE = 32  # images (or latents) per VAE call
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
CONFIG_NAME = "config.json"
VAE_CLASS = "AutoencoderKL"

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def _resolve_source(path_or_id: str) -> tuple[str, bool]:
    """-> (absolute folder or hub id, is a local folder); a bad one is an error naming it."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"VAE {path_or_id!r}: not a folder (expected a diffusers AutoencoderKL folder "
                             f"with {CONFIG_NAME} and safetensors weights)")
        config = path / CONFIG_NAME
        if not config.is_file():
            raise FileNotFoundError(f"VAE folder {path}: no {CONFIG_NAME} (expected a folder written by "
                                    f"AutoencoderKL.save_pretrained)")
        try:
            class_name = json.loads(config.read_text()).get("_class_name", VAE_CLASS)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{config}: not a JSON object ({err})") from None
        if class_name != VAE_CLASS:
            raise ValueError(f"{config}: key '_class_name' is {class_name!r}, expected {VAE_CLASS!r}")
        return str(path.resolve()), True
    if HUB_ID.fullmatch(str(path_or_id)):
        return str(path_or_id), False
    raise FileNotFoundError(f"VAE {path_or_id!r}: no such folder, and not a hub id like 'stabilityai/sd-vae-ft-ema'")


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of the keys the VAE's config.json sets (diffusers' filled-in defaults and '_' keys left
    out), so the same file hashes alike under diffusers versions that add new keys."""
    defaults = set(config.get("_use_default_values", ()))
    explicit = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaults}
    return hashlib.sha256(json.dumps(explicit, sort_keys=True, default=list).encode()).hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state dict in name order: each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _chunks(batch: torch.Tensor, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return [(start, batch[start: start + batch_size]) for start in range(0, len(batch), batch_size)]


class LatentVAE:
    """A frozen AutoencoderKL plus its latent scale/shift and encode mode; no_grad, batched, on its device."""

    def __init__(self, vae, source: str, *, scale_factor: float | None = None, encode_mode: str = "mean",
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """`vae`: a diffusers AutoencoderKL as loaded (its weights are hashed before any dtype change);
        `scale_factor` overrides its config's `scaling_factor`; device None = CUDA if present, else CPU."""
        config = vae.config
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ValueError(f"VAE {source}: config key {key!r} is set; per-channel latent normalisation "
                                 f"is not supported (only scaling_factor / shift_factor)")
        if encode_mode not in ENCODE_MODES:
            raise ValueError(f"encode_mode must be one of {ENCODE_MODES}, got {encode_mode!r}")
        scale = float(config["scaling_factor"] if scale_factor is None else scale_factor)
        if not scale > 0:
            raise ValueError(f"VAE {source}: scale factor must be > 0, got {scale!r}")
        self._identity = VaeIdentity(
            source=str(source), config_sha256=config_sha256(config), weights_sha256=state_dict_sha256(vae),
            scale_factor=scale, shift_factor=float(config.get("shift_factor") or 0.0),
            latent_channels=int(config["latent_channels"]), downsample=2 ** (len(config["block_out_channels"]) - 1),
            image_channels=int(config["in_channels"]), encode_mode=encode_mode)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or torch.float32
        vae = vae.to(device) if vae.dtype == dtype else vae.to(device=device, dtype=dtype)
        self.vae = vae.eval().requires_grad_(False)

    @classmethod
    def load(cls, path_or_id: str, scale_factor: float | None = None, encode_mode: str = "mean",
             device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LatentVAE":
        """From a local folder (save_pretrained layout) or a hub id, safetensors weights only."""
        source, local = _resolve_source(path_or_id)
        if encode_mode not in ENCODE_MODES:  # before the (possibly long) load
            raise ValueError(f"encode_mode must be one of {ENCODE_MODES}, got {encode_mode!r}")
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(source, use_safetensors=True, local_files_only=local)
        except (OSError, ValueError) as err:
            where = "" if local else " (no such local folder; tried as a hub id)"
            raise ValueError(f"VAE {source}{where}: cannot load a diffusers AutoencoderKL with safetensors "
                             f"weights ({type(err).__name__}: {err})") from None
        return cls(vae, source, scale_factor=scale_factor, encode_mode=encode_mode, device=device, dtype=dtype)

    @classmethod
    def from_identity(cls, identity: VaeIdentity, path_or_id: str | None = None,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LatentVAE":
        """Load the VAE `identity` names (from `path_or_id`, else its source) with its scale and encode
        mode; raises ValueError naming both if the loaded weights or config are not that VAE's."""
        vae = cls.load(path_or_id or identity.source, scale_factor=identity.scale_factor,
                       encode_mode=identity.encode_mode, device=device, dtype=dtype)
        vae.identity().require_same(identity, mine="the loaded VAE", theirs="the recorded VAE")
        return vae

    def identity(self) -> VaeIdentity:
        return self._identity

    @property
    def scale_factor(self) -> float:
        return self._identity.scale_factor

    @property
    def shift_factor(self) -> float:
        return self._identity.shift_factor

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(c, h, w) of the latents of square images of side `image_size`."""
        down = self._identity.downsample
        if not isinstance(image_size, int) or image_size < down or image_size % down:
            raise ValueError(f"image size {image_size!r} is not a positive multiple of the VAE's "
                             f"downsampling {down} ({self._identity.source})")
        return self._identity.latent_channels, image_size // down, image_size // down

    def _check(self, batch: torch.Tensor, channels: int, what: str) -> None:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or not batch.is_floating_point():
            raise ValueError(f"{what} must be a float tensor (B, C, H, W), got "
                             f"{getattr(batch, 'dtype', type(batch).__name__)} {tuple(getattr(batch, 'shape', ()))}")
        if batch.shape[1] != channels:
            raise ValueError(f"{what} have {batch.shape[1]} channels, the VAE ({self._identity.source}) "
                             f"takes {channels}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE,
               generator: Generators = None) -> torch.Tensor:
        """Images float (B, C, H, W) in [-1, 1] -> float32 latents (B, c, H/d, W/d) on the VAE's device,
        already shifted and scaled. encode_mode "sample" needs `generator`: one torch.Generator (drawn
        batch after batch, so reproducible for a given batch_size) or one per image (independent of
        batch_size); a CPU generator gives the same draws on any device."""
        self._check(images, self._identity.image_channels, "images")
        down = self._identity.downsample
        if images.shape[2] % down or images.shape[3] % down:
            raise ValueError(f"images of {images.shape[2]}x{images.shape[3]} pixels: sides must be multiples of "
                             f"the VAE's downsampling {down}")
        sampling = self._identity.encode_mode == "sample"
        if sampling and generator is None:
            raise ValueError("encode_mode 'sample' needs a torch.Generator (or one per image) to be reproducible")
        per_image = sampling and not isinstance(generator, torch.Generator)
        if per_image and len(generator) != len(images):
            raise ValueError(f"{len(generator)} generators for {len(images)} images: pass one per image")
        out = []
        for start, chunk in _chunks(images, batch_size):
            posterior = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            if not sampling:
                z = posterior.mean
            else:
                z = posterior.sample(list(generator[start: start + len(chunk)]) if per_image else generator)
            out.append((z.float() - self.shift_factor) * self.scale_factor)
        if not out:
            return torch.zeros((0, self._identity.latent_channels, images.shape[2] // down, images.shape[3] // down),
                               device=self.device)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> float32 images (B, C, h*d, w*d) in [-1, 1] (clamped) on the
        VAE's device; unscales and unshifts once."""
        self._check(latents, self._identity.latent_channels, "latents")
        out = []
        for _, chunk in _chunks(latents, batch_size):
            z = chunk.to(self.device, torch.float32) / self.scale_factor + self.shift_factor
            out.append(self.vae.decode(z.to(self.dtype)).sample.float().clamp_(-1.0, 1.0))
        if not out:
            down = self._identity.downsample
            return torch.zeros((0, self._identity.image_channels, latents.shape[2] * down, latents.shape[3] * down),
                               device=self.device)
        return torch.cat(out)
