"""The held-out validation set: fixed same-class sequences drawn from a manifest's validation shards.

Which sequences, and their order, are a function of the manifest and the seed alone (never of the world
size): sequence i is of class i mod C (over the classes with at least K held-out samples) and holds K distinct
samples of it chosen by a generator seeded with (seed, i). No flips: the set is the same at every evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .consumer import assemble_batch, verify_and_decode
from .manifest import Manifest, read_manifest
from .storage import read_bytes


@dataclass(frozen=True)
class ValidationSet:
    """images (S, K, C, H, W) in the stream's value range and labels (S,); sequence i's noise comes from i."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def held_out_samples(manifest: Manifest, storage_options: dict | None = None, *, retries: int = 5,
                     retry_backoff: float = 0.5) -> dict[int, list[np.ndarray]]:
    """{class: its held-out samples as stored} from the manifest's validation shards (checksums verified)."""
    by_class: dict[int, list[np.ndarray]] = {}
    for index in manifest.shard_indices("val"):
        shard = manifest.shards[index]
        data = read_bytes(manifest.shard_url(shard), storage_options, retries=retries, backoff=retry_backoff)
        by_class.setdefault(shard.cls, []).extend(
            verify_and_decode(data, manifest, index, range(shard.count), verify=True))
    return by_class


def load_validation_set(manifest_url: str, *, k: int, sequences: int, seed: int,
                        storage_options: dict | None = None) -> ValidationSet:
    """`sequences` fixed validation sequences of K samples from `manifest_url`'s validation shards."""
    manifest = read_manifest(manifest_url, storage_options)
    samples = held_out_samples(manifest, storage_options)
    classes = sorted(c for c, items in samples.items() if len(items) >= k)
    if not classes:
        raise ValueError(f"{manifest.url}: no class has {k} held-out samples for validation (write the shards "
                         f"with --val-per-class >= {k}, or turn validation off with eval.val_every=0)")
    chosen, labels = [], []
    for i in range(sequences):
        cls = classes[i % len(classes)]
        picks = np.random.default_rng([seed, i]).choice(len(samples[cls]), size=k, replace=False)
        chosen.append([samples[cls][p] for p in picks.tolist()])
        labels.append(cls)
    flip_copies = manifest.latents is not None and manifest.latents.flip_copy
    images = assemble_batch(chosen, None, manifest.sample_ext == "png", flip_copies)
    return ValidationSet(images=torch.from_numpy(np.ascontiguousarray(images)),
                         labels=torch.tensor(labels, dtype=torch.long))
