"""`arflow demo` as a user runs it, in its own process on its own local Ray (2 CPU workers, shards written on
first use), with FID at two checkpoints, validation and ZeRO-1 with gradient accumulation: what it prints, what it
logs and leaves, then `arflow export` and `arflow sample` on its run. One launch serves all of these."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from arflow_scale.cli import main

pytestmark = pytest.mark.slow
# What a user watching the run must not see without -v: Ray's and the libraries' own output.
NOISE = ("TrainingReport", "Checkpoint successfully created", "FutureWarning", "TrainController", "RayTrainWorker",
         "Started a local Ray instance", "system metrics")
DEMO_OVERRIDES = [
    "train.steps=4", "train.log_every=2", "checkpoint.every=2", "checkpoint.keep_last=2", "train.sample_every=0",
    "train.sample_steps=2", "train.zero_stage=1", "data.batch_size=2", "train.grad_accum=2",
    "run.prepare_val_per_class=5", "eval.val_every=2", "eval.val_sequences=8",
    "eval.fid_every=2", "eval.steps=2", "eval.tasks=2", "eval.sample_batch_size=8", "eval.feature_batch_size=8",
    "tracking.system_metrics=false"]


def last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, list[str], list[str]]:
    """`arflow demo --fid-samples 8` with DEMO_OVERRIDES: its folder, result JSON, stdout and stderr lines."""
    out = tmp_path_factory.mktemp("demo")
    short = tempfile.mkdtemp(prefix="ar", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "ARFLOW_RAY_TMP": short}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-m", "arflow_scale.cli", "demo", "--out", str(out), "--name", "d", "--fid-samples", "8",
            *DEMO_OVERRIDES]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout.strip().splitlines()
    return out, json.loads(stdout[-1]), stdout, proc.stderr.strip().splitlines()


def test_demo_prints_progress_checkpoints_validation_fid_and_the_store_without_library_noise(demo):
    out, result, stdout, stderr = demo
    assert result["final_step"] == 4 and result["val_loss"] > 0 and result["val_loss_ema"] > 0
    progress = [line for line in stderr if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"], stderr
    assert all("loss" in line and "img/s" in line and "eta" in line for line in progress)
    assert progress[0].endswith("workers 2") and "workers" not in progress[1]  # shown when it changes
    assert sum(line.startswith("checkpoint ") for line in stderr) == 2
    validations = [line for line in stderr if line.startswith("validation at step ")]
    assert [line.split()[3] for line in validations] == ["2:", "4:"] and "val_loss_ema" in validations[-1]
    noisy = [line for line in stderr if any(word in line for word in NOISE)]
    assert not noisy, "\n".join(noisy)
    assert [line.split(":")[0] for line in stdout if line.startswith("FID at step ")] == \
        ["FID at step 2", "FID at step 4"] and all("8 samples" in line for line in stdout if line.startswith("FID"))
    assert (out / "d" / "samples.png").is_file() and (out / "data" / "digits" / "manifest.json").is_file()
    assert result["mlflow_tracking_uri"] == f"sqlite:///{out}/mlflow.db"
    assert any(f"mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db" in line for line in stdout)


def test_fid_every_lands_in_the_result_and_mlflow_at_each_fid_checkpoint(demo):
    """eval.fid_every: the driver evaluated the checkpoints at steps 2 and 4 while and after training."""
    from mlflow.tracking import MlflowClient

    result = demo[1]
    assert sorted(result["fid"]) == ["2", "4"]
    assert all(math.isfinite(entry["fid"]) and entry["n"] == 8 for entry in result["fid"].values())
    history = MlflowClient(result["mlflow_tracking_uri"]).get_metric_history(result["mlflow_run_id"], "fid")
    assert {m.step: m.value for m in history} == {int(s): e["fid"] for s, e in result["fid"].items()}


def test_export_and_sample_the_demo_run(demo, capsys):
    import numpy as np
    from PIL import Image

    from arflow_scale.checkpoint import load_exported, read_record, state_dict_sha256

    out, result, _, _ = demo
    assert result["checkpoint"] == f"{out}/d/checkpoint_000000004"
    record = read_record(result["checkpoint"])  # ZeRO-1, 2 sequences x 2 micro-steps per worker
    assert (record.zero_stage, record.micro_batch_size, record.grad_accum, record.world_size) == (1, 2, 2, 2)
    exported = out / "model.safetensors"
    assert main(["export", "--checkpoint", f"{out}/d", "--out", str(exported)]) == 0
    info = last_json(capsys)
    assert info["params_sha256"] == result["params_sha256"] and info["ema_sha256"] == result["ema_sha256"]
    cfg, ema, raw = load_exported(str(exported))
    assert cfg.model.in_channels == 1 and state_dict_sha256(ema) == result["ema_sha256"]

    grid = out / "grid.png"
    assert main(["sample", "--checkpoint", str(exported), "--labels", "0,1,2", "--out", str(grid),
                 "--steps", "3", "--seed", "1"]) == 0
    image = np.asarray(Image.open(grid))
    assert image.shape[1] > image.shape[0] > 0 and image.std() > 0
    assert main(["sample", "--checkpoint", result["checkpoint"], "--labels", "0,11", "--out",
                 str(grid)]) == 2  # label outside num_classes: a clear error, exit code 2
    assert "outside 0..9" in capsys.readouterr().err
