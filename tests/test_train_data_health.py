"""A 2-worker run on shards of which some are corrupt: MLflow and the console see every rank's problems, not
rank 0's only, and the run states the classes it trains (real Ray, DeepSpeed, MLflow)."""
from __future__ import annotations

import pytest

from test_data_faults import damage
from test_train_resume import run_training

pytestmark = pytest.mark.slow


@pytest.fixture()
def damaged_digits(tmp_path):
    """Digits in 3 shards per class (shard j goes to rank j % 2): rank 1 loses class 3 (its one shard), rank 0
    class 5 (its two)."""
    from arflow_scale.data import write_shards

    out = tmp_path / "digits"
    write_shards("digits", str(out), samples_per_shard=64, progress=False)
    for name in ("c0003-00001", "c0005-00000", "c0005-00002"):
        damage(out / "shards" / f"{name}.tar", "checksum")
    return str(out)


def test_corrupt_shards_of_every_rank_reach_mlflow_and_the_console(ray_local, damaged_digits, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    result = run_training(damaged_digits, str(tmp_path / "runs"), "health", "train.steps=12", "checkpoint.every=12",
                          "train.zero_stage=0")
    assert result["final_step"] == 12 and result["classes_trained"] == 10
    client = MlflowClient(result["mlflow_tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["skipped_shards"] == 3 and run.data.metrics["classes_dropped"] == 2
    assert run.data.params["data.classes_trained"] == "10" and run.data.params["data.classes_left_out"] == ""
    err = capfd.readouterr().err
    assert "data: 3 corrupt shard(s) skipped over all ranks, 2 class(es) dropped (class 3 on rank 1; class 5 on " \
           "rank 0)" in err
