"""IsoFLOP profiles (Hoffmann et al. 2022, approach 2) and the compute-optimal frontier.

Per FLOP budget C: a parabola of loss in x = ln N over that budget's points; its vertex is the
loss-optimal size N_opt(C) and loss L_opt(C). Across budgets: power laws N_opt ~ C^a, D_opt ~ C^b,
L_opt ~ C^c. A vertex outside the sampled sizes, a parabola opening downwards, or a budget whose lowest
loss is at its smallest or largest size (the optimum not bracketed by the points) is flagged and left out
of the frontier: it is an extrapolation, not a measured optimum. Intervals: a bootstrap that resamples
points within each budget.

D_opt = C * (tokens per FLOP at N_opt), the ratio taken from the points' own tokens/flops (a power law
in N fitted over all points): ARFlow's training FLOPs per token are not 6N (attention within each
image, per-image adaLN, a label table with parameters but no FLOPs). Without tokens: D_opt = C / (6 N_opt).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np

from .bootstrap import (MIN_SUCCESS_FRACTION, BootstrapRun, BootstrapSettings, Estimate, bootstrap,
                        single_threaded_blas)
from .fit import PowerLawFit
from .points import ScalingPoint

DEFAULT_BUDGET_TOLERANCE = 0.25  # relative: points' flops within this factor of a group's smallest share a budget
MIN_SIZES = 3  # distinct model sizes a parabola needs
ProfileStatus = Literal["ok", "outside", "edge_small", "edge_large", "concave", "too_few"]
STATUS_TEXT = {"ok": "vertex inside the sampled sizes", "outside": "vertex outside the sampled sizes (not used)",
               "edge_small": "lowest loss at the smallest size: the optimum is not bracketed (not used; "
                             "sample smaller sizes)",
               "edge_large": "lowest loss at the largest size: the optimum is not bracketed (not used; "
                             "sample larger sizes)",
               "concave": "parabola opens downwards: no minimum (not used)",
               "too_few": f"fewer than {MIN_SIZES} distinct sizes (not used)"}


@dataclass(frozen=True)
class BudgetGroup:
    """The points (indices into the point list) trained at one FLOP budget C."""

    budget: float
    indices: np.ndarray


def group_by_budget(points: Sequence[ScalingPoint],
                    tolerance: float = DEFAULT_BUDGET_TOLERANCE) -> tuple[list[BudgetGroup], str]:
    """Groups by each point's `budget` when every point has one, else by flops within `tolerance`.

    Returns (groups sorted by budget, how they were grouped). A flops group's budget is the
    geometric mean of its points' flops.
    """
    if tolerance < 0:
        raise ValueError(f"budget tolerance must be >= 0, got {tolerance}")
    if points and all(p.budget is not None for p in points):
        budgets = sorted({p.budget for p in points})
        return ([BudgetGroup(b, np.array([i for i, p in enumerate(points) if p.budget == b])) for b in budgets],
                "budget")
    order = sorted(range(len(points)), key=lambda i: points[i].flops)
    clusters: list[list[int]] = []
    for i in order:
        if clusters and points[i].flops <= points[clusters[-1][0]].flops * (1.0 + tolerance):
            clusters[-1].append(i)
        else:
            clusters.append([i])
    groups = [BudgetGroup(float(np.exp(np.mean([math.log(points[i].flops) for i in c]))), np.array(c))
              for c in clusters]
    return groups, f"flops (relative tolerance {tolerance:g})"


@dataclass(frozen=True)
class TokensPerFlop:
    """Training tokens per training FLOP as a function of size: coefficient * N^exponent."""

    coefficient: float
    exponent: float
    source: Literal["tokens", "6N"]

    def tokens(self, flops: float | np.ndarray, params: float | np.ndarray) -> np.ndarray:
        """D for training compute C at size N."""
        return np.asarray(flops, dtype=float) * self.coefficient * np.power(np.asarray(params, float), self.exponent)

    @classmethod
    def from_points(cls, points: Sequence[ScalingPoint]) -> "TokensPerFlop":
        """Fit log(tokens/flops) against log N over the points with tokens; 1 / (6N) without."""
        known = [p for p in points if p.tokens is not None]
        if len({p.params for p in known}) < 2:
            return cls(coefficient=1.0 / 6.0, exponent=-1.0, source="6N")
        log_n = np.log([p.params for p in known])
        log_ratio = np.log([p.tokens / p.flops for p in known])
        slope, intercept = np.polyfit(log_n, log_ratio, 1)
        return cls(coefficient=float(np.exp(intercept)), exponent=float(slope), source="tokens")


@dataclass
class Parabola:
    """loss = c0 + c1 x + c2 x^2 with x = ln N, fitted by least squares; its vertex and status."""

    coeffs: tuple[float, float, float]
    x_range: tuple[float, float]
    status: ProfileStatus
    r2: float

    @property
    def x_opt(self) -> float:
        c0, c1, c2 = self.coeffs
        return -c1 / (2.0 * c2) if c2 > 0 else float("nan")

    @property
    def l_opt(self) -> float:
        return float(self.loss(self.x_opt))

    def loss(self, x: float | np.ndarray) -> np.ndarray:
        c0, c1, c2 = self.coeffs
        x = np.asarray(x, dtype=float)
        return c0 + c1 * x + c2 * x * x


def fit_parabola(log_params: np.ndarray, loss: np.ndarray) -> Parabola:
    """Least-squares parabola of loss in ln N; status says whether its vertex is a usable optimum: a minimum
    inside the sampled sizes, with a point of higher loss on each side of the lowest one."""
    x_range = (float(log_params.min()), float(log_params.max()))
    if np.unique(log_params).size < MIN_SIZES:
        return Parabola((math.nan,) * 3, x_range, "too_few", math.nan)
    c2, c1, c0 = np.polyfit(log_params, loss, 2)
    fit = Parabola((float(c0), float(c1), float(c2)), x_range, "ok", math.nan)
    residual = float(np.sum((loss - fit.loss(log_params)) ** 2))
    total = float(np.sum((loss - loss.mean()) ** 2))
    fit.r2 = 1.0 - residual / total if total > 0 else math.nan
    if c2 <= 0:
        fit.status = "concave"
    elif not x_range[0] <= fit.x_opt <= x_range[1]:
        fit.status = "outside"
    elif (lowest := float(log_params[np.argmin(loss)])) in x_range:
        fit.status = "edge_small" if lowest == x_range[0] else "edge_large"
    return fit


@dataclass
class IsoFlopProfile:
    """One budget's parabola: the optimum N_opt, D_opt, L_opt (nan unless status is ok) and its fit."""

    budget: float
    indices: np.ndarray  # its points, as indices into the analysed point list
    params_range: tuple[float, float]
    parabola: Parabola
    n_opt: Estimate
    d_opt: Estimate
    l_opt: Estimate
    resample_share: float  # fraction of bootstrap resamples whose parabola had a usable vertex

    @property
    def status(self) -> ProfileStatus:
        return self.parabola.status


