"""Scaling plots as PNGs (matplotlib Agg): single power laws, IsoFLOP curves, the frontier, the
parametric law's loss contours over (N, D), and the held-out prediction check."""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .analysis import ScalingAnalysis
from .fit import PowerLawFit
from .holdout import PredictionCheck
from .isoflop import IsoFlopAnalysis, TokensPerFlop
from .parametric import ParametricFit
from .points import ScalingPoint

POWER_LAW_AXES = {  # fit key -> (x attribute, y attribute, x label, y label)
    "loss_vs_params": ("params", "loss", "parameters N", "loss L"),
    "loss_vs_flops": ("flops", "loss", "training FLOPs C", "loss L"),
    "fid_vs_flops": ("flops", "fid", "training FLOPs C", "FID"),
}


@contextmanager
def _figure(path: Path, ncols: int = 1, width: float = 5.0) -> Iterator[np.ndarray]:
    """A figure with `ncols` axes, saved to `path` and closed on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4), dpi=100, squeeze=False)
    try:
        yield axes[0]
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _log_axes(ax, x_label: str, y_label: str, log_y: bool = True) -> None:
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.tick_params(which="minor", labelsize=6)  # short ranges label minor ticks: keep them apart
    ax.tick_params(axis="x", which="both", labelrotation=30)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, which="both", alpha=0.3)


def _budget_colours(count: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.85 * i / max(1, count - 1)) for i in range(count)]


def plot_power_law(points: Sequence[ScalingPoint], fit: PowerLawFit, key: str, path: Path) -> Path:
    """Log-log scatter of the points with the fitted line."""
    x_attr, y_attr, x_label, y_label = POWER_LAW_AXES[key]
    pts = [p for p in points if getattr(p, y_attr) is not None]
    xs = np.array([getattr(p, x_attr) for p in pts], dtype=float)
    ys = np.array([getattr(p, y_attr) for p in pts], dtype=float)
    grid = np.geomspace(xs.min(), xs.max(), 100)
    with _figure(path) as (ax,):
        ax.scatter(xs, ys, color="tab:blue", label="runs", zorder=3)
        label = f"{y_label.split()[0]} = {fit.a:.3g} x^{fit.b:.3f}" + (f" + {fit.c:.3g}" if fit.c else "")
        ax.plot(grid, fit.predict(grid), color="tab:red", label=label)
        _log_axes(ax, x_label, y_label)
        ax.set_title(f"{key}: exponent {fit.b:.3f} [{fit.b_interval[0]:.3f}, {fit.b_interval[1]:.3f}]", fontsize=9)
        ax.legend(fontsize=8)
    return path


def plot_isoflop(points: Sequence[ScalingPoint], iso: IsoFlopAnalysis, path: Path) -> Path:
    """Loss against N per budget, each budget's parabola and its vertex (hollow: flagged, not used)."""
    with _figure(path, width=6.0) as (ax,):
        for profile, colour in zip(iso.profiles, _budget_colours(len(iso.profiles))):
            pts = [points[i] for i in profile.indices]
            ax.scatter([p.params for p in pts], [p.loss for p in pts], color=colour, zorder=3,
                       label=f"C = {profile.budget:.2g}")
            parabola = profile.parabola
            if parabola.status == "too_few":
                continue
            lo, hi = parabola.x_range
            x = np.linspace(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo), 100)
            ax.plot(np.exp(x), parabola.loss(x), color=colour, lw=1)
            if parabola.status not in ("too_few", "concave"):  # a vertex, used or flagged
                ax.scatter([math.exp(parabola.x_opt)], [parabola.l_opt], marker="*", s=160, zorder=4,
                           edgecolors="black", color=colour if parabola.status == "ok" else "none")
        _log_axes(ax, "parameters N", "loss L", log_y=False)
        ax.set_title(f"IsoFLOP profiles (grouped by {iso.grouping}); stars: minima", fontsize=9)
        ax.legend(fontsize=7)
    return path


def plot_frontier(iso: IsoFlopAnalysis, path: Path) -> Path:
    """N_opt(C) and D_opt(C) (left), L_opt(C) (right): the usable vertices with intervals and the laws."""
    usable = [p for p in iso.profiles if p.status == "ok"]
    budgets = np.array([p.budget for p in usable])
    grid = np.geomspace(budgets.min() / 2, budgets.max() * 2, 50) if usable else np.empty(0)
    with _figure(path, ncols=2) as (left, right):
        panels = ((left, "n_opt", iso.n_opt_law, "tab:blue", "N_opt"),
                  (left, "d_opt", iso.d_opt_law, "tab:orange", "D_opt"),
                  (right, "l_opt", iso.l_opt_law, "tab:green", "L_opt"))
        for ax, attr, law, colour, label in panels:
            values = np.array([getattr(p, attr).value for p in usable])
            bounds = np.array([getattr(p, attr).interval for p in usable]).reshape(-1, 2)
            err = np.abs(np.nan_to_num(bounds.T - values, nan=0.0))
            ax.errorbar(budgets, values, yerr=err, fmt="o", color=colour, capsize=3, label=f"{label} (vertex)")
            if law is not None:
                ax.plot(grid, law.predict(grid), color=colour, lw=1,
                        label=f"{label} ~ C^{law.b:.3f} [{law.b_interval[0]:.3f}, {law.b_interval[1]:.3f}]")
        _log_axes(left, "training FLOPs C", "parameters N_opt / tokens D_opt")
        _log_axes(right, "training FLOPs C", "loss L_opt", log_y=False)
        left.set_title("compute-optimal size and tokens", fontsize=9)
        right.set_title("loss at the optimum", fontsize=9)
        left.legend(fontsize=7)
        right.legend(fontsize=7)
    return path


