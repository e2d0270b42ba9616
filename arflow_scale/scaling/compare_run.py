"""Running a comparison: the reference statistics, every arm's training (nested MLflow runs under one parent,
resumable like sweep points), every FID evaluation, then the report. A rerun skips finished arms and
evaluations and resumes an interrupted arm from its latest checkpoint.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from mlflow.tracking import MlflowClient

from arflow_scale.data.storage import is_local_url
from arflow_scale.tracking import resolve_tracking_uri
from arflow_scale.train.launch_plan import prepare_inputs

from .compare import Arm, compare_url, masked_compare, plan_arms
from .compare_design import CompareConfig
from .compare_eval import ensure_reference, pending, run_evaluations
from .compare_report import collect_rows, write_compare_report
from .finished import finished_points
from .state import ended_status, ensure_parent_run
from .sweep import points_session, run_points

log = logging.getLogger(__name__)


def _trained_arms(arms: list[Arm], compare: CompareConfig, root: str) -> tuple[dict[str, dict], list[Arm]]:
    """-> (the result records of arms already trained, by arm name; the arms left to train). Records live where
    sweeps keep theirs: `<root>/points/<run name>.json`."""
    by_point, _ = finished_points([arm.point for arm in arms], root, compare.storage_options,
                                  f"comparison {compare.name}")
    records = {arm.name: by_point[arm.point.name] for arm in arms if arm.point.name in by_point}
    todo = [arm for arm in arms if arm.point.name not in by_point]
    log.info("comparison %s: %d arms, %d trained, %d to train", compare.name, len(arms), len(records), len(todo))
    return records, todo


def _train_arms(todo: list[Arm], root: str, parallel: int, kwargs: dict[str, Any]) -> dict[str, dict]:
    """Train every arm of `todo` (in this process, or as Ray tasks); -> records by arm name."""
    by_run = run_points([arm.point for arm in todo], parallel, root, kwargs)
    return {arm.name: by_run[arm.point.name] for arm in todo}


def _log_pooled_fids(rows, evaluated: list[dict], run_ids: dict[str, Optional[str]], tracking_uri: str) -> None:
    """`fid` (seeds pooled) on each arm's run at the steps whose last seed was evaluated now."""
    touched = {(r["arm"], r["step"]) for r in evaluated}
    client = MlflowClient(tracking_uri=tracking_uri)
    for row in rows:
        if (row.arm, row.step) in touched and row.fid is not None and run_ids.get(row.arm):
            client.log_metric(run_ids[row.arm], "fid", row.fid, step=row.step)


def report_folder(compare: CompareConfig) -> Path:
    """`<comparison>/report` for a local comparison, else `runs/compare/<name>/report` here."""
    root = compare_url(compare)
    return Path(root, "report") if is_local_url(root) else Path("runs", "compare", compare.name, "report")


def run_compare(compare: CompareConfig, folder: Path = Path("."), *, parallel: Optional[int] = None) -> dict:
    """Run what is unfinished; -> {"comparison", "parent_run_id", "tracking_uri", "trained", "skipped",
    "evaluated", "report_dir", "table", "rows"}."""
    arms = plan_arms(compare, folder)
    root = compare_url(compare)
    tracking_uri = resolve_tracking_uri(compare.tracking_uri, root, f"compare/{compare.name}")
    parent_run_id = ensure_parent_run(masked_compare(compare), tracking_uri, state_name="compare.json",
                                      kind="compare")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        prepare_inputs(arms[0].config)  # the shards an arm would write (run.prepare_data): once, here
        ensure_reference(compare, arms[0])
        kwargs = {"tracking_uri": tracking_uri, "parent_run_id": parent_run_id,
                  "storage_options": dict(compare.storage_options)}
        records, todo = _trained_arms(arms, compare, root)
        to_evaluate = pending(arms, compare, root)  # evaluation records only: training does not change it
        needs_ray = bool(todo or to_evaluate)
        with points_session([arm.point for arm in arms] if needs_ray else [], dashboard=bool(todo)):
            records.update(_train_arms(todo, root, compare.parallel if parallel is None else parallel, kwargs))
            run_ids = {name: record.get("run_id") for name, record in records.items()}
            evaluated = run_evaluations(to_evaluate, arms, compare, root, run_ids, tracking_uri)
        rows = collect_rows(arms, compare, root, run_ids, tracking_uri)
        _log_pooled_fids(rows, evaluated, run_ids, tracking_uri)
        report = write_compare_report(rows, arms, compare, report_folder(compare), parent_run_id=parent_run_id,
                                      tracking_uri=tracking_uri)
    except BaseException as err:
        client.set_terminated(parent_run_id, status=ended_status(err))
        raise
    client.set_terminated(parent_run_id, status="FINISHED")
    return {"comparison": compare.name, "parent_run_id": parent_run_id, "tracking_uri": tracking_uri,
            "experiment": compare.experiment, "trained": [arm.name for arm in todo],
            "skipped": [arm.name for arm in arms if arm not in todo],
            "evaluated": [f"{r['arm']}@{r['step']}/seed{r['seed']}" for r in evaluated],
            "report_dir": report["out_dir"], "table": report["table"], "rows": report["rows"]}
