"""Prediction check: hold out the largest FLOP budget, fit on the rest, compare with what was measured.

The IsoFLOP frontier and the parametric law L(N, D), both fitted without the held-out budget, each
predict that budget's optimum (N_opt, L_opt); the measurement is the vertex of the held-out points'
own parabola. The parametric law also predicts every held-out point's loss from its (N, D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .bootstrap import BootstrapSettings
from .isoflop import (DEFAULT_BUDGET_TOLERANCE, STATUS_TEXT, Parabola, TokensPerFlop, fit_isoflop, fit_parabola,
                      group_by_budget)
from .parametric import HUBER_DELTA, ParametricFit, fit_parametric, parametric_skip_reason
from .points import ScalingPoint

NO_BOOTSTRAP = BootstrapSettings(resamples=0)


@dataclass(frozen=True)
class HeldOutPoint:
    """One held-out point's measured loss and the parametric law's prediction for it."""

    name: str
    params: float
    tokens: float
    measured: float
    predicted: float

    @property
    def relative_error(self) -> float:
        return (self.predicted - self.measured) / self.measured


@dataclass
class PredictionCheck:
    """Predicted vs measured optimum at the held-out budget (nan where a side could not be computed)."""

    budget: float
    fitted_budgets: list[float]
    held_out: list[ScalingPoint]
    measured: Parabola  # the held-out points' own IsoFLOP parabola
    measured_n_opt: float
    measured_l_opt: float
    isoflop_n_opt: float = math.nan
    isoflop_l_opt: float = math.nan
    parametric_n_opt: float = math.nan
    parametric_l_opt: float = math.nan
    law: Optional[ParametricFit] = None  # L(N, D) fitted without the held-out budget
    points: list[HeldOutPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def mean_abs_relative_error(self) -> float:
        """Mean |predicted - measured| / measured over the held-out points (parametric law)."""
        return float(np.mean([abs(p.relative_error) for p in self.points])) if self.points else math.nan


def prediction_check(points: Sequence[ScalingPoint], *, tolerance: float = DEFAULT_BUDGET_TOLERANCE,
                     delta: float = HUBER_DELTA) -> PredictionCheck:
    """Fit the frontier and L(N, D) without the largest budget's points; predict that budget."""
    groups, _ = group_by_budget(points, tolerance)
    if len(groups) < 3:
        raise ValueError(f"prediction check skipped: needs 3 budgets (2 to fit, 1 held out), found {len(groups)}")
    held = groups[-1]
    held_points = [points[i] for i in held.indices]
    held_set = set(held.indices.tolist())
    rest = [p for i, p in enumerate(points) if i not in held_set]
    log_params = np.log([p.params for p in held_points])
    measured = fit_parabola(log_params, np.array([p.loss for p in held_points]))
    usable = measured.status == "ok"
    check = PredictionCheck(budget=held.budget, fitted_budgets=[g.budget for g in groups[:-1]],
                            held_out=held_points, measured=measured,
                            measured_n_opt=math.exp(measured.x_opt) if usable else math.nan,
                            measured_l_opt=measured.l_opt if usable else math.nan)
    if not usable:
        check.notes.append(f"held-out budget {held.budget:.3g}: {STATUS_TEXT[measured.status]}; "
                           "no measured optimum to compare")
    iso = fit_isoflop(rest, tolerance=tolerance, settings=NO_BOOTSTRAP)
    if iso.n_opt_law is None:
        check.notes.append("IsoFLOP prediction skipped: " + "; ".join(iso.notes))
    else:
        check.isoflop_n_opt, _, check.isoflop_l_opt = iso.predict_optimum(held.budget)
    reason = parametric_skip_reason(rest)
    if reason is None and any(p.tokens is None for p in held_points):
        reason = "parametric prediction skipped: a held-out point has no tokens"
    if reason:
        check.notes.append(reason)
        return check
    law = check.law = fit_parametric(rest, delta=delta, settings=NO_BOOTSTRAP)
    ratio = TokensPerFlop.from_points(points)  # a design quantity of the sizes, not a measurement
    check.parametric_n_opt, _, check.parametric_l_opt = law.optimum_on_budget(
        held.budget, ratio.tokens, (float(log_params.min()), float(log_params.max())))
    check.points = [HeldOutPoint(name=p.name, params=p.params, tokens=p.tokens, measured=p.loss,
                                 predicted=float(law.predict(p.params, p.tokens))) for p in held_points]
    return check
