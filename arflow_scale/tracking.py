"""MLflow tracking: one MLflow run per training run, created by the driver, logged to by rank 0 only.

- Tracking URI: `tracking.uri`, else env MLFLOW_TRACKING_URI, else an embedded sqlite store inside the
  run folder (`<run folder>/mlflow.db`, artifacts in `<run folder>/mlartifacts`); for a remote run
  folder (s3://...) the embedded store lives in the local `runs/<name>/` instead.
- One run per training run, across restarts: the run id is stored in `<run folder>/mlflow_run.json`
  when the driver creates the run and in every checkpoint; a restarted or re-launched training
  resumes that run with `mlflow.start_run(run_id=...)`.
- Params: the flattened resolved config with secrets masked; tags: git commit, world size, ZeRO
  stage, device; the resolved YAML as an artifact. Rank 0 logs metrics, system metrics, sample grids.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"


def resolve_tracking_uri(uri: str | None, run_url: str, run_name: str) -> str:
    """Config URI, else MLFLOW_TRACKING_URI, else sqlite in the (local) run folder."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from arflow_scale.data.storage import is_local_url, local_path

    folder = local_path(run_url) if is_local_url(run_url) else Path("runs", run_name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def git_commit() -> str:
    """HEAD of the source checkout, or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def read_run_id(run_url: str, storage_options: dict | None = None) -> str | None:
    """The MLflow run id recorded in the run folder (or its latest checkpoint), if any."""
    from arflow_scale.data.storage import filesystem
    from arflow_scale.train.checkpoint import latest_checkpoint, read_meta

    latest = latest_checkpoint(run_url, storage_options)
    if latest is not None:
        run_id = read_meta(latest, storage_options)[0].get("mlflow_run_id")
        if run_id:
            return run_id
    fs, path = filesystem(f"{run_url.rstrip('/')}/{RUN_ID_FILE}", storage_options)
    if fs.exists(path):
        with fs.open(path, "r") as f:
            return json.load(f).get("run_id")
    return None


def prepare_run(cfg, run_url: str, *, world_size: int, device: str,
                storage_options: dict | None = None) -> tuple[str | None, str | None]:
    """Driver side: create (or find again) this training run's MLflow run -> (tracking_uri, run_id)."""
    if not cfg.tracking.enabled:
        return None, None
    from mlflow.tracking import MlflowClient

    from arflow_scale.config import dump_yaml, flatten
    from arflow_scale.data.storage import filesystem

    uri = resolve_tracking_uri(cfg.tracking.uri, run_url, cfg.run.name)
    client = MlflowClient(tracking_uri=uri)
    run_id = read_run_id(run_url, storage_options)
    if run_id is not None:
        try:
            client.get_run(run_id)
            log.info("resuming MLflow run %s at %s", run_id, uri)
            return uri, run_id
        except Exception:  # noqa: BLE001 - a run id from another store: start a new run
            log.warning("MLflow run %s not found at %s; creating a new run", run_id, uri)
    experiment_id = _experiment_id(client, cfg.tracking.experiment, uri)
    tags = {"git_commit": git_commit(), "world_size": str(world_size),
            "zero_stage": str(cfg.train.zero_stage), "device": device, "run_url": run_url}
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    run = client.create_run(experiment_id, run_name=cfg.run.name, tags=tags)
    run_id = run.info.run_id
    params = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(cfg).items()}
    items = list(params.items())
    from mlflow.entities import Param

    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])
    client.log_text(run_id, dump_yaml(cfg, mask_secrets=True), "config/resolved.yaml")
    fs, path = filesystem(f"{run_url.rstrip('/')}/{RUN_ID_FILE}", storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump({"run_id": run_id, "tracking_uri": uri}, f)
    log.info("created MLflow run %s at %s", run_id, uri)
    return uri, run_id


class Tracker:
    """Rank 0's handle on the run: metrics, images, system metrics. No-op when uri/run_id is None."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, system_metrics: bool = True):
        self.active = bool(tracking_uri and run_id)
        if not self.active:
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_image(self, image, artifact_file: str) -> None:
        """image: uint8 array (H, W, C) or PIL image."""
        if self.active:
            self.mlflow.log_image(image, artifact_file=artifact_file)

    def close(self, status: str = "FINISHED") -> None:
        if self.active:
            self.mlflow.end_run(status=status)
            self.active = False
