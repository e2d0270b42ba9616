"""Scaling points: one finished training run each, read from a CSV, a sweep's point records or MLflow.

A point carries its size N (params), training compute C (flops), held-out loss, and where known the
training tokens D and images it saw, its FLOP budget (IsoFLOP sweeps), its FID and its setting: the run
configuration it repeats under another training seed (points of one setting are averaged by the fits).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

# Metric names the sweep logs on every point's MLflow run (read back by `points_from_mlflow`).
METRIC_PARAMS = "scaling/params"
METRIC_FLOPS = "scaling/flops"
METRIC_LOSS = "scaling/loss"
METRIC_TOKENS = "scaling/tokens"
METRIC_IMAGES = "scaling/images"
METRIC_BUDGET = "scaling/budget"
METRIC_FID = "fid"
TAG_SETTING = "arflow.sweep_setting"  # the tag naming a sweep point's setting (its name without the seed)
CSV_REQUIRED = ("params", "flops", "loss")
CSV_OPTIONAL = ("tokens", "images", "budget", "fid")
CSV_TEXT = ("name", "run_id", "setting")  # text columns, each optional
CSV_HEADER = ("name", *CSV_REQUIRED, *CSV_OPTIONAL, "run_id", "setting")


@dataclass
class ScalingPoint:
    """One finished training run: N params, C training FLOPs, its loss; D tokens, images, budget, FID if known."""

    params: float
    flops: float
    loss: float
    fid: Optional[float] = None
    name: str = ""
    run_id: str = ""
    tokens: Optional[float] = None  # training tokens seen: sequences x K x tokens per image
    images: Optional[float] = None  # training images seen: sequences x K
    budget: Optional[float] = None  # the IsoFLOP budget the point was planned for (its flops round to it)
    setting: str = ""  # points sharing a non-empty setting are seeds of one configuration (averaged by the fits)
    seeds: int = 1  # runs whose mean this point is (analysis.mean_of_seeds)
    loss_std: Optional[float] = None  # the sample standard deviation of their losses, when seeds > 1


def _parse_number(text: Optional[str], where: str, column: str, optional: bool = False) -> Optional[float]:
    """A finite, positive number from a CSV cell; an error names the file, line and column."""
    text = (text or "").strip()
    if not text:
        if optional:
            return None
        raise ValueError(f"{where}: column {column!r} is empty")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: column {column!r} has {text!r}, not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: column {column!r} has {text!r}; it must be finite and > 0")
    return value


def points_from_csv(path: str | Path) -> list[ScalingPoint]:
    """Read a CSV with a header row: params, flops, loss; optionally tokens, images, budget, fid, name, run_id and
    setting (rows of one setting are seeds of one configuration)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: points CSV not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        points = []
        for row in reader:
            row = {(k or "").strip(): v for k, v in row.items()}
            where = f"{path}:{reader.line_num}"
            required = {c: _parse_number(row[c], where, c) for c in CSV_REQUIRED}
            optional = {c: _parse_number(row.get(c), where, c, optional=True) for c in CSV_OPTIONAL}
            text = {c: (row.get(c) or "").strip() for c in CSV_TEXT}
            points.append(ScalingPoint(**required, **optional, **text))
    if not points:
        raise ValueError(f"{path}: no data rows")
    return points


def write_points_csv(points: Iterable[ScalingPoint], path: str | Path) -> Path:
    """Write points with the columns of CSV_HEADER (empty cells for unknown optional values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def cell(value: Optional[float]) -> str:
        return "" if value is None else repr(float(value))

    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        for p in points:
            writer.writerow([p.name, *(cell(getattr(p, c)) for c in (*CSV_REQUIRED, *CSV_OPTIONAL)), p.run_id,
                             p.setting])
    return path


def point_from_record(record: dict) -> ScalingPoint:
    """A sweep's point record (points/<name>.json, see sweep.run_point) as a ScalingPoint."""
    def optional(key: str) -> Optional[float]:
        value = record.get(key)
        return None if value is None else float(value)

    return ScalingPoint(params=float(record["params"]), flops=float(record["flops"]), loss=float(record["loss"]),
                        fid=optional("fid"), name=record.get("name", ""), run_id=record.get("run_id") or "",
                        tokens=optional("tokens"), images=optional("images"), budget=optional("budget"),
                        setting=record.get("setting") or "")


def _point_from_run(run) -> Optional[ScalingPoint]:
    metrics = run.data.metrics
    if not all(k in metrics for k in (METRIC_PARAMS, METRIC_FLOPS, METRIC_LOSS)):
        return None
    return ScalingPoint(params=metrics[METRIC_PARAMS], flops=metrics[METRIC_FLOPS],
                        loss=metrics[METRIC_LOSS], fid=metrics.get(METRIC_FID),
                        name=run.info.run_name or "", run_id=run.info.run_id,
                        tokens=metrics.get(METRIC_TOKENS), images=metrics.get(METRIC_IMAGES),
                        budget=metrics.get(METRIC_BUDGET), setting=run.data.tags.get(TAG_SETTING, ""))


def points_from_mlflow(*, experiment: Optional[str] = None, parent_run_id: Optional[str] = None,
                       tracking_uri: Optional[str] = None) -> list[ScalingPoint]:
    """Finished runs carrying the `scaling/*` metrics, from an experiment or under a parent run."""
    from mlflow.tracking import MlflowClient

    if (experiment is None) == (parent_run_id is None):
        raise ValueError("give exactly one of experiment or parent_run_id")
    client = MlflowClient(tracking_uri=tracking_uri)
    if parent_run_id is not None:
        parent = client.get_run(parent_run_id)
        experiment_ids = [parent.info.experiment_id]
        query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
        where = f"parent run {parent_run_id}"
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"MLflow experiment {experiment!r} not found at {client.tracking_uri}")
        experiment_ids = [exp.experiment_id]
        query = ""
        where = f"experiment {experiment!r}"
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    points = [p for p in (_point_from_run(r) for r in runs if r.info.status == "FINISHED") if p is not None]
    if not points:
        raise ValueError(f"no finished runs with metrics {METRIC_PARAMS}, {METRIC_FLOPS}, {METRIC_LOSS} in {where}")
    return sorted(points, key=lambda p: (p.params, p.flops))
