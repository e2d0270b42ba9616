"""Scaling-law report: a points CSV, a markdown table, PNG plots (matplotlib Agg), fits as JSON.

Everything lands in one folder and, given a parent run, is logged to MLflow under `scaling/`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .fit import PowerLawFit, ScalingPoint, fit_scaling_laws, write_points_csv

PLOTS = {  # fit key -> (x attribute, y attribute, x label, y label)
    "loss_vs_params": ("params", "loss", "parameters N", "final loss L"),
    "loss_vs_flops": ("flops", "loss", "training FLOPs C", "final loss L"),
    "fid_vs_flops": ("flops", "fid", "training FLOPs C", "FID"),
}


def _fmt(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


def markdown_table(points: Sequence[ScalingPoint], fits: dict[str, PowerLawFit]) -> str:
    """Markdown: one row per point, then one row per fit with exponent and its interval."""
    lines = ["# Scaling laws", "", "| run | params | FLOPs | loss | FID |", "|---|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (p.params, p.flops)):
        lines.append(f"| {p.name or '-'} | {_fmt(p.params)} | {_fmt(p.flops)} | {_fmt(p.loss)} | {_fmt(p.fid)} |")
    lines += ["", "| fit | formula | a | b (exponent) | b interval | c | R^2 | n |",
              "|---|---|---:|---:|---|---:|---:|---:|"]
    for key, f in fits.items():
        d = f.to_dict()
        lines.append(f"| {key} | {d['formula']} | {_fmt(f.a)} | {f.b:.4f} | "
                     f"[{f.b_interval[0]:.4f}, {f.b_interval[1]:.4f}] ({f.confidence:.0%}) | "
                     f"{_fmt(f.c)} | {f.r2:.4f} | {f.n} |")
    return "\n".join(lines) + "\n"


def plot_fit(points: Sequence[ScalingPoint], fit: PowerLawFit, key: str, path: Path) -> Path:
    """Log-log scatter of the points with the fitted line; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_attr, y_attr, x_label, y_label = PLOTS[key]
    pts = [p for p in points if getattr(p, y_attr) is not None]
    xs = np.array([getattr(p, x_attr) for p in pts], dtype=float)
    ys = np.array([getattr(p, y_attr) for p in pts], dtype=float)
    grid = np.geomspace(xs.min(), xs.max(), 100)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.scatter(xs, ys, color="tab:blue", label="runs", zorder=3)
    label = f"{y_label.split()[-1]} = {fit.a:.3g} x^{fit.b:.3f}" + (f" + {fit.c:.3g}" if fit.c else "")
    ax.plot(grid, fit.predict(grid), color="tab:red", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.tick_params(which="minor", labelsize=6)  # short ranges label minor ticks: keep them apart
    ax.tick_params(axis="x", which="both", labelrotation=30)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{key}: exponent {fit.b:.3f} [{fit.b_interval[0]:.3f}, {fit.b_interval[1]:.3f}]", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(points: Sequence[ScalingPoint], out_dir: str | Path, *, confidence: float = 0.95,
                 irreducible: bool = False, parent_run_id: Optional[str] = None,
                 tracking_uri: Optional[str] = None) -> dict:
    """Fit, write points.csv / scaling.md / fits.json / PNGs into `out_dir`, log them to the parent run.

    Returns the summary dict printed as the CLI's JSON line.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fits = fit_scaling_laws(points, confidence=confidence, irreducible=irreducible)
    files = [write_points_csv(points, out / "points.csv")]
    (out / "scaling.md").write_text(markdown_table(points, fits))
    files.append(out / "scaling.md")
    summary = {
        "n_points": len(points),
        "confidence": confidence,
        "fits": {key: _summary(f) for key, f in fits.items()},
        "out_dir": str(out.resolve()),
    }
    (out / "fits.json").write_text(json.dumps(summary, indent=2))
    files.append(out / "fits.json")
    for key, fit in fits.items():
        files.append(plot_fit(points, fit, key, out / f"{key}.png"))
    summary["files"] = [f.name for f in files]
    if parent_run_id:
        log_to_run(parent_run_id, out, fits, tracking_uri)
        summary["parent_run_id"] = parent_run_id
    return summary


def _summary(fit: PowerLawFit) -> dict:
    d = fit.to_dict()
    keep = ("formula", "a", "a_interval", "b", "b_interval", "alpha", "alpha_interval", "c", "r2", "n")
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep}


def log_to_run(run_id: str, out_dir: Path, fits: dict[str, PowerLawFit], tracking_uri: Optional[str]) -> None:
    """Artifacts under `scaling/` plus exponent metrics on MLflow run `run_id`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_artifacts(run_id, str(out_dir), artifact_path="scaling")
    for key, f in fits.items():
        client.log_metric(run_id, f"scaling/{key}/exponent", f.b)
        client.log_metric(run_id, f"scaling/{key}/coefficient", f.a)
        client.log_metric(run_id, f"scaling/{key}/r2", f.r2)
