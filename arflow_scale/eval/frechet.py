"""Frechet distance between Gaussians, in float64, robust to (near-)singular covariances.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}). With S1 = A A^T (A = V sqrt(L) over
the positive eigenpairs of S1), the non-zero eigenvalues of S1 S2 are those of the symmetric positive
semi-definite A^T S2 A, so the trace of the square root is sum_i sqrt(lambda_i) of a symmetric
eigenproblem: real and stable even when fewer samples than dimensions make the covariances singular
(and then only rank(S1) x rank(S1) in size).
"""
from __future__ import annotations

import logging
import warnings

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


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D); float64 throughout."""
    mu1, sigma1 = _check_moments("first Gaussian", mu1, sigma1)
    mu2, sigma2 = _check_moments("second Gaussian", mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    factor = _psd_factor(sigma1)
    middle = factor.T @ sigma2 @ factor
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean
    return float(max(distance, 0.0))


def fid_from_stats(a: GaussianStats, b: GaussianStats, min_samples: int = MIN_SAMPLES) -> float:
    """FID between two feature statistics; warns when a side with known count has < min_samples."""
    for name, stats in (("first", a), ("second", b)):
        if 0 < stats.count < min_samples:
            message = (f"FID from only {stats.count} samples ({name} set): fewer than {min_samples} makes the "
                       f"covariance singular and biases FID upwards; not comparable to FID-50k")
            warnings.warn(message, stacklevel=2)
            log.warning(message)
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())
