"""Divergence on a real local Ray with 2 CPU workers: a non-finite loss or gradient stops the run naming the
step, or is skipped (train.nonfinite=skip); no checkpoint ever holds non-finite state and the finite ones stay."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow

BASE = [
    "model.size=tiny/2", "model.image_size=8", "model.in_channels=1", "model.num_classes=10", "model.k=3",
    "data.batch_size=4", "data.shuffle_buffer=16", "checkpoint.every=1", "train.log_every=1", "train.sample_every=0",
    "train.ema_decay=0.9", "optim.warmup_steps=2", "optim.schedule=cosine", "cluster.num_workers=2",
    "cluster.use_gpu=false", "tracking.system_metrics=false", "train.zero_stage=2",
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from arflow_scale.data import write_shards

    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards("digits", str(out), samples_per_shard=64, progress=False)
    return str(out)


def train_run(digits: str, storage, name: str, *overrides: str):
    from arflow_scale.config import config_from_dict
    from arflow_scale.train.driver import train

    cfg = config_from_dict({}, BASE + [f"data.manifest={digits}", f"run.storage_path={storage}", f"run.name={name}",
                                       f"tracking.uri=sqlite:///{storage}/mlflow.db", *overrides])
    return train(cfg)


def finite(state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def test_a_diverging_run_stops_naming_the_step_and_keeps_its_finite_checkpoint(ray_local, digits, tmp_path,
                                                                               capsys):
    """The issue's probe: lr 1e30 without clipping used to exit 0, save diverged weights and prune the finite ones."""
    from mlflow.tracking import MlflowClient

    from arflow_scale.checkpoint import latest_checkpoint, list_checkpoints, load_ema_weights, load_raw_weights
    from arflow_scale.cli import main

    overrides = BASE + [f"data.manifest={digits}", f"run.storage_path={tmp_path}", "run.name=probe",
                        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "optim.lr=1e30", "optim.clip=none",
                        "optim.warmup_steps=0", "checkpoint.keep_last=1", "train.steps=6"]
    assert main(["train", "--config", str(REPO / "configs" / "demo.yaml"), *overrides]) == 1
    captured = capsys.readouterr()
    assert "arflow train: training diverged: step 2: a non-finite loss" in captured.err and not captured.out
    run_url = f"{tmp_path}/probe"
    assert list_checkpoints(run_url) == [f"{run_url}/checkpoint_000000001"] == [latest_checkpoint(run_url)]
    assert finite(load_raw_weights(run_url)) and finite(load_ema_weights(run_url).weights)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]


def test_a_skipped_step_changes_nothing_and_training_goes_on(ray_local, digits, tmp_path):
    """Rank 1's loss at step 3 is NaN: with train.nonfinite=skip no rank applies step 3 (weights, moments, EMA as
    after step 2), the schedule advances, and the run finishes."""
    from mlflow.tracking import MlflowClient

    from arflow_scale.checkpoint import load_ema_weights, load_raw_weights, read_record, state_dict_sha256
    from arflow_scale.train.schedule import lr_factor

    result = train_run(digits, tmp_path, "skip", "train.nonfinite=skip", "faults.nan_loss_at_step=3",
                       "faults.rank=1", "checkpoint.keep_last=10", "train.steps=4", "optim.lr=1e-3").to_json()
    run_url = f"{tmp_path}/skip"
    two, three = f"{run_url}/checkpoint_000000002", f"{run_url}/checkpoint_000000003"
    assert state_dict_sha256(load_raw_weights(two)) == state_dict_sha256(load_raw_weights(three))
    assert state_dict_sha256(load_ema_weights(two).weights) == state_dict_sha256(load_ema_weights(three).weights)
    assert (read_record(two).skipped_steps, read_record(three).skipped_steps) == (0, 1)
    assert result["final_step"] == 4 and math.isfinite(result["final_loss"])
    assert result["params_sha256"] != state_dict_sha256(load_raw_weights(three))  # step 4 was applied
    client = MlflowClient(result["mlflow_tracking_uri"])
    skipped = {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], "skipped_steps")}
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}
    lr = {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], "lr")}
    assert lr[4] == pytest.approx(1e-3 * lr_factor(3, warmup=2, total=4, schedule="cosine", min_ratio=0.0))
