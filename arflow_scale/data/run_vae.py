"""Which VAE a run's latents belong to, resolved once by `arflow train` before any worker starts.

Sources, in order: `model.vae` (loaded on CPU to learn its identity), else the VAE the shards' manifest
records (`latents.vae`). Both given: they must be the same VAE (weights, config, scale, shift, shapes);
a run that continues from a checkpoint must use the VAE that checkpoint recorded. Every mismatch is a
ConfigError naming both sides. The result is written into the run's config (`model.vae`,
`model.vae_scale_factor`, `model.vae_identity`), which every checkpoint and export stores: sample grids,
`arflow sample`, FID tasks and exports read the VAE from there.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from arflow_scale.config import Config, ModelConfig
from arflow_scale.model.vae import NOT_FOR_DECODING, LatentVAE, VaeIdentity
from arflow_scale.schema import check, fail

from .manifest import Manifest, read_manifest


def _same(mine: VaeIdentity, theirs: VaeIdentity, key: str, mine_name: str, theirs_name: str) -> None:
    try:
        mine.require_same(theirs, mine=mine_name, theirs=theirs_name, ignore=NOT_FOR_DECODING)
    except ValueError as err:
        fail(key, str(err))


def _from_config(model: ModelConfig, manifest: Optional[Manifest]) -> VaeIdentity:
    """The identity of the VAE `model.vae` names, checked against the shards' (whose encode mode it keeps)."""
    if manifest is not None and manifest.sample_ext != "npy":
        fail("model.vae", f"{model.vae}: the shards at {manifest.url} hold {manifest.sample_ext} images, not "
                          f"latents; drop model.vae for a pixel model or point data.manifest at latent shards")
    try:
        identity = LatentVAE.load(model.vae, scale_factor=model.vae_scale_factor, device="cpu").identity()
    except (FileNotFoundError, ValueError) as err:
        fail("model.vae", str(err))
    recorded = manifest.latents.vae if manifest is not None and manifest.latents is not None else None
    if recorded is None:
        return identity
    _same(identity, recorded, "model.vae", "model.vae", f"the VAE of the shards at {manifest.url}")
    return dataclasses.replace(recorded, source=identity.source)


def _from_manifest(model: ModelConfig, manifest: Optional[Manifest]) -> Optional[VaeIdentity]:
    if manifest is None or manifest.latents is None:
        return None
    recorded = manifest.latents.vae
    check(model.vae_scale_factor in (None, recorded.scale_factor), "model.vae_scale_factor",
          f"{model.vae_scale_factor}, but the shards at {manifest.url} were scaled by {recorded.scale_factor} "
          f"(their VAE {recorded.source})")
    return recorded


def _check_geometry(model: ModelConfig, identity: VaeIdentity, manifest: Optional[Manifest]) -> None:
    check(model.in_channels == identity.latent_channels, "model.in_channels",
          f"{model.in_channels}, but the VAE {identity.source} makes {identity.latent_channels}-channel latents")
    if manifest is not None and manifest.latents is not None:
        side = manifest.latents.latent_shape[-1]
        check(model.image_size == side, "model.image_size",
              f"{model.image_size}, but the shards at {manifest.url} hold {manifest.latents.image_size}-pixel "
              f"images as {side}x{side} latents (model.image_size is the latent side)")


def resolve_run_vae(cfg: Config, resumed: Optional[ModelConfig] = None, *, read_shards: bool = True) -> Config:
    """`cfg` with its VAE resolved (unchanged for a pixel run); `resumed`: the model section of the
    checkpoint the run continues from; `read_shards` False: the run does not stream `data.manifest` (a
    benchmark's batches). Raises ConfigError naming the key and both VAEs on a mismatch."""
    model = cfg.model
    manifest = None
    if cfg.data.manifest and read_shards:
        manifest = read_manifest(cfg.data.manifest, dict(cfg.data.storage_options), retries=cfg.data.retries,
                                 retry_backoff=cfg.data.retry_backoff)
    identity = _from_config(model, manifest) if model.vae else _from_manifest(model, manifest)
    if model.vae_identity is not None and identity is not None:  # a config that was resolved before
        _same(identity, model.vae_identity, "model.vae_identity", "the run's VAE", "model.vae_identity")
    before = resumed.vae_identity if resumed is not None else None
    if before is not None:
        check(identity is not None, "model.vae",
              f"names no VAE, but the run continues from a checkpoint whose latents need {before.source}")
        _same(identity, before, "model.vae", "this run's VAE", "the VAE of the checkpoint it continues from")
    if identity is None:
        return cfg
    _check_geometry(model, identity, manifest)
    resolved = dataclasses.replace(model, vae=identity.source, vae_scale_factor=identity.scale_factor,
                                   vae_identity=identity)
    return dataclasses.replace(cfg, model=resolved)
