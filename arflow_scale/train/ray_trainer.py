"""Ray Train's TorchTrainer, less the per-launch parts a run of ours has no use for.

Ray Train builds its controller's callbacks anew for every `fit`, and three kinds start work a run may not use:
- the datasets callback starts a DatasetManager actor (and, through Ray Data, its autoscaling coordinator) for
  every launch, even for a trainer given no Ray Datasets; our workers stream their own shards (data/), so a
  trainer without datasets goes without it;
- the metrics callbacks export Ray Train's gauges to the node's Prometheus endpoint. On a loopback Ray (the local
  Ray `arflow` starts, cluster/connect.py) no Prometheus scrapes them, so they are left out there unless
  RAY_TRAIN_METRICS_ENABLED is set; a joined cluster keeps them;
- the placement-group cleaner, an actor that removes the run's placement group if the controller dies, learns
  whether it lives from Ray's State API, which the dashboard serves at an address it finds for itself. On a Ray
  without a dashboard every query fails (ServerUnavailable, logged and retried each second), and while another
  Ray runs on the machine the address cannot be found (a ConnectionError, which ends its watch), so it can never
  clean: it is left out where the State API does not see this node, and kept wherever it can work (`arflow
  train`'s and `arflow sweep`'s local Ray have a dashboard).
Ray Train's fixed scaling policy also registers the run's resources with Ray Data's autoscaling coordinator, an
actor it starts once per Ray, for a cluster autoscaler to read. A loopback Ray has no autoscaler, so a fixed-size
launch there goes without (`scaling_policy_for`); an elastic launch keeps Ray's policy, which asks the coordinator
what it may use.
A 2-worker launch on 2 CPUs, on a Ray without a dashboard: 8.85 -> 6.43 s, 13.9 -> 11.0 busy core-s
(docs/architecture.md, "Launch cost", tools/ray_launch_bench.py). Failure handling stays Ray's.
"""
from __future__ import annotations

import logging
import os

import ray
from ray.train.torch import TorchTrainer
from ray.util.state import get_node
from ray.util.state.exception import RayStateApiException

from arflow_scale.cluster.connect import LOCAL_NODE_IP

try:
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # another Ray Train layout: every launch keeps Ray's scaling policy
    FixedScalingPolicy = None

log = logging.getLogger(__name__)
METRICS_ENV = "RAY_TRAIN_METRICS_ENABLED"  # Ray Train's own switch; set, it decides


def _ray_train_callback_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(the datasets callback class, the metrics callback classes, the placement-group cleaner's callback class);
    empty where this Ray names them otherwise."""
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.metrics import ControllerMetricsCallback, WorkerMetricsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray Train layout: every callback stays
        log.debug("Ray Train's callback classes moved; launching with all of its callbacks")
        return (), (), ()
    return (DatasetsCallback,), (ControllerMetricsCallback, WorkerMetricsCallback), (PlacementGroupCleanerCallback,)


def on_loopback_ray() -> bool:
    """True when this process's Ray node listens on the loopback address: one machine, no Prometheus of a cluster."""
    return ray.is_initialized() and ray.util.get_node_ip_address() == LOCAL_NODE_IP


def state_api_sees_this_node() -> bool:
    """True when Ray's State API (the dashboard's) answers for this process's node, as the placement-group
    cleaner needs it to; False without a dashboard, or when the address it finds is not this Ray's."""
    try:
        return get_node(ray.get_runtime_context().get_node_id(), timeout=10) is not None
    except (RayStateApiException, OSError):  # ServerUnavailable; ConnectionError: several Rays on the machine
        return False


def dropped_callback_classes(has_datasets: bool) -> tuple[type, ...]:
    """The Ray Train callback classes a launch goes without (see the module docstring)."""
    datasets, metrics, cleaner = _ray_train_callback_classes()
    dropped = () if has_datasets else datasets
    if METRICS_ENV not in os.environ and on_loopback_ray():
        dropped += metrics
    if cleaner and not state_api_sees_this_node():
        dropped += cleaner
    return dropped


class LoopbackFixedScalingPolicy(FixedScalingPolicy or object):
    """Ray Train's fixed-size policy less its resource requests to the autoscaling coordinator: they are what
    starts the coordinator (Ray's client creates it on first use). Were Ray to rename these methods, its own
    requests would run again (the coordinator back, nothing lost); test_ray_trainer.py would say so."""

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass


def scaling_policy_for(policy):
    """The scaling policy a launch runs with: Ray's `policy`, except a fixed-size one on a loopback Ray, which
    goes without autoscaler requests (see the module docstring)."""
    if FixedScalingPolicy is None or type(policy) is not FixedScalingPolicy or not on_loopback_ray():
        return policy
    return LoopbackFixedScalingPolicy(policy.scaling_config)


class LeanTorchTrainer(TorchTrainer):
    """TorchTrainer whose controller starts without `dropped_callback_classes`, and on a loopback Ray without
    autoscaler requests (`scaling_policy_for`)."""

    def _create_default_callbacks(self) -> list:
        dropped = dropped_callback_classes(bool(self.datasets))
        return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, dropped)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if "scaling_policy" in controller_init_kwargs:
            controller_init_kwargs["scaling_policy"] = scaling_policy_for(controller_init_kwargs["scaling_policy"])
        return super()._initialize_and_run_controller(**controller_init_kwargs)
