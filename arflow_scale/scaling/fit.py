"""Single power laws y = a * x^b (+ c) in log space, with t-distribution confidence intervals.

Fitted over all points together (loss vs params, loss vs FLOPs, FID vs FLOPs); the compute-optimal
analysis is in isoflop.py and parametric.py. Points: points.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np

from .points import ScalingPoint

MIN_SPREAD = 1.1  # max x / min x a power law needs: a narrower range gives an exponent of noise (or one of 1e3)


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
    interval: Literal["t", "bootstrap"] = "t"  # how a_interval / b_interval were obtained

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
    spread = float(xa.max() / xa.min())
    if spread < MIN_SPREAD:
        raise ValueError(f"fit {y_name}({x_name}): its {x_name} values span only {spread:.6g}x, under {MIN_SPREAD}x "
                         f"(the points of one FLOP budget differ only by rounding to whole steps)")
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


def fit_scaling_laws(points: Sequence[ScalingPoint], *, confidence: float = 0.95, irreducible: bool = False,
                     notes: Optional[list[str]] = None) -> dict[str, PowerLawFit]:
    """L(N), L(C) and (when enough points have one) FID(C), keyed loss_vs_params/loss_vs_flops/fid_vs_flops.

    A law the points cannot support (e.g. one FLOP budget: no spread in C) raises, or, given `notes`,
    is left out with its reason appended there.
    """
    if not points:
        raise ValueError("no scaling points to fit")
    with_fid = [p for p in points if p.fid is not None and math.isfinite(p.fid)]
    specs = {"loss_vs_params": (points, "params", "loss"), "loss_vs_flops": (points, "flops", "loss")}
    if len(with_fid) >= (4 if irreducible else 3):
        specs["fid_vs_flops"] = (with_fid, "flops", "fid")
    fits = {}
    for key, (chosen, x_name, y_name) in specs.items():
        try:
            fits[key] = fit_power_law([getattr(p, x_name) for p in chosen], [getattr(p, y_name) for p in chosen],
                                      x_name=x_name, y_name=y_name, confidence=confidence, irreducible=irreducible)
        except ValueError as err:
            if notes is None:
                raise
            notes.append(f"{key} skipped: {err}")
    return fits
