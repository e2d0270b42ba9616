"""End-to-end training on a real local Ray with 2 CPU workers and real DeepSpeed engines.

Runs are shared across assertions: one uninterrupted reference per ZeRO stage (module fixtures), which the
elastic tests also continue on one worker and back on two. ZeRO-3's runs are in test_train_resume_zero3.py (a
file of their own, so the suite's parallel workers can take them apart from these).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BASE = [
    "model.size=tiny/2", "model.image_size=8", "model.in_channels=1", "model.num_classes=10", "model.k=3",
    "data.batch_size=4", "data.shuffle_buffer=16", "train.steps=6", "checkpoint.every=2",
    "checkpoint.keep_last=2", "train.log_every=1", "train.sample_every=0", "train.sample_steps=2",
    "train.ema_decay=0.9", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=cosine",
    "cluster.num_workers=2", "cluster.use_gpu=false", "tracking.system_metrics=false",
]
METRICS = {"loss", "lr", "grad_norm", "images_per_s", "tokens_per_s", "step_time", "data_wait_fraction",
           "skipped_shards"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from arflow_scale.data import write_shards

    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards("digits", str(out), samples_per_shard=64, progress=False)
    return str(out)


def run_training(digits: str, storage: str, name: str, *overrides: str) -> dict:
    from arflow_scale.config import config_from_dict
    from arflow_scale.train.driver import train

    cfg = config_from_dict({}, BASE + [f"data.manifest={digits}", f"run.storage_path={storage}",
                                       f"run.name={name}", *overrides])
    return train(cfg).to_json()


def loss_history(tracking_uri: str, run_id: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    by_step: dict[int, list[float]] = {}
    for m in MlflowClient(tracking_uri).get_metric_history(run_id, "loss"):
        by_step.setdefault(m.step, []).append(m.value)
    return by_step


def runs_in_store(tracking_uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments])


@pytest.fixture(scope="module")
def zero2_reference(ray_local, digits, tmp_path_factory):
    storage = tmp_path_factory.mktemp("z2ref")
    return run_training(digits, str(storage), "ref", "train.zero_stage=2")


@pytest.fixture(scope="module")
def zero2_crash(ray_local, digits, tmp_path_factory):
    """Rank 1 raises after step 5, when checkpoints 2 and 4 are complete; Ray restarts the worker group, which
    continues from the newest one (4)."""
    storage = tmp_path_factory.mktemp("z2crash")
    result = run_training(digits, str(storage), "crash", "train.zero_stage=2", "run.max_failures=1",
                          "faults.crash_rank_at_step=5", "faults.rank=1")
    return result, storage / "crash"


def test_zero2_crash_resumes_bit_identical_from_the_newest_checkpoint(zero2_reference, zero2_crash):
    result, run_folder = zero2_crash
    ref = zero2_reference
    assert result["final_step"] == ref["final_step"] == 6
    assert result["params_sha256"] == ref["params_sha256"]
    assert result["ema_sha256"] == ref["ema_sha256"]
    assert result["final_loss"] == ref["final_loss"] and math.isfinite(result["final_loss"])
    # Per-step losses: every step logged once (the redone step 5 not again), equal to the reference.
    ours = loss_history(result["mlflow_tracking_uri"], result["mlflow_run_id"])
    theirs = loss_history(ref["mlflow_tracking_uri"], ref["mlflow_run_id"])
    assert sorted(ours) == list(range(1, 7))
    assert ours == {step: [values[0]] for step, values in theirs.items()}
    # The injected fault fired exactly once (its marker survived the restart).
    fault = run_folder / "faults" / "crash-rank1-step5"
    assert [p.name for p in (run_folder / "faults").iterdir()] == [fault.name]
    # The restart continued from checkpoint 4: it was not written again after the crash, checkpoint 6 was.
    crashed_at = fault.stat().st_mtime
    assert (run_folder / "checkpoint_000000004" / "meta.json").stat().st_mtime < crashed_at
    assert (run_folder / "checkpoint_000000006" / "meta.json").stat().st_mtime > crashed_at


def test_a_checkpoint_written_before_the_typed_record_resumes(zero2_reference, digits, tmp_path):
    """A run folder whose newest checkpoint holds what the code before the typed checkpoint record wrote
    (version-1 meta.json, a config without the newer keys) continues from it to the reference weights."""
    import json
    import shutil

    import yaml

    shutil.copytree(Path(zero2_reference["checkpoint"]).parent, tmp_path / "v1")
    shutil.rmtree(tmp_path / "v1" / "checkpoint_000000006")
    folder = tmp_path / "v1" / "checkpoint_000000004"
    # Ray Train's snapshot as an interrupted upload (or an older version of this code) left it: not read, removed
    (tmp_path / "v1" / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_results": [{"checkpoint_d')
    record = json.loads((folder / "meta.json").read_text())
    old = {"step": record["step"], "last_loss": record["last_loss"], "zero_stage": 2, "ema_partitioned": True,
           "mlflow_run_id": None, "tracking_uri": None, "world_size": 2}
    (folder / "meta.json").write_text(json.dumps(old, indent=1))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    del config["model"]["family"], config["eval"]["guided_channels"], config["checkpoint"]["hash_restored"]
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    listing = json.loads((folder / "ranks" / "rank_0.json").read_text())
    listing["files"].update({name: (folder / name).stat().st_size for name in ("meta.json", "config.yaml")})
    (folder / "ranks" / "rank_0.json").write_text(json.dumps(listing))
    result = run_training(digits, str(tmp_path), "v1", "train.zero_stage=2", "tracking.enabled=false")
    assert result["final_step"] == 6 and "restored" not in result
    assert (result["params_sha256"], result["ema_sha256"]) == (zero2_reference["params_sha256"],
                                                               zero2_reference["ema_sha256"])


def test_zero2_mlflow_one_run_after_restart(zero2_crash):
    """The restarted run logged into one MLflow run: metrics, params, tags, artifacts."""
    from mlflow.tracking import MlflowClient

    result, run_folder = zero2_crash
    uri = result["mlflow_tracking_uri"]
    assert uri == f"sqlite:///{run_folder}/mlflow.db"
    runs = runs_in_store(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == result["mlflow_run_id"] and run.info.status == "FINISHED"
    assert METRICS <= set(run.data.metrics)
    assert run.data.tags["zero_stage"] == "2" and run.data.tags["world_size"] == "2"
    assert run.data.tags["device"] == "cpu" and run.data.tags["git_commit"]
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["faults.crash_rank_at_step"] == "5"
    client = MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config", "samples"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == \
        ["samples/ema_step_0000006.png"]


def test_zero2_keeps_last_k_complete_checkpoints(zero2_reference):
    from arflow_scale.checkpoint import is_complete, latest_checkpoint

    run_url = zero2_reference["checkpoint"].rsplit("/", 1)[0]
    assert zero2_reference["checkpoint"] == latest_checkpoint(run_url)
    import pathlib

    kept = sorted(p.name for p in pathlib.Path(run_url).glob("checkpoint_0*"))
    assert kept == ["checkpoint_000000004", "checkpoint_000000006"]
    assert all(is_complete(f"{run_url}/{name}") for name in kept)


def continue_elsewhere(reference: dict, digits: str, tmp_path, *overrides: str) -> tuple[list[dict], str]:
    """Copy a finished 2-worker reference run (checkpoints 4, 6) and continue it on 1 worker to step 8, then on
    2 workers to step 10; each launch hashes the state it restored (`checkpoint.hash_restored`). The global batch
    stays 4 sequences x 2 workers. Returns the two results and the run folder. (The first step after a relaunch
    takes the learning rate the optimizer saved: 0 at the end of a cosine schedule.)"""
    import shutil

    source = Path(reference["checkpoint"]).parent
    shutil.copytree(source, tmp_path / "elastic")
    args = (digits, str(tmp_path), "elastic", "train.global_batch_size=8", "checkpoint.keep_last=4",
            "checkpoint.hash_restored=true", *overrides)
    results = [run_training(*args, f"train.steps={steps}", f"cluster.num_workers={workers}")
               for steps, workers in ((8, 1), (10, 2))]
    return results, str(tmp_path / "elastic")


def check_elastic_round_trip(reference: dict, results: list[dict], run_url: str) -> None:
    from mlflow.tracking import MlflowClient

    from arflow_scale.checkpoint import export_checkpoint, read_record

    on_one, on_two = results
    restored = [(r["restored"]["step"], r["restored"]["params_sha256"], r["restored"]["ema_sha256"]) for r in results]
    # 2 -> 1: the state one worker restored is the one two workers saved (= its export)
    exported = export_checkpoint(f"{run_url}/checkpoint_000000006", str(Path(run_url) / "six.safetensors"))
    assert restored[0] == (6, exported["params_sha256"], exported["ema_sha256"])
    assert restored[0][1:] == (reference["params_sha256"], reference["ema_sha256"])
    # 1 -> 2: the state two workers restored is the one one worker saved at step 8
    exported = export_checkpoint(f"{run_url}/checkpoint_000000008", str(Path(run_url) / "eight.safetensors"))
    assert restored[1] == (8, exported["params_sha256"], exported["ema_sha256"])
    assert restored[1][1:] == (on_one["params_sha256"], on_one["ema_sha256"])
    assert reference["params_sha256"] != on_one["params_sha256"] != on_two["params_sha256"]
    assert [r["final_step"] for r in results] == [8, 10]
    assert all(math.isfinite(r["final_loss"]) for r in results)
    # the engine ran the plan of its world size: 4 sequences x 2 micro-steps on one worker, x 1 on two
    eight, ten = read_record(f"{run_url}/checkpoint_000000008"), read_record(f"{run_url}/checkpoint_000000010")
    assert (eight.world_size, eight.micro_batch_size, eight.grad_accum, eight.global_batch_size) == (1, 4, 2, 8)
    assert (ten.world_size, ten.micro_batch_size, ten.grad_accum, ten.global_batch_size) == (2, 4, 1, 8)
    # one MLflow run; every step logged once, with the world size that trained it
    client = MlflowClient(on_two["mlflow_tracking_uri"])
    steps = {m.step: m.value for m in client.get_metric_history(on_two["mlflow_run_id"], "world_size")}
    assert steps == {**dict.fromkeys(range(1, 7), 2.0), 7: 1.0, 8: 1.0, 9: 2.0, 10: 2.0}
    assert sorted(loss_history(on_two["mlflow_tracking_uri"], on_two["mlflow_run_id"])) == list(range(1, 11))


def test_zero2_continues_on_one_worker_and_back_on_two(zero2_reference, digits, tmp_path, caplog):
    """ZeRO-2 through DeepSpeed's universal checkpoint. The finished 6-step cosine continued to 8 steps is warned
    of: its schedule's factor after step 6 was 0 and is now that of a cosine over 8 steps."""
    with caplog.at_level("WARNING", logger="arflow_scale.train.launch_plan"):
        results, run_url = continue_elsewhere(zero2_reference, digits, tmp_path, "train.zero_stage=2")
    check_elastic_round_trip(zero2_reference, results, run_url)
    assert "continues from step 6 under other schedule settings (train.steps 6 -> 8, optim.schedule cosine)" \
        in caplog.text
