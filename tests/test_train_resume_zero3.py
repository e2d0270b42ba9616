"""End-to-end training at ZeRO-3 on a real local Ray with 2 CPU workers: a SIGKILLed run on S3 resumes and
exports; a run continues on one worker and back on two (helpers and ZeRO-2's runs: test_train_resume.py)."""
from __future__ import annotations

import logging

import pytest

from test_train_resume import (check_elastic_round_trip, continue_elsewhere, digits, loss_history,  # noqa: F401
                               run_training, runs_in_store)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero3_reference(ray_local, digits, tmp_path_factory):  # noqa: F811 - the imported fixture
    storage = tmp_path_factory.mktemp("z3ref")
    return run_training(digits, str(storage), "ref", "train.zero_stage=3", "model.activation_checkpointing=all")


def test_zero3_stop_and_rerun_on_s3_continues_and_exports(s3_endpoint, make_bucket, zero3_reference,
                                                          digits, tmp_path, caplog):  # noqa: F811
    """ZeRO-3 on S3: a SIGKILLed run fails; the same command again resumes, matches, and exports; once more, it
    only reports, from its last checkpoint's record, without starting workers."""
    import ray.train

    from arflow_scale.checkpoint import load_raw_weights, state_dict_sha256
    from arflow_scale.checkpoint import export_checkpoint, load_exported

    bucket = make_bucket("train")
    storage = f"s3://{bucket}/runs"
    tracking = f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"
    args = (digits, storage, "z3", "train.zero_stage=3", "model.activation_checkpointing=all",
            "run.max_failures=0", "faults.kill_rank_at_step=3", tracking)
    with pytest.raises(ray.train.TrainingFailedError):
        run_training(*args)
    result = run_training(*args)
    ref = zero3_reference
    assert result["checkpoint"] == f"{storage}/z3/checkpoint_000000006"
    assert (result["params_sha256"], result["ema_sha256"]) == (ref["params_sha256"], ref["ema_sha256"])
    assert result["final_loss"] == ref["final_loss"]
    ours = loss_history(result["mlflow_tracking_uri"], result["mlflow_run_id"])
    theirs = loss_history(ref["mlflow_tracking_uri"], ref["mlflow_run_id"])
    assert {s: v[-1] for s, v in ours.items()} == {s: v[0] for s, v in theirs.items()}
    assert len(runs_in_store(result["mlflow_tracking_uri"])) == 1

    # Export consolidates the ranks' ZeRO-3 partitions: equal to the weights gathered in training.
    out = tmp_path / "model.safetensors"
    info = export_checkpoint(result["checkpoint"], str(out))
    assert info["params_sha256"] == result["params_sha256"]
    assert info["ema_sha256"] == result["ema_sha256"]
    cfg, ema, raw = load_exported(str(out))
    assert cfg.train.zero_stage == 3 and state_dict_sha256(raw) == result["params_sha256"]
    assert state_dict_sha256(ema) != state_dict_sha256(raw)
    assert state_dict_sha256(load_raw_weights(f"{storage}/z3")) == result["params_sha256"]

    # The same command once more: the run is finished, so it starts no workers and reports the same state.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="arflow_scale"):
        again = run_training(*args)
    assert f"run {storage}/z3 finished at step 6: reporting its checkpoint" in caplog.text
    assert "resuming MLflow run" not in caplog.text  # what a launch of the workers logs first
    reported = ("final_step", "params_sha256", "ema_sha256", "checkpoint", "final_loss", "mlflow_run_id")
    assert {key: again[key] for key in reported} == {key: result[key] for key in reported}
    assert {s: v[-1] for s, v in loss_history(again["mlflow_tracking_uri"], again["mlflow_run_id"]).items()} == \
        {s: v[-1] for s, v in ours.items()}


def test_zero3_continues_on_one_worker_and_back_on_two(zero3_reference, digits, tmp_path):  # noqa: F811
    """ZeRO-3 through our own per-parameter resharding."""
    results, run_url = continue_elsewhere(zero3_reference, digits, tmp_path, "train.zero_stage=3",
                                          "model.activation_checkpointing=all")
    check_elastic_round_trip(zero3_reference, results, run_url)
