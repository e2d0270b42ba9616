"""Seeded bootstrap over points: resample (optionally within strata), refit, percentile intervals.

Every fit of the compute-optimal analysis reports `Estimate`s: the full-data value and a percentile
interval from refitting on resampled points (Efron's percentile bootstrap).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

DEFAULT_RESAMPLES = 500
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95
MIN_SUCCESS_FRACTION = 0.5  # fewer successful refits of a statistic than this: its interval is undefined (nan)


@dataclass(frozen=True)
class Estimate:
    """A fitted value with its bootstrap percentile interval (nan, nan when undefined)."""

    value: float
    interval: tuple[float, float] = (float("nan"), float("nan"))

    def to_dict(self) -> dict:
        return {"value": self.value, "interval": list(self.interval)}


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are drawn: resamples (0 = none), the seed, the confidence level."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self):
        if self.resamples < 0:
            raise ValueError(f"bootstrap resamples must be >= 0, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"bootstrap confidence must be in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class BootstrapRun:
    """The refitted statistics (resamples x statistics, nan where a refit failed) and how many succeeded."""

    samples: np.ndarray
    succeeded: int
    settings: BootstrapSettings

    def share(self, column: int) -> float:
        """Fraction of the resamples whose refit gave statistic `column` (nan without resamples)."""
        if self.settings.resamples == 0:
            return float("nan")
        return float(np.isfinite(self.samples[:, column]).sum()) / self.settings.resamples

    def interval(self, column: int) -> tuple[float, float]:
        """Percentile interval of statistic `column` (nan, nan if too few refits gave it)."""
        values = self.samples[:, column] if self.samples.size else np.empty(0)
        values = values[np.isfinite(values)]
        if self.settings.resamples == 0 or values.size < MIN_SUCCESS_FRACTION * self.settings.resamples:
            return float("nan"), float("nan")
        tail = 50.0 * (1.0 - self.settings.confidence)
        lo, hi = np.percentile(values, [tail, 100.0 - tail])
        return float(lo), float(hi)

    def estimate(self, value: float, column: int) -> Estimate:
        return Estimate(float(value), self.interval(column))


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS on one thread: the fits are many tiny problems (5 variables, tens of points) where BLAS
    threads only add wake-ups (an L(N, D) bootstrap ran 6x slower with them on 2 busy cores)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def resample_indices(rng: np.random.Generator, strata: Sequence[np.ndarray]) -> np.ndarray:
    """Indices drawn with replacement within each stratum, as many as it holds (1-d int array)."""
    return np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])


def bootstrap(statistic: Callable[[np.ndarray], Optional[np.ndarray]], strata: Sequence[np.ndarray],
              n_statistics: int, settings: BootstrapSettings) -> BootstrapRun:
    """Call `statistic(indices)` on `settings.resamples` resamples of the points.

    `statistic` returns a vector of `n_statistics` floats (nan for one it could not fit) or None when
    the resample cannot be fitted at all; `strata` are index arrays (one array: plain bootstrap).
    """
    rng = np.random.default_rng(settings.seed)
    samples = np.full((settings.resamples, n_statistics), np.nan)
    succeeded = 0
    for i in range(settings.resamples):
        values = statistic(resample_indices(rng, strata))
        if values is not None:
            samples[i] = values
            succeeded += 1
    return BootstrapRun(samples=samples, succeeded=succeeded, settings=settings)
