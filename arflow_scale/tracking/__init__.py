"""MLflow: which store, one run per training run (created by the driver), rank 0's tracker."""
from .runs import RUN_ID_FILE, TrackingTarget, prepare_run, read_run_id, set_run_status
from .store import experiment_id, git_commit, recordable_uri, resolve_tracking_uri, usable_uri
from .tracker import Tracker

__all__ = ["RUN_ID_FILE", "TrackingTarget", "Tracker", "experiment_id", "git_commit", "prepare_run",
           "read_run_id", "recordable_uri", "resolve_tracking_uri", "set_run_status", "usable_uri"]
