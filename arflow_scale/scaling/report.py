"""Scaling-law report: points.csv, scaling.md (tables), fits.json, PNG plots, all in one folder and,
given the sweep's parent run, logged to MLflow under `scaling/`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from .analysis import SEPARATION, CloseCall, ScalingAnalysis, analyse
from .bootstrap import BootstrapSettings, Estimate
from .fit import PowerLawFit
from .holdout import PredictionCheck
from .isoflop import DEFAULT_BUDGET_TOLERANCE, STATUS_TEXT, IsoFlopAnalysis
from .parametric import NAMES, ParametricFit
from .plots import write_plots
from .points import ScalingPoint, write_points_csv


def _fmt(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


def _est(estimate: Estimate) -> str:
    lo, hi = estimate.interval
    return f"{_fmt(estimate.value)} [{_fmt(lo)}, {_fmt(hi)}]"


def _finite(value):
    """JSON-safe tree: tuples -> lists, nan/inf -> None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _points_md(points: Sequence[ScalingPoint], title: str = "Points") -> list[str]:
    """A table of the points; with the seeds and their loss's standard deviation when some point averages seeds."""
    seeded = any(p.seeds > 1 for p in points)
    extra = (" seeds | loss std |", "---:|---:|") if seeded else ("", "")
    lines = [f"## {title}", "", "| run | budget | params N | tokens D | images | FLOPs C | loss | FID |" + extra[0],
             "|---|---:|---:|---:|---:|---:|---:|---:|" + extra[1]]
    for p in sorted(points, key=lambda p: (p.budget or p.flops, p.params, p.loss)):
        lines.append(f"| {p.name or '-'} | {_fmt(p.budget)} | {_fmt(p.params)} | {_fmt(p.tokens)} | "
                     f"{_fmt(p.images)} | {_fmt(p.flops)} | {_fmt(p.loss)} | {_fmt(p.fid)} |"
                     + (f" {p.seeds} | {_fmt(p.loss_std)} |" if seeded else ""))
    return lines


def _close_calls_md(calls: Sequence[CloseCall]) -> list[str]:
    """The cells whose best setting the seeds do not separate from the runner-up (analysis.close_calls)."""
    lines = [f"## Close calls: the best setting within {SEPARATION:g} standard errors of the runner-up", "",
             "More seeds would be needed to rank these two; the fits use the lower mean.", "",
             "| budget | params N | best | mean loss | runner-up | mean loss | gap | standard error |",
             "|---:|---:|---|---:|---|---:|---:|---:|"]
    lines += [f"| {_fmt(c.best.budget)} | {_fmt(c.best.params)} | {c.best.name or '-'} | {_fmt(c.best.loss)} | "
              f"{c.runner_up.name or '-'} | {_fmt(c.runner_up.loss)} | {_fmt(c.gap)} | {_fmt(c.standard_error)} |"
              for c in calls]
    return lines


def _law_row(label: str, law: PowerLawFit) -> str:
    return (f"| {label} | {_est(Estimate(law.a, law.a_interval))} | {_est(Estimate(law.b, law.b_interval))} | "
            f"{_fmt(law.r2)} | {law.n} |")


def _d_opt_source(iso: IsoFlopAnalysis) -> str:
    ratio = iso.tokens_per_flop
    if ratio.source == "6N":
        return "D_opt = C / (6 N_opt): the points carry no tokens"
    return (f"D_opt = C x tokens per FLOP at N_opt; tokens/FLOP = {ratio.coefficient:.4g} N^{ratio.exponent:.4f}, "
            "fitted to the points' own tokens/flops")


