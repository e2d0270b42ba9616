"""VaeShardEncoder: the shard writer's encoder for latent folders (uint8 images -> scaled VAE latents).

Pixels map to [-1, 1] as the stream maps them (x / 127.5 - 1). Grey images (1 channel) are repeated
to the VAE's 3 channels. With `flip_copy` each stored sample is (2, c, h, w): the image's latents,
then the latents of its horizontal mirror image, as the reference ARFlow caches both; the stream's
flip then picks the second instead of mirroring latents (a VAE is not exactly mirror-equivariant).
With encode_mode "sample" the posterior draw of source image i, copy v (0 as is, 1 mirrored) comes
from its own generator seeded by (seed, i, v): the same bytes for any batch size, worker count or
shard layout.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
from einops import rearrange

from arflow_scale.model.vae import DEFAULT_BATCH_SIZE, LatentVAE

from .manifest import LatentEncoding


def images_to_unit_range(images: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, channels, H, W) in [-1, 1]; C = 1 is repeated to `channels`."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if images.shape[-1] not in (1, channels):
        raise ValueError(f"images have {images.shape[-1]} channels, the VAE takes {channels} (or 1, repeated)")
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    pixels = rearrange(pixels, "n h w c -> n c h w").float().div_(127.5).sub_(1.0)
    return pixels.expand(-1, channels, -1, -1) if pixels.shape[1] != channels else pixels


def draw_generators(seed: int, indices: np.ndarray, copy: int) -> list[torch.Generator]:
    """One CPU generator per source index, seeded by (seed, index, copy)."""
    generators = []
    for index in np.asarray(indices).tolist():
        state = np.random.SeedSequence([seed, int(index), copy]).generate_state(2, dtype=np.uint32)
        generators.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return generators


class VaeShardEncoder:
    """Callable (uint8 images (N, H, W, C), source indices (N,)) -> float32 latents (N, c, h, w), or
    (N, 2, c, h, w) with `flip_copy`; `encoding` is what the manifest records."""

    def __init__(self, vae: LatentVAE, image_size: int, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 flip_copy: bool = False, seed: int = 0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"VAE batch size must be an integer >= 1, got {batch_size!r}")
        sampling = vae.identity().encode_mode == "sample"
        self.vae, self.batch_size, self.seed = vae, batch_size, seed
        self.encoding = LatentEncoding(vae=vae.identity(), image_size=image_size,
                                       latent_shape=vae.latent_shape(image_size), flip_copy=flip_copy,
                                       sample_seed=seed if sampling else None)
        self._lock = threading.Lock()  # the writer's threads read and crop in parallel, one encodes at a time

    def _encode(self, pixels: torch.Tensor, indices: np.ndarray, copy: int) -> np.ndarray:
        generators = draw_generators(self.seed, indices, copy) if self.encoding.sample_seed is not None else None
        return self.vae.encode(pixels, batch_size=self.batch_size, generator=generators).cpu().numpy()

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        size = self.encoding.image_size
        if images.shape[1:3] != (size, size):
            raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} pixels, the encoding expects "
                             f"{size}x{size} (resize them to --image-size first)")
        pixels = images_to_unit_range(images, self.encoding.vae.image_channels)
        with self._lock:
            latents = self._encode(pixels, indices, 0)
            if not self.encoding.flip_copy:
                return latents
            mirrored = self._encode(pixels.flip(-1), indices, 1)
        return np.stack([latents, mirrored], axis=1)
