"""Frechet distance between Gaussians, in float64, robust to (near-)singular covariances.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}). With S1 = A A^T (A = V sqrt(L) over
the positive eigenpairs of S1), the non-zero eigenvalues of S1 S2 are those of the symmetric positive
semi-definite A^T S2 A, so the trace of the square root is sum_i sqrt(lambda_i) of a symmetric
eigenproblem: real and stable even when fewer samples than dimensions make the covariances singular
(and then only rank(S1) x rank(S1) in size).

The factor is the costly part (an eigendecomposition of a D x D matrix: 1.6 CPU-s at D = 2048 on one core here),
so `fid_from_stats` factors its second side (the reference, wherever there is one) once per process for equal
moments, however often they are loaded (each FID task and report loads the reference file anew), and reuses it for
every FID against that reference.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .stats import GaussianStats

log = logging.getLogger(__name__)

MIN_SAMPLES = 2048  # below this the 2048-d covariance is singular and FID is biased upwards


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """A (D, r) with A A^T = sigma over its r positive eigenvalues (round-off negatives dropped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    keep = eigenvalues > 0
    return eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])


def _check_moments(name: str, mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"frechet_distance: {name} has mu {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    return mu, (sigma + sigma.T) / 2


@dataclass(frozen=True)
class FactoredGaussian:
    """Checked moments mu (D,), sigma (D, D) with the PSD factor A (D, r) of sigma: one side of a distance."""

    mu: np.ndarray
    sigma: np.ndarray
    factor: np.ndarray

    @classmethod
    def of(cls, name: str, mu: np.ndarray, sigma: np.ndarray) -> "FactoredGaussian":
        mu, sigma = _check_moments(name, mu, sigma)
        return cls(mu, sigma, _psd_factor(sigma))


def _distance(mu: np.ndarray, sigma: np.ndarray, factored: FactoredGaussian) -> float:
    """Frechet distance of checked N(mu, sigma) and a factored Gaussian of the same dimension."""
    if mu.shape != factored.mu.shape:
        raise ValueError(f"frechet_distance: dimensions differ ({mu.shape[0]} vs {factored.mu.shape[0]})")
    middle = factored.factor.T @ sigma @ factored.factor
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu - factored.mu
    distance = diff @ diff + np.trace(sigma) + np.trace(factored.sigma) - 2.0 * trace_covmean
    return float(max(distance, 0.0))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D); float64 throughout."""
    first = FactoredGaussian.of("first Gaussian", mu1, sigma1)
    mu2, sigma2 = _check_moments("second Gaussian", mu2, sigma2)
    return _distance(mu2, sigma2, first)


FACTORS_KEPT = 2  # factored references a process keeps: each holds two D x D float64 arrays (64 MiB at D = 2048)
_FACTORED: "OrderedDict[bytes, FactoredGaussian]" = OrderedDict()


def factored_stats(stats: GaussianStats) -> FactoredGaussian:
    """`stats` factored; statistics with the same moments (a reference loaded again) reuse the factor, and new
    samples make a new one. The last FACTORS_KEPT factors are kept."""
    mu = np.ascontiguousarray(stats.mean(), dtype=np.float64)
    sigma = np.ascontiguousarray(stats.cov(), dtype=np.float64)
    digest = hashlib.blake2b(mu, digest_size=16)
    digest.update(sigma)
    key = digest.digest()
    factored = _FACTORED.pop(key, None)
    if factored is None:
        factored = FactoredGaussian.of("second Gaussian", mu, sigma)
    _FACTORED[key] = factored
    while len(_FACTORED) > FACTORS_KEPT:
        _FACTORED.popitem(last=False)
    return factored


def fid_from_stats(a: GaussianStats, b: GaussianStats, min_samples: int = MIN_SAMPLES) -> float:
    """FID between two feature statistics, `b` the reference (factored once, `factored_stats`); warns when a side
    with known count has < min_samples."""
    for name, stats in (("first", a), ("second", b)):
        if 0 < stats.count < min_samples:
            message = (f"FID from only {stats.count} samples ({name} set): fewer than {min_samples} makes the "
                       f"covariance singular and biases FID upwards; not comparable to FID-50k")
            warnings.warn(message, stacklevel=2)
            log.warning(message)
    mu, sigma = _check_moments("first Gaussian", a.mean(), a.cov())
    return _distance(mu, sigma, factored_stats(b))