@dataclass
class IsoFlopAnalysis:
    """Every budget's profile and the frontier laws N_opt(C), D_opt(C), L_opt(C) over the usable ones."""

    profiles: list[IsoFlopProfile]
    grouping: str
    tokens_per_flop: TokensPerFlop
    n_opt_law: Optional[PowerLawFit]
    d_opt_law: Optional[PowerLawFit]
    l_opt_law: Optional[PowerLawFit]
    settings: BootstrapSettings
    resamples_used: int
    notes: list[str] = field(default_factory=list)

    def predict_optimum(self, budget: float) -> tuple[float, float, float]:
        """(N_opt, D_opt, L_opt) at `budget` from the frontier laws; raises if there are none."""
        if self.n_opt_law is None:
            raise ValueError("no IsoFLOP frontier: fewer than two budgets with a usable optimum")
        return tuple(float(law.predict(budget)) for law in (self.n_opt_law, self.d_opt_law, self.l_opt_law))


def _profile_parabolas(points: Sequence[ScalingPoint], groups: Sequence[BudgetGroup],
                       indices: np.ndarray) -> list[Parabola]:
    """Each group's parabola over the points `indices` selects (a bootstrap resample or all)."""
    log_params = np.log([p.params for p in points])
    loss = np.array([p.loss for p in points])
    out = []
    for group in groups:
        chosen = indices[np.isin(indices, group.indices)]
        out.append(fit_parabola(log_params[chosen], loss[chosen]))
    return out


def _frontier(budgets: np.ndarray, parabolas: Sequence[Parabola], ratio: TokensPerFlop) -> np.ndarray:
    """[log k, slope] of N_opt, D_opt, L_opt against C over the usable vertices (nan if under two)."""
    ok = np.array([p.status == "ok" for p in parabolas])
    if ok.sum() < 2:
        return np.full(6, np.nan)
    log_c = np.log(budgets[ok])
    n_opt = np.exp([p.x_opt for p, good in zip(parabolas, ok) if good])
    l_opt = np.array([p.l_opt for p, good in zip(parabolas, ok) if good])
    d_opt = ratio.tokens(budgets[ok], n_opt)
    out = []
    for values in (n_opt, d_opt, l_opt):
        if np.any(values <= 0):
            out += [np.nan, np.nan]
            continue
        slope, intercept = np.polyfit(log_c, np.log(values), 1)
        out += [intercept, slope]
    return np.array(out)


