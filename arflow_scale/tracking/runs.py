"""One MLflow run per training run, created by the driver and found again on every relaunch.

The run id lives in `<run folder>/mlflow_run.json` (written when the run is created) and in every
checkpoint's record; a restarted or relaunched training resumes that run. Params are the flattened
resolved config with secrets masked; tags: git commit, world size, ZeRO stage, device; the resolved YAML
is an artifact.
"""
from __future__ import annotations

import json
import logging
from typing import NamedTuple, Optional

from arflow_scale.checkpoint import CheckpointRecord
from arflow_scale.config import Config, dump_yaml, flatten
from arflow_scale.data.storage import filesystem

from .store import experiment_id, git_commit, recordable_uri, resolve_tracking_uri

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
PARAM_CHARS = 6000  # MLflow's limit of one param value


class TrackingTarget(NamedTuple):
    """Where a training run logs: the MLflow store and its run id (both None when tracking is off)."""

    uri: Optional[str]
    run_id: Optional[str]


def read_run_id(run_url: str, storage_options: Optional[dict] = None,
                latest: Optional[CheckpointRecord] = None) -> Optional[str]:
    """The MLflow run id of a run folder: from its latest checkpoint's record when there is one, else from
    the run-id file the driver wrote when it created the run."""
    if latest is not None and latest.mlflow_run_id:
        return latest.mlflow_run_id
    fs, path = filesystem(f"{run_url.rstrip('/')}/{RUN_ID_FILE}", storage_options)
    if fs.exists(path):
        with fs.open(path, "r") as f:
            return json.load(f).get("run_id")
    return None


def prepare_run(cfg: Config, run_url: str, *, world_size: int | str, device: str,
                storage_options: Optional[dict] = None, latest: Optional[CheckpointRecord] = None,
                extra_params: Optional[dict[str, str]] = None) -> TrackingTarget:
    """Driver side: create (or find again) this training run's MLflow run. `latest` is the record of the run
    folder's newest complete checkpoint, when the caller has read it; `extra_params` are logged beside the
    config's (what the driver found out, e.g. the classes trained)."""
    if not cfg.tracking.enabled:
        return TrackingTarget(None, None)
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg.tracking.uri, run_url, cfg.run.name)
    client = MlflowClient(tracking_uri=uri)
    run_id = read_run_id(run_url, storage_options, latest)
    if run_id is not None:
        try:
            client.get_run(run_id)
            log.info("resuming MLflow run %s at %s", run_id, recordable_uri(uri))
            return TrackingTarget(uri, run_id)
        except Exception:  # noqa: BLE001 - a run id from another store: start a new run
            log.warning("MLflow run %s not found at %s; creating a new run", run_id, recordable_uri(uri))
    tags = {"git_commit": git_commit(), "world_size": str(world_size),
            "zero_stage": str(cfg.train.zero_stage), "device": device, "run_url": run_url}
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    run_id = client.create_run(experiment_id(client, cfg.tracking.experiment), run_name=cfg.run.name,
                               tags=tags).info.run_id
    flat = {**flatten(cfg), **(extra_params or {})}
    params = [Param(k, ("" if v is None else str(v))[:PARAM_CHARS]) for k, v in flat.items()]
    for start in range(0, len(params), PARAM_BATCH):
        client.log_batch(run_id, params=params[start:start + PARAM_BATCH])
    client.log_text(run_id, dump_yaml(cfg, mask_secrets=True), "config/resolved.yaml")
    fs, path = filesystem(f"{run_url.rstrip('/')}/{RUN_ID_FILE}", storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump({"run_id": run_id, "tracking_uri": recordable_uri(uri)}, f)
    log.info("created MLflow run %s at %s", run_id, recordable_uri(uri))
    return TrackingTarget(uri, run_id)


def set_run_status(target: TrackingTarget, status: str) -> None:
    """Mark the run FINISHED / FAILED from the driver; a tracking error is logged, never raised (it must not
    hide the error that ended the training)."""
    if not (target.uri and target.run_id):
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(target.uri).set_terminated(target.run_id, status=status)
    except Exception as err:  # noqa: BLE001
        log.warning("could not mark MLflow run %s %s: %s", target.run_id, status, err)
