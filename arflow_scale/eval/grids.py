"""Sample grids: one sample per label from a model family, decoded to pixels, laid out as a uint8 picture
(MLflow sample grids, `arflow sample`, the demo)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import nn

from arflow_scale.data.storage import filesystem
from arflow_scale.model.decoder import Decoder
from arflow_scale.tasks import ModelTask, SampleSettings

GRID_SIDE = 64  # small images are upscaled (nearest) until a cell is about this wide


def grid_image(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """images (B, C, H, W) in [-1, 1] -> uint8 grid (rows*(H+pad), nrow*(W+pad), 3), upscaled by `scale`."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    images = images[:, :3]
    images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images
    images = torch.nn.functional.pad(images, (0, pad, 0, pad), value=1.0)
    rows = -(-images.shape[0] // nrow)
    fill = rows * nrow - images.shape[0]
    if fill:
        images = torch.cat([images, images.new_ones((fill, *images.shape[1:]))])
    grid = rearrange(images, "(r c) ch h w -> (r h) (c w) ch", c=nrow)
    return ((grid + 1) * 127.5).round().to(torch.uint8).numpy()


def sample_grid(task: ModelTask, model: nn.Module, labels: list[int], settings: SampleSettings, decoder: Decoder,
                *, seed: int = 0, nrow: Optional[int] = None) -> np.ndarray:
    """Sample one image per label with `model` (bf16 autocast on CUDA), decode them to pixels (fp32) -> a
    uint8 grid (H, W, 3) whose cells are images at the data's pixel resolution (upscaled when small)."""
    device = next(model.parameters()).device
    label_tensor = torch.tensor(labels, dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        samples = task.sample(model, label_tensor, settings, torch.Generator().manual_seed(seed))
    images = decoder(samples.float())
    side = images.shape[-1]
    return grid_image(images, nrow=nrow or min(len(labels), 10), scale=max(1, GRID_SIDE // side))


def save_png(grid: np.ndarray, url: str, storage_options: Optional[dict] = None) -> str:
    """Write a uint8 (H, W, 3) grid as PNG to a local path or URL."""
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
    return url
