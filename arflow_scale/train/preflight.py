"""What the driver checks about the data before anything starts (no Ray, no run folder, no MLflow run).

It reads the manifest once and lists the shard folder once: a missing manifest or shard, a K that no
loader worker can fill from any class, and (with `data.require_all_classes`) classes the run would never
train are ConfigErrors naming their key, so `arflow train` exits with code 2 within seconds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from arflow_scale.config import Config
from arflow_scale.data import StorageError, read_manifest
from arflow_scale.data.storage import list_files
from arflow_scale.data.units import trainable_classes
from arflow_scale.schema import fail

log = logging.getLogger(__name__)
NAMED_CLASSES = 10  # classes named in a message before "and N more"


@dataclass(frozen=True)
class DataPlan:
    """The classes a run trains on, as the driver found them in the manifest."""

    manifest_url: str
    class_names: tuple[str, ...]
    trained: tuple[int, ...]  # classes some loader worker draws K samples from
    left_out: tuple[int, ...]  # classes without shards, or with fewer than K samples for every loader worker

    def names(self, classes: tuple[int, ...]) -> str:
        shown = ", ".join(f"{c} ({self.class_names[c]})" for c in classes[:NAMED_CLASSES])
        more = len(classes) - NAMED_CLASSES
        return shown + (f" and {more} more" if more > 0 else "")

    def params(self) -> dict[str, str]:
        """MLflow params of the run: how many classes it trains and which it leaves out."""
        return {"data.classes_trained": str(len(self.trained)),
                "data.classes_left_out": ",".join(self.class_names[c] for c in self.left_out)}


def check_data(cfg: Config, k: int) -> DataPlan:
    """The data plan of a run drawing `k` images per sample, or ConfigError naming the key to change."""
    data = cfg.data
    if not data.manifest:
        fail("data.manifest", "not set: the URL of a shard folder written by `arflow data shards` (or its "
                              "manifest.json)")
    try:
        manifest = read_manifest(data.manifest, data.storage_options, retries=data.retries,
                                 retry_backoff=data.retry_backoff)
        present = list_files(manifest.url, data.storage_options, retries=data.retries, backoff=data.retry_backoff)
    except (FileNotFoundError, ValueError, StorageError) as err:
        fail("data.manifest", str(err))
    missing = [s.path for s in manifest.shards if s.path not in present]
    if missing and not data.skip_missing:
        fail("data.manifest", f"{manifest.url} names {len(missing)} shard(s) that are not there, e.g. {missing[0]}; "
                              f"set data.skip_missing=true to train without them")
    shards = [i for i, s in enumerate(manifest.shards) if s.path in present]
    high = cfg.cluster.worker_range[1]
    consumers = high * max(data.num_workers, 1)
    trained = tuple(trainable_classes(manifest, shards, k, consumers))
    plan = DataPlan(manifest.url, tuple(manifest.class_names), trained,
                    tuple(c for c in range(manifest.num_classes) if c not in set(trained)))
    if not trained:
        largest = max(manifest.class_counts(), default=0)
        if largest < k:
            fail("model.k", f"{k} images per sequence, but no class of {manifest.url} has that many "
                            f"(the largest has {largest}); lower model.k or write more images per class")
        fail("model.k", f"{k} images per sequence, but split over {consumers} loader workers ({high} ranks x "
                        f"{max(data.num_workers, 1)}) no worker gets {k} samples of any class; lower model.k, "
                        f"cluster.num_workers or data.num_workers")
    if plan.left_out:
        why = (f"classes {plan.names(plan.left_out)} of {manifest.url} would never be trained (no shards, or "
               f"fewer than K={k} samples for each of {consumers} loader workers)")
        if data.require_all_classes:
            fail("data.require_all_classes", f"{why}; write shards for them, lower model.k, or set "
                                             f"data.require_all_classes=false to train without them")
        log.warning("%s; training on %d of %d classes", why, len(trained), manifest.num_classes)
    return plan
