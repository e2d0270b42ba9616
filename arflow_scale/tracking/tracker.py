"""Rank 0's handle on its MLflow run: metrics, images, system metrics. The other ranks hold an inactive one,
which never imports MLflow (about a second of CPU in every worker process)."""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

# MLflow's system-metrics monitor announces itself at INFO on every start; keep the console clean.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


class Tracker:
    """Logs to one MLflow run; a no-op when `tracking_uri` or `run_id` is None (tracking off, rank > 0)."""

    def __init__(self, tracking_uri: Optional[str], run_id: Optional[str], system_metrics: bool = True):
        self.active = bool(tracking_uri and run_id)
        self.run_id = run_id
        if self.active:
            import mlflow

            self.mlflow = mlflow
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)

    def last_step(self, key: str) -> int:
        """The highest step at which metric `key` was logged to the run (0: never, or tracking off)."""
        if not self.active:
            return 0
        history = self.mlflow.tracking.MlflowClient().get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """image: uint8 array (H, W, C)."""
        if self.active:
            self.mlflow.log_image(image, artifact_file=artifact_file)

    def close(self, status: str = "FINISHED") -> None:
        if self.active:
            self.mlflow.end_run(status=status)
            self.active = False
