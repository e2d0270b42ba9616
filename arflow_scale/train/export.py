"""Turn checkpoints into artifacts: consolidated safetensors weights and EMA sample grids.

`export_checkpoint` writes one safetensors file: the EMA weights under the model's own parameter names
(load it straight into `build_model(cfg.model)`), the raw training weights under `raw.<name>`, and the
resolved config YAML plus both hashes in the file's metadata.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from einops import rearrange

RAW_PREFIX = "raw."


def model_from_weights(cfg, state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu"):
    """A plain (non-distributed) ARFlow of `cfg.model` carrying `state_dict`; eval mode."""
    from arflow_scale.model import build_model

    model = build_model(cfg.model)
    result = model.load_state_dict(state_dict, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in result.missing_keys if k not in buffers]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit model {cfg.model.size}: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval()


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


def draw_grid(model, labels: list[int], *, sampler: str = "ode", steps: int = 50, cfg_scale: float = 1.0,
              seed: int = 0, nrow: int | None = None) -> np.ndarray:
    """Sample one image per label with `model` and lay them out as a uint8 grid (H, W, 3)."""
    from arflow_scale.flow import sample

    device = next(model.parameters()).device
    label_tensor = torch.tensor(labels, dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        images = sample(model, label_tensor, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                        generator=torch.Generator().manual_seed(seed))
    side = images.shape[-1]
    return grid_image(images, nrow=nrow or min(len(labels), 10), scale=max(1, 64 // side))


def save_png(grid: np.ndarray, path: str, storage_options: dict | None = None) -> str:
    """Write a uint8 (H, W, 3) grid as PNG to a local path or URL."""
    from PIL import Image

    from arflow_scale.data.storage import filesystem

    fs, fs_path = filesystem(path, storage_options)
    parent = fs_path.rsplit("/", 1)[0] if "/" in fs_path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(fs_path, "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
    return path


def export_checkpoint(checkpoint_url: str, out_path: str, storage_options: dict | None = None,
                      include_raw: bool = True) -> dict[str, Any]:
    """Write consolidated EMA (+ raw) weights of a checkpoint (or a run's latest) to safetensors."""
    from safetensors.torch import save_file

    from arflow_scale.config import dump_yaml
    from arflow_scale.train.checkpoint import (load_ema_weights, load_raw_weights, resolve_checkpoint,
                                               state_dict_sha256)

    checkpoint_url = resolve_checkpoint(checkpoint_url, storage_options)
    cfg, ema = load_ema_weights(checkpoint_url, storage_options)
    tensors = {name: t.contiguous() for name, t in ema.items()}
    info: dict[str, Any] = {"checkpoint": checkpoint_url, "out": out_path, "tensors": len(ema),
                            "ema_sha256": state_dict_sha256(ema)}
    if include_raw:
        raw = load_raw_weights(checkpoint_url, storage_options)
        tensors.update({RAW_PREFIX + name: t.contiguous() for name, t in raw.items()})
        info["params_sha256"] = state_dict_sha256(raw)
    metadata = {"config": dump_yaml(cfg, mask_secrets=True), "checkpoint": checkpoint_url,
                **{k: v for k, v in info.items() if k.endswith("sha256")}}
    save_file(tensors, out_path, metadata=metadata)
    return info


def load_exported(path: str) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(Config, EMA state_dict, raw state_dict) from a file written by `export_checkpoint`."""
    import yaml
    from safetensors import safe_open

    from arflow_scale.config import config_from_dict

    ema, raw = {}, {}
    with safe_open(path, framework="pt") as f:
        cfg = config_from_dict(yaml.safe_load(f.metadata()["config"]))
        for key in f.keys():
            (raw if key.startswith(RAW_PREFIX) else ema)[key.removeprefix(RAW_PREFIX)] = f.get_tensor(key)
    return cfg, ema, raw
