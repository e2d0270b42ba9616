"""Power-law fits y = a * x^b (+ c) in log space, with t-distribution confidence intervals.

Points come from a CSV (`params`, `flops`, `loss`, optional `fid`), an MLflow experiment, or the
nested runs under a parent run. Each point is one training run of a sweep.
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

# Metric names the sweep logs on every point's MLflow run (read back by `points_from_mlflow`).
METRIC_PARAMS = "scaling/params"
METRIC_FLOPS = "scaling/flops"
METRIC_LOSS = "scaling/loss"
METRIC_FID = "fid"
CSV_COLUMNS = ("params", "flops", "loss")


@dataclass
class ScalingPoint:
    """One finished training run: parameter count N, training FLOPs C, final loss, optional FID."""

    params: float
    flops: float
    loss: float
    fid: Optional[float] = None
    name: str = ""
    run_id: str = ""


@dataclass
class PowerLawFit:
    """y = a * x^b (+ c): `b` is the exponent (negative when y falls), `alpha` = -b."""

    x: str
    y: str
    a: float
    b: float
    a_interval: tuple[float, float]
    b_interval: tuple[float, float]
    r2: float
    n: int
    confidence: float
    c: Optional[float] = None  # irreducible term (fixed at its profile optimum when fitted)
    stderr: dict[str, float] = field(default_factory=dict)

    @property
    def alpha(self) -> float:
        return -self.b

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        """y at `x` (array or scalar)."""
        return self.a * np.power(np.asarray(x, dtype=float), self.b) + (self.c or 0.0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["alpha"] = self.alpha
        out["alpha_interval"] = (-self.b_interval[1], -self.b_interval[0])
        out["formula"] = f"{self.y} = a * {self.x}^b" + (" + c" if self.c is not None else "")
        return out


def _loglinear(log_x: np.ndarray, log_y: np.ndarray, confidence: float):
    """Ordinary least squares log_y = alpha + b log_x; returns (intercept, slope, se_i, se_s, tcrit, r2)."""
    from scipy import stats

    res = stats.linregress(log_x, log_y)
    dof = len(log_x) - 2
    tcrit = float(stats.t.ppf(0.5 + confidence / 2.0, dof)) if dof > 0 else math.inf
    return (float(res.intercept), float(res.slope), float(res.intercept_stderr), float(res.stderr),
            tcrit, float(res.rvalue) ** 2)


def _check_xy(x: Sequence[float], y: Sequence[float], x_name: str, y_name: str, min_points: int):
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"fit {y_name}({x_name}): x and y must be 1-d of equal length, got {xa.shape}, {ya.shape}")
    if len(xa) < min_points:
        raise ValueError(f"fit {y_name}({x_name}): needs at least {min_points} points, got {len(xa)}")
    for name, arr in ((x_name, xa), (y_name, ya)):
        bad = ~np.isfinite(arr) | (arr <= 0)
        if bad.any():
            raise ValueError(f"fit {y_name}({x_name}): {name} must be finite and > 0, got {arr[bad][0]!r}")
    if np.unique(xa).size < 2:
        raise ValueError(f"fit {y_name}({x_name}): needs at least two distinct {x_name} values")
    return xa, ya


def fit_power_law(x: Sequence[float], y: Sequence[float], *, x_name: str = "x", y_name: str = "y",
                  confidence: float = 0.95, irreducible: bool = False) -> PowerLawFit:
    """Fit log y = log a + b log x by least squares (optionally y - c, with c >= 0 profiled).

    Intervals: intercept/slope +- t_{n-2} * standard error (exp() of the intercept interval for a);
    with `irreducible`, they are conditional on the fitted c.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xa, ya = _check_xy(x, y, x_name, y_name, 4 if irreducible else 3)
    log_x = np.log(xa)
    c: Optional[float] = None
    if irreducible:
        c = _profile_irreducible(log_x, ya, confidence)
    log_y = np.log(ya - (c or 0.0))
    intercept, slope, se_i, se_s, tcrit, r2 = _loglinear(log_x, log_y, confidence)
    return PowerLawFit(
        x=x_name, y=y_name, a=math.exp(intercept), b=slope,
        a_interval=(math.exp(intercept - tcrit * se_i), math.exp(intercept + tcrit * se_i)),
        b_interval=(slope - tcrit * se_s, slope + tcrit * se_s),
        r2=r2, n=len(xa), confidence=confidence, c=c,
        stderr={"log_a": se_i, "b": se_s},
    )