def _isoflop_md(iso: IsoFlopAnalysis) -> list[str]:
    lines = ["## IsoFLOP profiles", "", f"Grouped by {iso.grouping}; a parabola of loss in ln N per budget. "
             f"{_d_opt_source(iso)}.", "",
             "| budget C | points | N sampled | N_opt | D_opt | L_opt | R^2 | usable resamples | status |",
             "|---:|---:|---|---|---|---|---:|---:|---|"]
    for p in iso.profiles:
        lines.append(f"| {_fmt(p.budget)} | {len(p.indices)} | {_fmt(p.params_range[0])} .. "
                     f"{_fmt(p.params_range[1])} | {_est(p.n_opt)} | {_est(p.d_opt)} | {_est(p.l_opt)} | "
                     f"{_fmt(p.parabola.r2)} | {_fmt(p.resample_share)} | {STATUS_TEXT[p.status]} |")
    lines += ["", "### Compute-optimal frontier", ""]
    if iso.n_opt_law is None:
        return lines + ["No frontier: fewer than two budgets with a usable optimum."]
    lines += ["| law | coefficient | exponent | R^2 (log-log) | budgets |", "|---|---|---|---:|---:|",
              _law_row("N_opt = k C^a", iso.n_opt_law), _law_row("D_opt = k C^b", iso.d_opt_law),
              _law_row("L_opt = k C^c", iso.l_opt_law)]
    return lines


def _parametric_md(law: Optional[ParametricFit]) -> list[str]:
    lines = ["## Parametric law L(N, D) = E + A / N^alpha + B / D^beta", ""]
    if law is None:
        return lines + ["Skipped (see notes)."]
    lines += [f"Huber (delta {law.delta:g}) on ln L, log-sum-exp form, L-BFGS; n = {law.n}, "
              f"mean Huber {law.huber:.3g}, R^2 of ln L {law.r2:.4f}. "
              "a = beta / (alpha + beta) (N_opt ~ C^a), b = alpha / (alpha + beta) (D_opt ~ C^b), for C = kND.",
              "", "| parameter | value [interval] |", "|---|---|"]
    lines += [f"| {name} | {_est(getattr(law, name))} |" for name in NAMES]
    return lines


def _power_laws_md(fits: dict[str, PowerLawFit]) -> list[str]:
    lines = ["## Single power laws (all points together)", "",
             "| fit | formula | a | b (exponent) | b interval (t) | c | R^2 | n |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for key, f in fits.items():
        lines.append(f"| {key} | {f.to_dict()['formula']} | {_fmt(f.a)} | {f.b:.4f} | "
                     f"[{f.b_interval[0]:.4f}, {f.b_interval[1]:.4f}] | {_fmt(f.c)} | {f.r2:.4f} | {f.n} |")
    return lines


def _prediction_md(check: Optional[PredictionCheck]) -> list[str]:
    lines = ["## Prediction check", ""]
    if check is None:
        return lines + ["Skipped (see notes)."]
    lines += [f"Held out: budget {_fmt(check.budget)}; fitted on budgets "
              f"{', '.join(_fmt(b) for b in check.fitted_budgets)}.", "",
              "| source | N_opt | L_opt | L_opt relative error |", "|---|---:|---:|---:|"]
    for label, n_opt, l_opt in (("measured (held-out parabola)", check.measured_n_opt, check.measured_l_opt),
                                ("IsoFLOP frontier", check.isoflop_n_opt, check.isoflop_l_opt),
                                ("L(N, D)", check.parametric_n_opt, check.parametric_l_opt)):
        error = (l_opt - check.measured_l_opt) / check.measured_l_opt
        lines.append(f"| {label} | {_fmt(n_opt)} | {_fmt(l_opt)} | {_fmt(error)} |")
    if check.points:
        lines += ["", f"L(N, D) at each held-out point (mean |relative error| {check.mean_abs_relative_error:.4g}):",
                  "", "| run | N | D | measured | predicted | relative error |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {p.name or '-'} | {_fmt(p.params)} | {_fmt(p.tokens)} | {_fmt(p.measured)} | "
                  f"{_fmt(p.predicted)} | {_fmt(p.relative_error)} |" for p in check.points]
    return lines


def markdown_report(analysis: ScalingAnalysis) -> str:
    """The report as markdown: points, IsoFLOP profiles and frontier, L(N, D), power laws, check, notes."""
    s = analysis.settings
    lines = ["# Scaling laws", "", f"{len(analysis.points)} points. Intervals at {s.confidence:.0%}: bootstrap "
             f"percentile over points ({s.resamples} resamples, seed {s.seed}) for the IsoFLOP and parametric "
             "fits, t-distribution for the single power laws.", ""]
    beaten = _points_md(analysis.beaten, "Points not fitted: a lower loss shares their size, FLOPs and tokens") \
        if analysis.beaten else []
    close = _close_calls_md(analysis.close_calls) if analysis.close_calls else []
    for part in filter(None, (_points_md(analysis.points), beaten, close, _isoflop_md(analysis.isoflop),
                              _parametric_md(analysis.parametric), _power_laws_md(analysis.power_laws),
                              _prediction_md(analysis.prediction))):
        lines += [*part, ""]
    if analysis.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in analysis.notes), ""]
    return "\n".join(lines)


