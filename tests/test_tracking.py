"""MLflow tracking against a real sqlite store: one run per training run, masked params, tags, metrics."""
from __future__ import annotations

import numpy as np
import pytest

from arflow_scale.config import config_from_dict


@pytest.fixture(autouse=True)
def isolated_tracking_uri(monkeypatch):
    """mlflow.set_tracking_uri (inside Tracker) exports MLFLOW_TRACKING_URI; undo it after each test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    from arflow_scale.tracking import resolve_tracking_uri

    assert resolve_tracking_uri("http://127.0.0.1:5000", str(tmp_path / "r"), "r") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(None, str(tmp_path / "r"), "r") == f"sqlite:///{tmp_path}/r/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, "s3://bucket/runs/x", "x") == f"sqlite:///{tmp_path}/runs/x/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert resolve_tracking_uri(None, str(tmp_path / "r"), "r") == "sqlite:///elsewhere.db"


def test_prepare_run_once_masked_params_and_tracker(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from arflow_scale.tracking import Tracker, prepare_run

    cfg = config_from_dict({}, ["run.name=t", "run.storage_options={secret: hunter2, endpoint_url: http://x}",
                                "train.zero_stage=3", "tracking.parent_run_id=abc123"])
    run_url = str(tmp_path / "t")
    uri, run_id = prepare_run(cfg, run_url, world_size=4, device="cpu")
    again_uri, again_id = prepare_run(cfg, run_url, world_size=4, device="cpu")
    assert (again_uri, again_id) == (uri, run_id)  # a relaunch finds the same run
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.data.params["run.storage_options.secret"] == "***"
    assert run.data.params["run.storage_options.endpoint_url"] == "http://x"
    assert run.data.tags["world_size"] == "4" and run.data.tags["zero_stage"] == "3"
    assert run.data.tags["device"] == "cpu" and run.data.tags["git_commit"]
    assert run.data.tags["mlflow.parentRunId"] == "abc123"
    config_text = client.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path / "dl"))
    text = open(config_text).read()
    assert "hunter2" not in text and "zero_stage: 3" in text

    tracker = Tracker(uri, run_id, system_metrics=False)
    assert tracker.last_step("loss") == 0
    tracker.log_metrics({"loss": 0.5, "lr": 1e-4}, step=3)
    tracker.log_metrics({"lr": 1e-4}, step=5)
    assert (tracker.last_step("loss"), tracker.last_step("lr")) == (3, 5)  # where a restarted run resumes logging
    tracker.log_image(np.zeros((4, 4, 3), dtype=np.uint8), "samples/x.png")
    tracker.close()
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/x.png"]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_tracking_disabled_and_inactive_tracker(tmp_path):
    from arflow_scale.tracking import Tracker, prepare_run

    cfg = config_from_dict({}, ["tracking.enabled=false"])
    assert prepare_run(cfg, str(tmp_path), world_size=1, device="cpu") == (None, None)
    tracker = Tracker(None, None)
    tracker.log_metrics({"loss": 1.0}, step=1)  # rank > 0 / disabled: nothing happens
    assert not tracker.active and tracker.last_step("loss") == 0


@pytest.mark.parametrize("bad", ["tracking.enabled=maybe", "run.name=a/b"])
def test_bad_tracking_or_run_config_names_key(bad):
    from arflow_scale.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[-1]):
        config_from_dict({}, [bad])
