"""Ray Train's TorchTrainer, less the per-launch parts a run of ours has no use for.

Ray Train builds its controller's callbacks anew for every `fit`, and two kinds start work a run never uses:
- the datasets callback starts a DatasetManager actor (and, through Ray Data, its autoscaling coordinator) for
  every launch, even for a trainer given no Ray Datasets; our workers stream their own shards (data/), so a
  trainer without datasets goes without it;
- the metrics callbacks export Ray Train's gauges to the node's Prometheus endpoint. On a loopback Ray (the local
  Ray `arflow` starts, cluster/connect.py) no Prometheus scrapes them, so they are left out there unless
  RAY_TRAIN_METRICS_ENABLED is set; a joined cluster keeps them.
A 2-worker launch on 2 CPUs: 9.29 -> 8.47 s, 15.1 -> 13.3 busy core-s (docs/architecture.md, "Launch cost",
tools/ray_launch_bench.py). Everything else (the placement-group cleaner, failure handling) stays Ray's.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.train.torch import TorchTrainer

from arflow_scale.cluster.connect import LOCAL_NODE_IP

log = logging.getLogger(__name__)
METRICS_ENV = "RAY_TRAIN_METRICS_ENABLED"  # Ray Train's own switch; set, it decides


def _ray_train_callback_classes() -> tuple[Any, Any]:
    """(the datasets callback class, the metrics callback classes); empty where this Ray has other names."""
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.metrics import ControllerMetricsCallback, WorkerMetricsCallback
    except ImportError:  # another Ray Train layout: every callback stays
        log.debug("Ray Train's callback classes moved; launching with all of its callbacks")
        return (), ()
    return (DatasetsCallback,), (ControllerMetricsCallback, WorkerMetricsCallback)


def on_loopback_ray() -> bool:
    """True when this process's Ray node listens on the loopback address: one machine, no Prometheus of a cluster."""
    return ray.is_initialized() and ray.util.get_node_ip_address() == LOCAL_NODE_IP


def dropped_callback_classes(has_datasets: bool) -> tuple[type, ...]:
    """The Ray Train callback classes a launch goes without (see the module docstring)."""
    datasets, metrics = _ray_train_callback_classes()
    dropped = () if has_datasets else datasets
    if METRICS_ENV not in os.environ and on_loopback_ray():
        dropped += metrics
    return dropped


class LeanTorchTrainer(TorchTrainer):
    """TorchTrainer whose controller starts without `dropped_callback_classes`."""

    def _create_default_callbacks(self) -> list:
        dropped = dropped_callback_classes(bool(self.datasets))
        return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, dropped)]