def _power_law_summary(fit: PowerLawFit) -> dict:
    d = fit.to_dict()
    keep = ("formula", "a", "a_interval", "b", "b_interval", "alpha", "alpha_interval", "c", "r2", "n", "interval")
    return {k: d[k] for k in keep}


def _isoflop_summary(iso: IsoFlopAnalysis) -> dict:
    profiles = [{"budget": p.budget, "points": len(p.indices), "params_range": p.params_range,
                 "status": p.status, "parabola": p.parabola.coeffs, "r2": p.parabola.r2,
                 "resample_share": p.resample_share,
                 "n_opt": p.n_opt.to_dict(), "d_opt": p.d_opt.to_dict(), "l_opt": p.l_opt.to_dict()}
                for p in iso.profiles]
    laws = {name: (_power_law_summary(law) if law is not None else None)
            for name, law in (("n_opt", iso.n_opt_law), ("d_opt", iso.d_opt_law), ("l_opt", iso.l_opt_law))}
    ratio = iso.tokens_per_flop
    return {"grouping": iso.grouping, "d_opt_source": _d_opt_source(iso),
            "tokens_per_flop": {"coefficient": ratio.coefficient, "exponent": ratio.exponent, "source": ratio.source},
            "profiles": profiles, "frontier": laws, "resamples_used": iso.resamples_used}


def _parametric_summary(law: Optional[ParametricFit]) -> Optional[dict]:
    if law is None:
        return None
    return {**{name: getattr(law, name).to_dict() for name in NAMES}, "huber": law.huber, "delta": law.delta,
            "r2_log_loss": law.r2, "n": law.n, "resamples_used": law.resamples_used}


def _prediction_summary(check: Optional[PredictionCheck]) -> Optional[dict]:
    if check is None:
        return None
    return {"budget": check.budget, "fitted_budgets": check.fitted_budgets,
            "measured": {"n_opt": check.measured_n_opt, "l_opt": check.measured_l_opt},
            "isoflop": {"n_opt": check.isoflop_n_opt, "l_opt": check.isoflop_l_opt},
            "parametric": {"n_opt": check.parametric_n_opt, "l_opt": check.parametric_l_opt},
            "points": [{"name": p.name, "params": p.params, "tokens": p.tokens, "measured": p.measured,
                        "predicted": p.predicted, "relative_error": p.relative_error} for p in check.points],
            "mean_abs_relative_error": check.mean_abs_relative_error, "notes": check.notes}


def _close_calls_summary(analysis: ScalingAnalysis) -> dict:
    """The close calls and the IsoFLOP optima and frontier exponents refitted with their runner-ups."""
    other = analysis.runner_up_isoflop
    refit = None if other is None else {
        "n_opt": {f"{p.budget:g}": p.n_opt.value for p in other.profiles},
        "frontier_exponents": {name: (law.b if law is not None else None) for name, law in
                               (("n_opt", other.n_opt_law), ("d_opt", other.d_opt_law), ("l_opt", other.l_opt_law))}}
    cells = [{"best": c.best.name, "runner_up": c.runner_up.name, "params": c.best.params, "budget": c.best.budget,
              "flops": c.best.flops, "gap": c.gap, "standard_error": c.standard_error} for c in analysis.close_calls]
    return {"separation": SEPARATION, "judged": analysis.close_calls_judged, "cells": cells,
            "runner_up_isoflop": refit}


