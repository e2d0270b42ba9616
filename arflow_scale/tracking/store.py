"""Which MLflow store a run logs to, and its experiments (the one place that looks them up or creates them)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from arflow_scale.data.storage import is_local_url, local_path
from arflow_scale.schema import MASK, mask_value

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def resolve_tracking_uri(uri: Optional[str], run_url: str, run_name: str, create: bool = True) -> str:
    """Config URI, else MLFLOW_TRACKING_URI, else sqlite in the (local) run folder; for a remote run folder
    the embedded store lives in the local `runs/<name>/`, a folder made here unless `create` is False."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = local_path(run_url) if is_local_url(run_url) else Path("runs", run_name).resolve()
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def recordable_uri(uri: Optional[str]) -> Optional[str]:
    """A tracking URI as it may be written into checkpoints and run folders: its password masked."""
    return mask_value("uri", uri) if uri else uri


def usable_uri(recorded: Optional[str]) -> Optional[str]:
    """A recorded tracking URI, or None when its password was masked (the environment must supply it)."""
    return None if not recorded or MASK in recorded else recorded


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created when missing (artifacts beside a sqlite store's file)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def git_commit() -> str:
    """HEAD of the source checkout, or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