def plot_parametric(points: Sequence[ScalingPoint], law: ParametricFit, ratio: TokensPerFlop, path: Path) -> Path:
    """Contours of the fitted L(N, D) with the points (same colour scale), and the optimum per budget."""
    import matplotlib

    n = np.array([p.params for p in points])
    d = np.array([p.tokens for p in points])
    n_axis = np.geomspace(n.min() / 2, n.max() * 2, 120)
    d_axis = np.geomspace(d.min() / 2, d.max() * 2, 120)
    grid_n, grid_d = np.meshgrid(n_axis, d_axis)
    predicted = law.predict(grid_n, grid_d)
    measured = np.array([p.loss for p in points])
    norm = matplotlib.colors.Normalize(min(predicted.min(), measured.min()), max(predicted.max(), measured.max()))
    with _figure(path, width=6.0) as (ax,):
        filled = ax.contourf(grid_n, grid_d, predicted, levels=np.linspace(norm.vmin, norm.vmax, 16), norm=norm,
                             cmap="viridis")
        ax.contour(grid_n, grid_d, predicted, levels=filled.levels, colors="white", linewidths=0.3)
        ax.scatter(n, d, c=measured, norm=norm, cmap="viridis", edgecolors="black", zorder=3, label="runs")
        budgets = np.geomspace(min(p.flops for p in points), max(p.flops for p in points), 12)
        bounds = (math.log(n_axis[0]), math.log(n_axis[-1]))
        optimum = np.array([law.optimum_on_budget(c, ratio.tokens, bounds)[:2] for c in budgets])
        ax.plot(optimum[:, 0], optimum[:, 1], color="tab:red", lw=1.5, label="loss-optimal (N, D) per budget")
        ax.figure.colorbar(filled, ax=ax, label="predicted loss", format="%.3g")
        _log_axes(ax, "parameters N", "training tokens D")
        ax.grid(False)  # the contour lines are the grid here
        ax.set_xlim(n_axis[0], n_axis[-1])
        ax.set_ylim(d_axis[0], d_axis[-1])
        ax.set_title(f"L = {law.E.value:.3g} + {law.A.value:.3g}/N^{law.alpha.value:.3f} + "
                     f"{law.B.value:.3g}/D^{law.beta.value:.3f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    return path


def plot_prediction(check: PredictionCheck, ratio: TokensPerFlop, path: Path) -> Path:
    """Held-out budget: its points and parabola with the measured and predicted optima (left); the
    parametric law's prediction of each held-out point against its measurement (right)."""
    with _figure(path, ncols=2) as (left, right):
        pts = check.held_out
        left.scatter([p.params for p in pts], [p.loss for p in pts], color="black", zorder=3, label="held-out runs")
        if check.measured.status != "too_few":
            lo, hi = check.measured.x_range
            x = np.linspace(lo, hi, 100)
            left.plot(np.exp(x), check.measured.loss(x), color="black", lw=1, label="their parabola")
            if check.law is not None:
                left.plot(np.exp(x), check.law.predict(np.exp(x), ratio.tokens(check.budget, np.exp(x))),
                          color="tab:red", lw=1, ls="--", label="L(N, D) fitted without them")
        for n_opt, l_opt, colour, label in (
                (check.measured_n_opt, check.measured_l_opt, "black", "measured optimum"),
                (check.isoflop_n_opt, check.isoflop_l_opt, "tab:blue", "IsoFLOP frontier prediction"),
                (check.parametric_n_opt, check.parametric_l_opt, "tab:red", "L(N, D) prediction")):
            if math.isfinite(n_opt) and math.isfinite(l_opt):
                left.scatter([n_opt], [l_opt], marker="*", s=160, color=colour, edgecolors="black", zorder=4,
                             label=label)
        _log_axes(left, "parameters N", "loss L", log_y=False)
        left.set_title(f"held-out budget C = {check.budget:.3g}", fontsize=9)
        left.legend(fontsize=7)
        if check.points:
            measured = [p.measured for p in check.points]
            predicted = [p.predicted for p in check.points]
            ends = [min(measured + predicted), max(measured + predicted)]
            right.plot(ends, ends, color="grey", lw=1, label="predicted = measured")
            right.scatter(measured, predicted, color="tab:red", zorder=3, label="held-out runs")
            right.legend(fontsize=7)
        right.set_xlabel("measured loss")
        right.set_ylabel("predicted loss (L(N, D) without the budget)")
        right.set_title(f"mean |relative error| {check.mean_abs_relative_error:.2%}", fontsize=9)
        right.grid(True, alpha=0.3)
    return path


def write_plots(analysis: ScalingAnalysis, out: Path) -> list[Path]:
    """Every plot the analysis supports, into folder `out`."""
    points = analysis.points
    files = [plot_power_law(points, fit, key, out / f"{key}.png") for key, fit in analysis.power_laws.items()]
    iso = analysis.isoflop
    if any(p.status != "too_few" for p in iso.profiles):
        files.append(plot_isoflop(points, iso, out / "isoflop.png"))
    if any(p.status == "ok" for p in iso.profiles):
        files.append(plot_frontier(iso, out / "frontier.png"))
    if analysis.parametric is not None:
        files.append(plot_parametric(points, analysis.parametric, iso.tokens_per_flop, out / "parametric.png"))
    if analysis.prediction is not None:
        files.append(plot_prediction(analysis.prediction, iso.tokens_per_flop, out / "prediction.png"))
    return files