def _law(y_name: str, budgets: np.ndarray, values: np.ndarray, coef: np.ndarray, run: BootstrapRun,
         column: int, confidence: float) -> Optional[PowerLawFit]:
    """The frontier law y = k C^slope with its log-log R^2 and bootstrap intervals."""
    log_k, slope = coef
    if not np.isfinite(slope):
        return None
    log_c, log_y = np.log(budgets), np.log(values)
    residual = float(np.sum((log_y - (log_k + slope * log_c)) ** 2))
    total = float(np.sum((log_y - log_y.mean()) ** 2))
    lo_k, hi_k = run.interval(column)
    return PowerLawFit(x="flops", y=y_name, a=float(np.exp(log_k)), b=float(slope),
                       a_interval=(float(np.exp(lo_k)), float(np.exp(hi_k))), b_interval=run.interval(column + 1),
                       r2=1.0 - residual / total if total > 0 else math.nan, n=len(budgets),
                       confidence=confidence, interval="bootstrap")


def _profile(points: Sequence[ScalingPoint], group: BudgetGroup, parabola: Parabola, run: BootstrapRun,
             column: int, ratio: TokensPerFlop) -> IsoFlopProfile:
    """One budget's profile; its vertex's bootstrap samples are in columns `column` (ln N) and `column + 1`."""
    n_opt = d_opt = l_opt = Estimate(math.nan)
    if parabola.status == "ok":  # a flagged vertex gets no interval either: it is not an optimum
        x_lo, x_hi = run.interval(column)
        n_opt = Estimate(math.exp(parabola.x_opt), (math.exp(x_lo), math.exp(x_hi)))
        d_ends = sorted(float(ratio.tokens(group.budget, n)) for n in n_opt.interval)  # D falls as N grows
        d_opt = Estimate(float(ratio.tokens(group.budget, n_opt.value)), (d_ends[0], d_ends[1]))
        l_opt = run.estimate(parabola.l_opt, column + 1)
    sizes = [points[i].params for i in group.indices]
    return IsoFlopProfile(budget=group.budget, indices=group.indices, params_range=(min(sizes), max(sizes)),
                          parabola=parabola, n_opt=n_opt, d_opt=d_opt, l_opt=l_opt,
                          resample_share=run.share(column))


def fit_isoflop(points: Sequence[ScalingPoint], *, tolerance: float = DEFAULT_BUDGET_TOLERANCE,
                settings: BootstrapSettings = BootstrapSettings()) -> IsoFlopAnalysis:
    """Profiles per budget and the frontier, with bootstrap intervals (points resampled within budgets).

    Bootstrap columns: (ln N_opt, L_opt) per budget, then [log k, slope] of N_opt, D_opt, L_opt vs C.
    """
    if not points:
        raise ValueError("no scaling points for the IsoFLOP analysis")
    groups, grouping = group_by_budget(points, tolerance)
    ratio = TokensPerFlop.from_points(points)
    budgets = np.array([g.budget for g in groups])
    parabolas = _profile_parabolas(points, groups, np.arange(len(points)))

    def statistic(indices: np.ndarray) -> np.ndarray:
        resampled = _profile_parabolas(points, groups, indices)
        vertices = [v for p in resampled for v in ((p.x_opt, p.l_opt) if p.status == "ok" else (np.nan, np.nan))]
        return np.concatenate([vertices, _frontier(budgets, resampled, ratio)])

    with single_threaded_blas():
        run = bootstrap(statistic, [g.indices for g in groups], 2 * len(groups) + 6, settings)
    profiles = [_profile(points, g, p, run, 2 * j, ratio) for j, (g, p) in enumerate(zip(groups, parabolas))]
    usable = [p for p in profiles if p.status == "ok"]
    notes = [f"budget {p.budget:.3g}: {STATUS_TEXT[p.status]}" for p in profiles if p.status != "ok"]
    notes += [f"budget {p.budget:.3g}: no interval, only {p.resample_share:.0%} of the resamples of its "
              f"{len(p.indices)} points had a usable vertex (needs {MIN_SUCCESS_FRACTION:.0%}; sample more sizes)"
              for p in usable if p.resample_share < MIN_SUCCESS_FRACTION]
    laws: list[Optional[PowerLawFit]] = [None, None, None]
    if len(usable) >= 2:
        coef = _frontier(budgets, parabolas, ratio)
        ok_budgets = np.array([p.budget for p in usable])
        laws = [_law(name, ok_budgets, np.array([getattr(p, name).value for p in usable]), coef[2 * k:2 * k + 2],
                     run, 2 * len(groups) + 2 * k, settings.confidence)
                for k, name in enumerate(("n_opt", "d_opt", "l_opt"))]
    else:
        notes.append(f"no frontier: {len(usable)} budget(s) with a usable optimum, needs 2")
    return IsoFlopAnalysis(profiles=profiles, grouping=grouping, tokens_per_flop=ratio, n_opt_law=laws[0],
                           d_opt_law=laws[1], l_opt_law=laws[2], settings=settings,
                           resamples_used=run.succeeded, notes=notes)