def _profile_irreducible(log_x: np.ndarray, y: np.ndarray, confidence: float) -> float:
    """The c in [0, min y) minimising the log-space residuals of y ~ c + a x^b."""
    from scipy import optimize

    log_y = np.log(y)
    upper = float(y.min())

    def sse(c: float) -> float:
        intercept, slope, *_ = _loglinear(log_x, np.log(y - c), confidence)
        pred = c + np.exp(intercept + slope * log_x)
        return float(np.sum((log_y - np.log(pred)) ** 2))

    res = optimize.minimize_scalar(sse, bounds=(0.0, upper * (1 - 1e-6)), method="bounded",
                                   options={"xatol": upper * 1e-8})
    return float(res.x) if sse(float(res.x)) < sse(0.0) else 0.0


def fit_scaling_laws(points: Sequence[ScalingPoint], *, confidence: float = 0.95,
                     irreducible: bool = False) -> dict[str, PowerLawFit]:
    """L(N), L(C) and (when every point has one) FID(C), keyed loss_vs_params/loss_vs_flops/fid_vs_flops."""
    if not points:
        raise ValueError("no scaling points to fit")
    params = [p.params for p in points]
    flops = [p.flops for p in points]
    loss = [p.loss for p in points]
    fits = {
        "loss_vs_params": fit_power_law(params, loss, x_name="params", y_name="loss",
                                        confidence=confidence, irreducible=irreducible),
        "loss_vs_flops": fit_power_law(flops, loss, x_name="flops", y_name="loss",
                                       confidence=confidence, irreducible=irreducible),
    }
    with_fid = [p for p in points if p.fid is not None and math.isfinite(p.fid)]
    if len(with_fid) >= (4 if irreducible else 3):
        fits["fid_vs_flops"] = fit_power_law([p.flops for p in with_fid], [p.fid for p in with_fid],
                                             x_name="flops", y_name="fid", confidence=confidence,
                                             irreducible=irreducible)
    return fits


def _parse_number(text: str, where: str, column: str, optional: bool = False) -> Optional[float]:
    text = (text or "").strip()
    if not text:
        if optional:
            return None
        raise ValueError(f"{where}: column {column!r} is empty")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: column {column!r} has {text!r}, not a number") from None


def points_from_csv(path: str | Path) -> list[ScalingPoint]:
    """Read a CSV with a header row: params, flops, loss and optionally fid, name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: points CSV not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        points = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            where = f"{path}:{line}"
            points.append(ScalingPoint(
                params=_parse_number(row["params"], where, "params"),
                flops=_parse_number(row["flops"], where, "flops"),
                loss=_parse_number(row["loss"], where, "loss"),
                fid=_parse_number(row.get("fid", ""), where, "fid", optional=True),
                name=(row.get("name") or "").strip(),
            ))
    if not points:
        raise ValueError(f"{path}: no data rows")
    return points


def write_points_csv(points: Iterable[ScalingPoint], path: str | Path) -> Path:
    """Write points with columns name, params, flops, loss, fid, run_id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "params", "flops", "loss", "fid", "run_id"])
        for p in points:
            writer.writerow([p.name, repr(float(p.params)), repr(float(p.flops)), repr(float(p.loss)),
                             "" if p.fid is None else repr(float(p.fid)), p.run_id])
    return path


def _point_from_run(run) -> Optional[ScalingPoint]:
    metrics = run.data.metrics
    if not all(k in metrics for k in (METRIC_PARAMS, METRIC_FLOPS, METRIC_LOSS)):
        return None
    return ScalingPoint(params=metrics[METRIC_PARAMS], flops=metrics[METRIC_FLOPS],
                        loss=metrics[METRIC_LOSS], fid=metrics.get(METRIC_FID),
                        name=run.info.run_name or "", run_id=run.info.run_id)


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
