"""Consolidated safetensors weights of a checkpoint, and reading them back.

One file holds the EMA weights under the model's own parameter names (they load straight into the
family's model), the raw training weights under `raw.<name>`, and in its metadata the resolved config
YAML (secrets masked), the checkpoint it came from, both hashes and, for a latent model, `vae`: the JSON
identity of the VAE that decodes its samples (also in the config, `model.vae_identity`).
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple, Optional

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from arflow_scale.config import Config, config_from_dict, dump_yaml

from .store import resolve_checkpoint
from .weights import StateDict, load_ema_weights, load_raw_weights, state_dict_sha256

RAW_PREFIX = "raw."
VAE_KEY = "vae"  # metadata key of the VAE identity (JSON), latent models only


class ExportedWeights(NamedTuple):
    """What `export_checkpoint` wrote (unpacks as `cfg, ema, raw`; raw is empty with --no-raw)."""

    config: Config
    ema: StateDict
    raw: StateDict


def export_checkpoint(checkpoint_url: str, out_path: str, storage_options: Optional[dict] = None,
                      include_raw: bool = True) -> dict[str, Any]:
    """Write consolidated EMA (+ raw) weights of a checkpoint (or a run's latest) to safetensors; returns the
    JSON summary `arflow export` prints."""
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
    if cfg.model.vae_identity is not None:
        metadata[VAE_KEY] = json.dumps(cfg.model.vae_identity.to_dict())
        info["vae"] = cfg.model.vae
    save_file(tensors, out_path, metadata=metadata)
    return info


def load_exported(path: str) -> ExportedWeights:
    """(Config, EMA state_dict, raw state_dict) from a file written by `export_checkpoint`."""
    ema: StateDict = {}
    raw: StateDict = {}
    with safe_open(path, framework="pt") as f:
        cfg = config_from_dict(yaml.safe_load(f.metadata()["config"]))
        for key in f.keys():
            tensor: torch.Tensor = f.get_tensor(key)
            (raw if key.startswith(RAW_PREFIX) else ema)[key.removeprefix(RAW_PREFIX)] = tensor
    return ExportedWeights(cfg, ema, raw)
