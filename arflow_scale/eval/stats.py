"""Mergeable Gaussian statistics of Inception features: float64 count, sum and sum of outer products.

Partial statistics computed by many tasks merge exactly (up to float64 rounding) into the statistics
of the whole set. Reference files in the ADM evaluator format (`mu`, `sigma`) load as fixed moments:
ADM's `VIRTUAL_imagenet{64,128,256,512}_labeled.npz` also hold `mu_s`/`sigma_s` (spatial features) and
their reference images (`arr_0`), which are never read.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np

from arflow_scale.data.storage import filesystem, with_retries, write_bytes

FORMAT_VERSION = 1
STATS_KEYS = ("count", "sum", "outer", "mu", "sigma")  # the arrays `load` reads; any others are skipped


class GaussianStats:
    """Running first and second moments of D-dim features (float64), mergeable across tasks.

    Either accumulated (count, sum (D,), sum of outer products (D, D)) or, for ADM-style reference
    files, fixed moments (mu, sigma) that can be compared against but not merged.
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"GaussianStats: dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)
        self._fixed: Optional[tuple[np.ndarray, np.ndarray]] = None

    @classmethod
    def from_features(cls, features: np.ndarray) -> "GaussianStats":
        """Statistics of features (N, D)."""
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"GaussianStats.from_features: expected (N, D) features, got shape {features.shape}")
        stats = cls(features.shape[1])
        stats.update(features)
        return stats

    @classmethod
    def from_moments(cls, mu: np.ndarray, sigma: np.ndarray, count: int = 0) -> "GaussianStats":
        """Fixed moments mu (D,), sigma (D, D), e.g. from an ADM reference file (count 0: unknown)."""
        mu = np.asarray(mu, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"GaussianStats.from_moments: mu must be (D,) and sigma (D, D), "
                             f"got {mu.shape} and {sigma.shape}")
        stats = cls(mu.shape[0])
        stats.count = int(count)
        stats._fixed = (mu, sigma)
        return stats

    @property
    def mergeable(self) -> bool:
        return self._fixed is None

    def update(self, features: np.ndarray) -> "GaussianStats":
        """Add a batch of features (N, D) in place; returns self."""
        if not self.mergeable:
            raise ValueError("GaussianStats.update: statistics loaded as fixed moments (mu, sigma) cannot be updated")
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"GaussianStats.update: expected features (N, {self.dim}), got shape {features.shape}")
        if not np.all(np.isfinite(features)):
            raise ValueError("GaussianStats.update: features contain NaN or inf")
        self.count += features.shape[0]
        self.sum += features.sum(axis=0)
        self.outer += features.T @ features
        return self

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        """A new GaussianStats holding both sets (exact: sums add)."""
        if not (self.mergeable and other.mergeable):
            raise ValueError("GaussianStats.merge: fixed moments (mu, sigma) cannot be merged; "
                             "only accumulated statistics (count, sum, outer) can")
        if other.dim != self.dim:
            raise ValueError(f"GaussianStats.merge: dims differ ({self.dim} vs {other.dim})")
        merged = GaussianStats(self.dim)
        merged.count = self.count + other.count
        merged.sum = self.sum + other.sum
        merged.outer = self.outer + other.outer
        return merged

    @staticmethod
    def merge_all(parts: list["GaussianStats"]) -> "GaussianStats":
        """Merge a non-empty list of partial statistics."""
        if not parts:
            raise ValueError("GaussianStats.merge_all: no statistics to merge")
        total = parts[0]
        for part in parts[1:]:
            total = total.merge(part)
        return total

    def mean(self) -> np.ndarray:
        """Mean (D,) float64."""
        if self._fixed is not None:
            return self._fixed[0]
        if self.count < 1:
            raise ValueError("GaussianStats.mean: no samples")
        return self.sum / self.count

    def cov(self) -> np.ndarray:
        """Unbiased covariance (D, D) float64 (ddof=1, as numpy.cov)."""
        if self._fixed is not None:
            return self._fixed[1]
        if self.count < 2:
            raise ValueError(f"GaussianStats.cov: need at least 2 samples, have {self.count}")
        mu = self.sum / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2  # exactly symmetric

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for an .npz: mu/sigma (ADM-compatible) plus the accumulators when mergeable."""
        arrays = {"mu": self.mean(), "sigma": self.cov(), "count": np.int64(self.count),
                  "format_version": np.int64(FORMAT_VERSION)}
        if self.mergeable:
            arrays.update(sum=self.sum, outer=self.outer)
        return arrays

    @classmethod
    def from_arrays(cls, arrays, source: str = "<arrays>") -> "GaussianStats":
        """Inverse of to_arrays; also accepts ADM reference files holding only `mu` and `sigma`."""
        keys = set(arrays.keys())
        if {"sum", "outer", "count"} <= keys:
            total = np.asarray(arrays["sum"], dtype=np.float64)
            stats = cls(total.shape[0])
            stats.count = int(arrays["count"])
            stats.sum = total
            stats.outer = np.asarray(arrays["outer"], dtype=np.float64)
            if stats.outer.shape != (stats.dim, stats.dim):
                raise ValueError(f"{source}: 'outer' has shape {stats.outer.shape}, expected {(stats.dim, stats.dim)}")
            return stats
        if {"mu", "sigma"} <= keys:
            count = int(arrays["count"]) if "count" in keys else 0
            try:
                return cls.from_moments(arrays["mu"], arrays["sigma"], count)
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None
        raise ValueError(f"{source}: not a statistics file: expected keys (count, sum, outer) or (mu, sigma), "
                         f"found {sorted(keys)}")

    def save(self, url: str, storage_options: Optional[dict] = None) -> None:
        """Write an .npz (local path or fsspec URL)."""
        buffer = io.BytesIO()
        np.savez(buffer, **self.to_arrays())
        write_bytes(url, buffer.getvalue(), storage_options)

    @classmethod
    def load(cls, url: str, storage_options: Optional[dict] = None) -> "GaussianStats":
        """Read statistics from an .npz written by `save` or an ADM reference batch (`mu`, `sigma`); only
        the statistics' arrays are read from storage (an ADM batch's images, `arr_0`, are not)."""
        fs, path = filesystem(url, storage_options)

        def read() -> dict[str, Optional[np.ndarray]]:
            with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
                return {key: npz[key] if key in STATS_KEYS else None for key in npz.files}  # others unread

        try:
            arrays = with_retries(read, url)
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{url}: statistics file not found") from None
        except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
            raise ValueError(f"{url}: not a readable .npz statistics file ({err})") from None
        return cls.from_arrays(arrays, source=url)

    def __repr__(self) -> str:
        kind = "accumulated" if self.mergeable else "fixed moments"
        return f"GaussianStats(dim={self.dim}, count={self.count}, {kind})"
