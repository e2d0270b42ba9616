"""Our Ray Train trainer (train/ray_trainer.py) is Ray's TorchTrainer less the callbacks a run never uses: the
datasets callback when there are no datasets, the metrics callbacks on a loopback Ray unless the environment
asks for them, the placement-group cleaner where the State API cannot tell it whether the controller lives. A
real launch on the session's local Ray (no dashboard) starts neither a DatasetManager nor a cleaner actor, nor (a
fixed-size launch on a loopback Ray) the autoscaling coordinator.
tests/test_ray_local_bind.py: the State API of `arflow train`'s local Ray sees its node (the cleaner stays)."""
from __future__ import annotations

import pytest
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from arflow_scale.train.ray_trainer import (METRICS_ENV, LeanTorchTrainer, LoopbackFixedScalingPolicy,
                                            on_loopback_ray, scaling_policy_for)
from conftest import tool_module

DATASETS, METRICS = {"DatasetsCallback"}, {"ControllerMetricsCallback", "WorkerMetricsCallback"}
CLEANER = {"PlacementGroupCleanerCallback"}


def callback_names(trainer_class: type, tmp_path, **kwargs) -> list[str]:
    trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                            run_config=RunConfig(storage_path=str(tmp_path), name="callbacks"), **kwargs)
    return [type(callback).__name__ for callback in trainer._create_default_callbacks()]


def test_the_trainer_drops_unused_datasets_metrics_on_loopback_and_a_cleaner_that_cannot_see(
        ray_local, tmp_path, monkeypatch):
    from arflow_scale.train import ray_trainer

    monkeypatch.delenv(METRICS_ENV, raising=False)
    assert on_loopback_ray()  # the session's Ray starts as `arflow train`'s local Ray does, without a dashboard
    assert not ray_trainer.state_api_sees_this_node()
    rays = callback_names(TorchTrainer, tmp_path)
    assert DATASETS | METRICS | CLEANER <= set(rays), f"Ray Train's callbacks were renamed: {rays}"
    assert callback_names(LeanTorchTrainer, tmp_path) == [name for name in rays
                                                          if name not in DATASETS | METRICS | CLEANER]

    monkeypatch.setenv(METRICS_ENV, "1")  # the environment decides when it says
    monkeypatch.setattr(ray_trainer, "state_api_sees_this_node", lambda: True)  # as with a dashboard
    assert callback_names(LeanTorchTrainer, tmp_path) == [name for name in rays if name not in DATASETS]
    datasets = {"train": ray_local.data.range(4)}  # a trainer given datasets keeps their callback
    assert callback_names(LeanTorchTrainer, tmp_path, datasets=datasets) == rays


def test_a_fixed_size_launch_on_a_loopback_ray_sends_no_autoscaler_requests(ray_local, monkeypatch):
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy

    from arflow_scale.train import ray_trainer

    fixed = create_scaling_policy(ScalingConfig(num_workers=2))
    ours = scaling_policy_for(fixed)
    assert type(ours) is LoopbackFixedScalingPolicy and ours.scaling_config is fixed.scaling_config
    elastic = create_scaling_policy(ScalingConfig(num_workers=(1, 2)))
    assert scaling_policy_for(elastic) is elastic  # elastic runs ask the coordinator what they may use
    monkeypatch.setattr(ray_trainer, "on_loopback_ray", lambda: False)  # a joined cluster's autoscaler reads them
    assert scaling_policy_for(fixed) is fixed


def test_a_launch_trains_without_a_dataset_manager_or_cleaner_actor(ray_local, tmp_path):
    from ray._private.state import actors

    from ray import cloudpickle

    bench = tool_module("ray_launch_bench")
    cloudpickle.register_pickle_by_value(bench)  # the workers cannot import tools/; as when run as __main__
    before = set(actors())
    launch = bench.timed_launch(LeanTorchTrainer, str(tmp_path / "runs"), "lean", workers=2)
    started = {info["ActorClassName"] for actor_id, info in actors().items() if actor_id not in before}
    assert {"TrainController", "RayTrainWorker"} <= started, started
    assert not started & {"DatasetManager", "PlacementGroupCleaner"}, started
    alive = {info["ActorClassName"] for info in actors().values() if info["State"] == "ALIVE"}
    assert "_AutoscalingCoordinatorActor" not in alive, alive  # no launch on this loopback Ray started one
    assert launch["seconds"] > 0 and launch["busy_cpu_seconds"] >= 0
