"""The parametric law L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3).

Fitted as Chinchilla does: with a = ln A, b = ln B, e = ln E, minimise the Huber loss (delta 1e-3) of
LSE(a - alpha ln N, b - beta ln D, e) - ln L over the points, by L-BFGS from a grid of starting points.
The whole grid is scored in one vectorised pass and L-BFGS runs from its `top_k` best starts (running
it from all 5400 starts costs seconds per fit, too much for a bootstrap); a bootstrap refit starts from
the full-data optimum and its own best grid start. Under C = kND (any constant k) the loss-optimal
allocation is N_opt ~ C^a, D_opt ~ C^b with a = beta / (alpha + beta), b = alpha / (alpha + beta).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .bootstrap import BootstrapSettings, Estimate, bootstrap, single_threaded_blas
from .points import ScalingPoint

HUBER_DELTA = 1e-3
TOP_K = 16  # grid starts L-BFGS runs from in the full-data fit
MIN_POINTS = 6  # five parameters
# Chinchilla's grid of starting points (a, b, e, alpha, beta): 6 x 6 x 6 x 5 x 5 = 5400 starts.
GRID_AXES = (np.arange(0.0, 30.0, 5.0), np.arange(0.0, 30.0, 5.0), np.arange(-1.0, 2.0, 0.5),
             np.arange(0.0, 2.5, 0.5), np.arange(0.0, 2.5, 0.5))
START_GRID = np.array(list(itertools.product(*GRID_AXES)))  # rows in the order _grid_scores returns


def _log_prediction(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ln L-hat = LSE(a - alpha ln N, b - beta ln D, e) per point (n,) and its terms' softmax weights (n, 3).

    Written out rather than scipy.special.logsumexp/softmax: this runs thousands of times per bootstrap
    and the scipy calls' overhead doubled its time.
    """
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], -1)
    top = terms.max(-1, keepdims=True)
    exp = np.exp(terms - top)
    total = exp.sum(-1, keepdims=True)
    return (top + np.log(total))[:, 0], exp / total


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
    small = np.abs(residual) <= delta
    return np.where(small, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber loss of the log residuals and its gradient in theta (a, b, e, alpha, beta)."""
    log_pred, w = _log_prediction(theta, log_n, log_d)
    residual = log_pred - log_l
    dr = np.stack([w[:, 0], w[:, 1], w[:, 2], -w[:, 0] * log_n, -w[:, 1] * log_d], -1)  # (n, 5)
    slope = np.clip(residual, -delta, delta) / len(residual)
    return float(_huber(residual, delta).mean()), slope @ dr


def _minimise(start: np.ndarray, data: tuple, delta: float) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    res = minimize(_objective, start, args=(*data, delta), jac=True, method="L-BFGS-B",
                   options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
    return res.x, float(res.fun)


def _grid_scores(data: tuple, delta: float) -> np.ndarray:
    """Mean Huber loss at every START_GRID row: the terms A N^-alpha, B D^-beta, E are built per axis
    value and summed by broadcasting over (a, b, e, alpha, beta, point)."""
    log_n, log_d, log_l = data
    a, b, e, alpha, beta = GRID_AXES
    n_term = np.exp(a[:, None, None] - alpha[None, :, None] * log_n)  # (a, alpha, point)
    d_term = np.exp(b[:, None, None] - beta[None, :, None] * log_d)  # (b, beta, point)
    pred = (n_term[:, None, None, :, None, :] + d_term[None, :, None, None, :, :]
            + np.exp(e)[None, None, :, None, None, None])
    residual = np.log(pred).reshape(len(START_GRID), -1) - log_l
    return _huber(residual, delta).mean(-1)


def _grid_starts(data: tuple, delta: float, k: int) -> np.ndarray:
    """The k grid starts with the lowest objective."""
    return START_GRID[np.argsort(_grid_scores(data, delta), kind="stable")[:k]]


def _best_fit(starts: np.ndarray, data: tuple, delta: float) -> np.ndarray:
    fits = [_minimise(s, data, delta) for s in starts]
    return min(fits, key=lambda f: f[1])[0]


def _derived(theta: np.ndarray) -> np.ndarray:
    """[E, A, B, alpha, beta, a, b] of a fitted theta. A coefficient beyond float range (a resample's refit can
    run ln A past 709) is inf, which the bootstrap counts as a failed refit, not an error."""
    a, b, e, alpha, beta = theta
    total = alpha + beta
    with np.errstate(over="ignore"):
        coefficients = np.exp(np.array([e, a, b], dtype=float))
    return np.array([*coefficients, alpha, beta, beta / total if total else math.nan,
                     alpha / total if total else math.nan])


NAMES = ("E", "A", "B", "alpha", "beta", "a", "b")


@dataclass
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta with bootstrap intervals; a, b: optimal allocation exponents."""

    E: Estimate
    A: Estimate
    B: Estimate
    alpha: Estimate
    beta: Estimate
    a: Estimate  # N_opt ~ C^a
    b: Estimate  # D_opt ~ C^b
    huber: float  # mean Huber loss of the log residuals at the optimum
    r2: float  # of ln L
    n: int
    delta: float
    settings: BootstrapSettings
    resamples_used: int

    def predict(self, params: float | np.ndarray, tokens: float | np.ndarray) -> np.ndarray:
        """L at size N and tokens D (arrays broadcast)."""
        n, d = np.asarray(params, dtype=float), np.asarray(tokens, dtype=float)
        return self.E.value + self.A.value * n ** -self.alpha.value + self.B.value * d ** -self.beta.value

    def optimal_allocation(self, flops: float | np.ndarray, flops_per_param_token: float = 6.0
                           ) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising L under C = k N D (closed form; k = 6 is Kaplan's count, ARFlow's
        own is nearer 4.2). The exponents a, b do not depend on k, the coefficients do."""
        alpha, beta = self.alpha.value, self.beta.value
        g = (alpha * self.A.value / (beta * self.B.value)) ** (1.0 / (alpha + beta))
        scaled = np.asarray(flops, dtype=float) / flops_per_param_token
        return g * scaled ** self.a.value, scaled ** self.b.value / g

    def optimum_on_budget(self, flops: float, tokens_of, log_params_bounds: tuple[float, float]
                          ) -> tuple[float, float, float]:
        """(N, D, L) minimising L(N, tokens_of(flops, N)) over ln N within the bounds (any compute model)."""
        from scipy.optimize import minimize_scalar

        def loss(log_n: float) -> float:
            n = math.exp(log_n)
            return float(self.predict(n, tokens_of(flops, n)))

        res = minimize_scalar(loss, bounds=log_params_bounds, method="bounded", options={"xatol": 1e-6})
        n = math.exp(float(res.x))
        return n, float(tokens_of(flops, n)), float(res.fun)


def parametric_skip_reason(points: Sequence[ScalingPoint]) -> Optional[str]:
    """Why L(N, D) cannot be fitted to these points (no tokens, too few points), or None."""
    missing = [p for p in points if p.tokens is None]
    if missing:
        first = missing[0].name or f"params={missing[0].params:g}, flops={missing[0].flops:g}"
        return (f"parametric fit L(N, D) skipped: {len(missing)} of {len(points)} points have no tokens "
                f"(training tokens seen; first: {first}); add a `tokens` column or metric")
    if len(points) < MIN_POINTS:
        return f"parametric fit L(N, D) skipped: needs at least {MIN_POINTS} points, got {len(points)}"
    if len({p.params for p in points}) < 2 or len({p.tokens for p in points}) < 2:
        return "parametric fit L(N, D) skipped: needs at least two distinct params and two distinct tokens"
    return None


def fit_parametric(points: Sequence[ScalingPoint], *, delta: float = HUBER_DELTA, top_k: int = TOP_K,
                   settings: BootstrapSettings = BootstrapSettings()) -> ParametricFit:
    """Fit L(N, D) (Huber on ln L, L-BFGS from the best grid starts), bootstrap over points."""
    reason = parametric_skip_reason(points)
    if reason:
        raise ValueError(reason)
    log_n = np.log([p.params for p in points])
    log_d = np.log([p.tokens for p in points])
    log_l = np.log([p.loss for p in points])
    data = (log_n, log_d, log_l)
    with single_threaded_blas():
        theta = _best_fit(_grid_starts(data, delta, top_k), data, delta)

    def statistic(indices: np.ndarray) -> Optional[np.ndarray]:
        sample = tuple(x[indices] for x in data)
        if np.unique(sample[0]).size < 2 or np.unique(sample[1]).size < 2:
            return None
        return _derived(_best_fit(np.stack([theta, _grid_starts(sample, delta, 1)[0]]), sample, delta))

    with single_threaded_blas():
        run = bootstrap(statistic, [np.arange(len(points))], len(NAMES), settings)
    values = _derived(theta)
    log_pred, _ = _log_prediction(theta, log_n, log_d)
    total = float(np.sum((log_l - log_l.mean()) ** 2))
    r2 = 1.0 - float(np.sum((log_l - log_pred) ** 2)) / total if total > 0 else math.nan
    estimates = {name: run.estimate(values[i], i) for i, name in enumerate(NAMES)}
    huber = float(_huber(log_pred - log_l, delta).mean())
    return ParametricFit(**estimates, huber=huber, r2=r2, n=len(points), delta=delta, settings=settings,
                         resamples_used=run.succeeded)
