"""Sweep state: sweep.json (the MLflow parent run), per-point result JSON, the tracking store.

Files are read and written through fsspec, so a sweep folder can live on s3:// like run folders.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from arflow_scale.config import flatten
from arflow_scale.data.storage import filesystem, is_local_url
from arflow_scale.schema import mask_override
from arflow_scale.tracking import experiment_id
from arflow_scale.tracking import resolve_tracking_uri as tracking_uri_of_run
from arflow_scale.train.result import TrainingStopped

log = logging.getLogger(__name__)


def read_json(url: str, storage_options: dict) -> Optional[dict]:
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def write_json(url: str, data: dict, storage_options: dict) -> None:
    """Write JSON so a reader never sees half a file (local: temp + rename; object stores: one PUT)."""
    fs, path = filesystem(url, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    text = json.dumps(data, indent=2, default=str)
    if not is_local_url(url):
        fs.pipe_file(path, text.encode())
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def absolute_url(url: str) -> str:
    """Local paths become absolute (points may run in other processes); URLs stay."""
    return url if "://" in url else str(Path(url).resolve())


def sweep_url(sweep) -> str:
    """The sweep's folder: `<storage_path>/<name>` (sweep.json, points/, runs/, report/)."""
    return f"{absolute_url(sweep.storage_path).rstrip('/')}/{sweep.name}"


def resolve_tracking_uri(sweep) -> str:
    """Sweep setting, else MLFLOW_TRACKING_URI, else sqlite in the (local) sweep folder."""
    return tracking_uri_of_run(sweep.tracking_uri, sweep_url(sweep), f"sweeps/{sweep.name}")


def ended_status(err: BaseException) -> str:
    """The MLflow status of a parent run that `err` ended: KILLED when a user stopped it (Ctrl-C, SIGTERM)."""
    return "KILLED" if isinstance(err, (TrainingStopped, KeyboardInterrupt)) else "FAILED"


def ensure_parent_run(sweep, tracking_uri: str, *, state_name: str = "sweep.json", kind: str = "sweep") -> str:
    """The sweep's MLflow parent run: found again through `state_name` (sweep.json), else created (params = the
    sweep YAML, tag `arflow.<kind>`). Comparisons keep theirs in compare.json."""
    client = MlflowClient(tracking_uri=tracking_uri)
    state_url = f"{sweep_url(sweep)}/{state_name}"
    state = read_json(state_url, sweep.storage_options) or {}
    if state.get("parent_run_id"):
        try:
            run = client.get_run(state["parent_run_id"])
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        except Exception:  # noqa: BLE001 - recorded in another tracking store: start a new parent
            log.warning("parent run %s not found at %s; creating a new one", state["parent_run_id"], tracking_uri)
    run = client.create_run(experiment_id(client, sweep.experiment), run_name=sweep.name,
                            tags={f"arflow.{kind}": sweep.name})
    params = flatten(dataclasses.replace(sweep, overrides=masked_overrides(sweep.overrides)))
    client.log_batch(run.info.run_id,
                     params=[Param(k, ("" if v is None else str(v))[:6000]) for k, v in params.items()])
    write_json(state_url, {"name": sweep.name, "parent_run_id": run.info.run_id, "tracking_uri": tracking_uri,
                            "experiment": sweep.experiment}, sweep.storage_options)
    return run.info.run_id


def masked_overrides(overrides: list[str]) -> list[str]:
    """`a.secret=x` -> `a.secret=***` for every secret-looking key (before logging as params)."""
    return [mask_override(text) for text in overrides]
