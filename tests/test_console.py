"""What a user watching `arflow train` sees: one progress line per log interval, one line per checkpoint and per
validation, and none of Ray's or the libraries' own output unless -v."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from arflow_scale.train.console import StepProgress, format_seconds, progress_line

from conftest import REPO


def test_progress_line_and_eta_format():
    line = progress_line(StepProgress(step=120, total=1200, loss=0.41234, loss_name="loss", lr=2e-3,
                                      images_per_s=1234.4, data_wait_fraction=0.031, eta_seconds=80))
    assert line == "step 120/1200  loss 0.4123  lr 2.00e-03  1234 img/s  data 3%  eta 1m20s"
    with_mfu = StepProgress(step=1, total=2, loss=1.0, loss_name="bits_per_dim", lr=1e-4, images_per_s=9.6,
                            data_wait_fraction=0.0, eta_seconds=7300, mfu=0.4512)
    assert progress_line(with_mfu).endswith("bits_per_dim 1.0000  lr 1.00e-04  10 img/s  data 0%  mfu 45.1%  eta 2h01m")
    assert format_seconds(59.6) == "1m00s" and format_seconds(-3) == "0m00s"


def test_console_prints_to_the_stderr_it_finds_when_made(ray_local, monkeypatch):
    """Not to the stderr of the first import (a closed capture once a test or caller replaced it)."""
    import io

    from arflow_scale.train.console import Console, Notice

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    console = Console()
    console.show(Notice("checkpoint somewhere"))
    console.close()
    assert sys.stderr.getvalue() == "checkpoint somewhere\n"


NOISE = ("TrainingReport", "Checkpoint successfully created", "FutureWarning", "TrainController", "RayTrainWorker",
         "Started a local Ray instance", "system metrics")


@pytest.mark.slow
def test_train_console_is_progress_lines_without_library_noise(tmp_path):
    short = tempfile.mkdtemp(prefix="ar", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "ARFLOW_RAY_TMP": short}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-m", "arflow_scale.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
            "train.steps=4", "train.log_every=2", "checkpoint.every=2", "train.sample_every=0",
            "data.batch_size=2", f"run.storage_path={tmp_path}/runs", f"data.manifest={tmp_path}/digits",
            "run.prepare_val_per_class=5", "eval.val_every=2", "eval.val_sequences=8",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["final_step"] == 4 and result["val_loss"] > 0 and result["val_loss_ema"] > 0
    lines = proc.stderr.strip().splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"], proc.stderr
    assert all("loss" in line and "img/s" in line and "eta" in line for line in progress)
    assert sum(line.startswith("checkpoint ") for line in lines) == 2
    validations = [line for line in lines if line.startswith("validation at step ")]
    assert [line.split()[3] for line in validations] == ["2:", "4:"] and "val_loss_ema" in validations[-1]
    noisy = [line for line in lines if any(word in line for word in NOISE)]
    assert not noisy, "\n".join(noisy)
