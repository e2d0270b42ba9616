"""Power-law fits recover known exponents; the CSV CLI writes the report and prints the fit."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from arflow_scale.scaling.fit import (ScalingPoint, fit_power_law, fit_scaling_laws, points_from_csv,
                                      points_from_mlflow, write_points_csv)
from arflow_scale.scaling.report import markdown_table, write_report


def synthetic_points(n=12, alpha=0.3, beta=0.2, gamma=0.15, noise=0.03, seed=0):
    """L = 8 N^-alpha, L ~ C^-beta via C's own noise-free law, FID = 300 C^-gamma; lognormal noise."""
    rng = np.random.default_rng(seed)
    params = np.geomspace(1e5, 1e8, n)
    flops = np.geomspace(1e12, 1e17, n)
    loss_n = 8.0 * params ** -alpha * np.exp(rng.normal(0, noise, n))
    fid = 300.0 * flops ** -gamma * np.exp(rng.normal(0, noise, n))
    return [ScalingPoint(params=p, flops=c, loss=l, fid=f, name=f"p{i}")
            for i, (p, c, l, f) in enumerate(zip(params, flops, loss_n, fid))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_exponent_with_noise(seed):
    points = synthetic_points(seed=seed)
    fit = fit_power_law([p.params for p in points], [p.loss for p in points], x_name="params", y_name="loss")
    assert abs(fit.alpha - 0.3) < 0.02
    assert fit.b_interval[0] < fit.b < fit.b_interval[1]
    assert fit.a_interval[0] < fit.a < fit.a_interval[1]
    assert 4.0 < fit.a < 16.0
    assert fit.n == 12 and fit.r2 > 0.98


def test_interval_covers_truth_at_nominal_rate():
    """Over many noisy draws the 95% interval for b contains -0.3 about 95% of the time."""
    rng = np.random.default_rng(123)
    x = np.geomspace(1e4, 1e8, 8)
    hits = 0
    trials = 400
    for _ in range(trials):
        y = 5.0 * x ** -0.3 * np.exp(rng.normal(0, 0.05, x.size))
        lo, hi = fit_power_law(x, y).b_interval
        hits += lo <= -0.3 <= hi
    assert 0.91 < hits / trials < 0.99


def test_interval_narrows_with_less_noise():
    x = np.geomspace(1e4, 1e8, 10)
    rng = np.random.default_rng(5)
    eps = rng.normal(0, 1, x.size)
    wide = fit_power_law(x, 2 * x ** -0.5 * np.exp(0.1 * eps))
    narrow = fit_power_law(x, 2 * x ** -0.5 * np.exp(0.01 * eps))
    assert (narrow.b_interval[1] - narrow.b_interval[0]) < 0.2 * (wide.b_interval[1] - wide.b_interval[0])


def test_irreducible_term_recovered():
    x = np.geomspace(1e4, 1e9, 16)
    rng = np.random.default_rng(7)
    y = 0.5 + 20.0 * x ** -0.3 * np.exp(rng.normal(0, 0.005, x.size))
    fit = fit_power_law(x, y, irreducible=True)
    assert fit.c is not None and abs(fit.c - 0.5) < 0.05
    assert abs(fit.alpha - 0.3) < 0.02
    pure = fit_power_law(x, y)
    assert pure.alpha < 0.25  # ignoring the floor flattens the apparent exponent
    assert np.allclose(fit.predict(x), y, rtol=0.02)


@pytest.mark.parametrize("x,y,message", [
    ([1, 2], [1, 2], "at least 3 points"),
    ([1, 2, -3], [1, 2, 3], "must be finite and > 0"),
    ([1, 2, 3], [1, 0, 3], "must be finite and > 0"),
    ([2, 2, 2], [1, 2, 3], "two distinct"),
])
def test_bad_points_are_rejected(x, y, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, y)


def test_fit_scaling_laws_keys_and_fid_optional():
    points = synthetic_points()
    fits = fit_scaling_laws(points)
    assert set(fits) == {"loss_vs_params", "loss_vs_flops", "fid_vs_flops"}
    assert abs(fits["fid_vs_flops"].alpha - 0.15) < 0.02
    for p in points:
        p.fid = None
    assert set(fit_scaling_laws(points)) == {"loss_vs_params", "loss_vs_flops"}
    with pytest.raises(ValueError, match="no scaling points"):
        fit_scaling_laws([])


def test_csv_roundtrip_and_errors(tmp_path):
    points = synthetic_points(n=4)
    points[1].fid = None
    path = write_points_csv(points, tmp_path / "p.csv")
    back = points_from_csv(path)
    assert [p.name for p in back] == [p.name for p in points]
    assert back[1].fid is None and back[0].fid == pytest.approx(points[0].fid)
    assert [p.loss for p in back] == pytest.approx([p.loss for p in points])
    bad = tmp_path / "bad.csv"
    bad.write_text("params,flops\n1,2\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) loss"):
        points_from_csv(bad)
    bad.write_text("params,flops,loss\n1,2,abc\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: column 'loss' has 'abc'"):
        points_from_csv(bad)
    with pytest.raises(FileNotFoundError):
        points_from_csv(tmp_path / "missing.csv")


def test_markdown_table_lists_points_and_fits():
    points = synthetic_points(n=5)
    text = markdown_table(points, fit_scaling_laws(points))
    assert all(f"| {p.name} |" in text for p in points)
    assert "| loss_vs_params | loss = a * params^b |" in text


def test_report_logs_artifacts_to_parent_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("scaling-test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, run_name="sweep").info.run_id
    points = synthetic_points(n=6)
    for p in points:  # nested runs the way the sweep records them
        run = client.create_run(exp, run_name=p.name, tags={"mlflow.parentRunId": parent})
        for key, value in (("scaling/params", p.params), ("scaling/flops", p.flops),
                           ("scaling/loss", p.loss), ("fid", p.fid)):
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    unrelated = client.create_run(exp, run_name="other")  # no parent, no metrics
    client.set_terminated(unrelated.info.run_id)

    found = points_from_mlflow(parent_run_id=parent, tracking_uri=uri)
    assert sorted(p.name for p in found) == sorted(p.name for p in points)
    assert len(points_from_mlflow(experiment="scaling-test", tracking_uri=uri)) == 6
    with pytest.raises(ValueError, match="not found"):
        points_from_mlflow(experiment="nope", tracking_uri=uri)

    summary = write_report(found, tmp_path / "out", parent_run_id=parent, tracking_uri=uri)
    assert summary["fits"]["loss_vs_params"]["alpha"] == pytest.approx(0.3, abs=0.03)
    logged = {a.path for a in client.list_artifacts(parent, "scaling")}
    assert {"scaling/scaling.md", "scaling/points.csv", "scaling/loss_vs_params.png",
            "scaling/fid_vs_flops.png"} <= logged
    assert "scaling/loss_vs_params/exponent" in client.get_run(parent).data.metrics


ARFLOW = str(Path(sys.executable).with_name("arflow"))  # the installed console script


def test_cli_csv_end_to_end(tmp_path):
    rng = np.random.default_rng(42)
    path = tmp_path / "points.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["params", "flops", "loss"])
        for n in np.geomspace(1e5, 1e8, 10):
            writer.writerow([n, 6 * n * 1e5, 8.0 * n ** -0.3 * np.exp(rng.normal(0, 0.02))])
    out = tmp_path / "report"
    proc = subprocess.run([ARFLOW, "scaling", "fit", "--csv", str(path),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    fit = summary["fits"]["loss_vs_params"]
    assert abs(fit["alpha"] - 0.3) < 0.02
    lo, hi = fit["alpha_interval"]
    assert lo < fit["alpha"] < hi
    assert "fid_vs_flops" not in summary["fits"]
    for name in ("points.csv", "scaling.md", "fits.json", "loss_vs_params.png", "loss_vs_flops.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "loss_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = subprocess.run([ARFLOW, "scaling", "fit", "--csv",
                          str(tmp_path / "missing.csv")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.csv" in bad.stderr