def summary(analysis: ScalingAnalysis) -> dict:
    """fits.json content (nan written as null)."""
    s = analysis.settings
    return _finite({
        "n_points": len(analysis.points), "n_points_not_fitted": len(analysis.beaten),
        "n_runs": sum(p.seeds for p in (*analysis.points, *analysis.beaten)), "confidence": s.confidence,
        "bootstrap": {"resamples": s.resamples, "seed": s.seed},
        "fits": {key: _power_law_summary(f) for key, f in analysis.power_laws.items()},
        "isoflop": _isoflop_summary(analysis.isoflop),
        "parametric": _parametric_summary(analysis.parametric),
        "prediction_check": _prediction_summary(analysis.prediction),
        "close_calls": _close_calls_summary(analysis),
        "notes": analysis.notes,
    })


def write_report(points: Sequence[ScalingPoint], out_dir: str | Path, *,
                 settings: BootstrapSettings = BootstrapSettings(), irreducible: bool = False,
                 tolerance: float = DEFAULT_BUDGET_TOLERANCE, parent_run_id: Optional[str] = None,
                 tracking_uri: Optional[str] = None) -> dict:
    """Analyse, write points.csv / scaling.md / fits.json / PNGs into `out_dir`, log them to the parent run.

    Returns the fits.json content plus out_dir and files (printed as the CLI's JSON line).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analysis = analyse(points, settings=settings, irreducible=irreducible, tolerance=tolerance)
    files = [write_points_csv(points, out / "points.csv")]  # every point: a refit from it gives the same fits
    (out / "scaling.md").write_text(markdown_report(analysis))
    result = summary(analysis)
    (out / "fits.json").write_text(json.dumps(result, indent=2))
    files += [out / "scaling.md", out / "fits.json", *write_plots(analysis, out)]
    result["out_dir"] = str(out.resolve())
    result["files"] = [f.name for f in files]
    if parent_run_id:
        log_to_run(parent_run_id, out, analysis, tracking_uri)
        result["parent_run_id"] = parent_run_id
    return result


def _run_metrics(analysis: ScalingAnalysis) -> dict[str, float]:
    """Headline numbers logged on the parent run: exponents, R^2, the frontier and the law's parameters."""
    metrics = {}
    for key, f in analysis.power_laws.items():
        metrics.update({f"scaling/{key}/exponent": f.b, f"scaling/{key}/coefficient": f.a, f"scaling/{key}/r2": f.r2})
    iso = analysis.isoflop
    for name, law in (("n_opt", iso.n_opt_law), ("d_opt", iso.d_opt_law), ("l_opt", iso.l_opt_law)):
        if law is not None:
            metrics[f"scaling/isoflop/{name}_exponent"] = law.b
    if analysis.parametric is not None:
        metrics.update({f"scaling/parametric/{name}": getattr(analysis.parametric, name).value for name in NAMES})
    if analysis.close_calls_judged:  # 0 is news too: the seeds rank every judged cell
        metrics["scaling/close_calls"] = len(analysis.close_calls)
    if analysis.runner_up_isoflop is not None and analysis.runner_up_isoflop.n_opt_law is not None:
        metrics["scaling/isoflop/n_opt_exponent_runner_ups"] = analysis.runner_up_isoflop.n_opt_law.b
    check = analysis.prediction
    if check is not None and check.points:
        metrics["scaling/prediction/mean_abs_relative_error"] = check.mean_abs_relative_error
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def log_to_run(run_id: str, out_dir: Path, analysis: ScalingAnalysis, tracking_uri: Optional[str]) -> None:
    """Artifacts under `scaling/` plus the headline metrics on MLflow run `run_id`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_artifacts(run_id, str(out_dir), artifact_path="scaling")
    for key, value in _run_metrics(analysis).items():
        client.log_metric(run_id, key, float(value))
