"""Mergeable Gaussian statistics: exact merging, numpy agreement, npz round trips (local, S3, ADM files)."""
from __future__ import annotations

import numpy as np
import pytest

from arflow_scale.eval.stats import GaussianStats


def _features(n: int = 500, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim))
    return (rng.gamma(2.0, 1.0, size=(n, dim)) @ mixing * 0.1 + 3.0).astype(np.float32)


def test_merged_from_four_tasks_equals_single_pass():
    features = _features()
    single = GaussianStats(features.shape[1]).update(features)
    parts = [GaussianStats.from_features(chunk) for chunk in np.array_split(features, 4)]
    merged = GaussianStats.merge_all(parts)
    assert merged.count == single.count == len(features)
    np.testing.assert_allclose(merged.mean(), single.mean(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(merged.cov(), single.cov(), rtol=0, atol=1e-10)
    # and both are the textbook moments
    np.testing.assert_allclose(single.mean(), features.astype(np.float64).mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(single.cov(), np.cov(features.astype(np.float64), rowvar=False), rtol=0, atol=1e-10)


def test_merge_is_order_independent_and_pairwise():
    features = _features(n=90, dim=8, seed=1)
    a, b, c = (GaussianStats.from_features(x) for x in np.array_split(features, 3))
    left = a.merge(b).merge(c)
    right = c.merge(a.merge(b))
    np.testing.assert_allclose(left.cov(), right.cov(), atol=1e-12)
    assert a.count == 30  # merge does not mutate its inputs


def test_save_load_round_trip_local_and_s3(tmp_path, s3_endpoint, make_bucket):
    stats = GaussianStats.from_features(_features(n=50, dim=16))
    for url in (str(tmp_path / "stats.npz"), f"s3://{make_bucket()}/ref/stats.npz"):
        stats.save(url)
        loaded = GaussianStats.load(url)
        assert loaded.mergeable and loaded.count == 50
        np.testing.assert_array_equal(loaded.outer, stats.outer)
        np.testing.assert_array_equal(loaded.cov(), stats.cov())
        with np.load(tmp_path / "stats.npz") as npz:  # ADM-readable keys are there too
            assert {"mu", "sigma"} <= set(npz.files)


def test_adm_reference_file_with_mu_sigma(tmp_path):
    rng = np.random.default_rng(2)
    mu, root = rng.normal(size=8), rng.normal(size=(8, 8))
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=mu, sigma=root @ root.T)
    ref = GaussianStats.load(str(tmp_path / "VIRTUAL_ref.npz"))
    assert not ref.mergeable and ref.count == 0
    np.testing.assert_array_equal(ref.mean(), mu)
    with pytest.raises(ValueError, match="cannot be merged"):
        ref.merge(GaussianStats.from_features(rng.normal(size=(4, 8))))


def test_adm_virtual_reference_batch_layout_reads_mu_sigma_only(tmp_path):
    """ADM's VIRTUAL_imagenet{128,256}_labeled.npz: arr_0 (reference images), mu, sigma, mu_s, sigma_s.
    Only mu and sigma are read: here arr_0 is an object array that cannot load without pickle."""
    rng = np.random.default_rng(3)
    mu, root = rng.normal(size=8), rng.normal(size=(8, 8))
    images = np.empty(2, dtype=object)
    images[:] = [np.zeros((4, 4, 3), np.uint8), None]
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=images, mu=mu, sigma=root @ root.T,
             mu_s=rng.normal(size=4), sigma_s=np.eye(4))
    ref = GaussianStats.load(str(tmp_path / "VIRTUAL_imagenet256_labeled.npz"))
    assert not ref.mergeable and ref.dim == 8
    np.testing.assert_array_equal(ref.mean(), mu)
    np.testing.assert_array_equal(ref.cov(), root @ root.T)


def test_bad_inputs_give_clear_errors(tmp_path):
    stats = GaussianStats(4)
    with pytest.raises(ValueError, match=r"expected features \(N, 4\)"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="at least 2 samples"):
        GaussianStats.from_features(np.zeros((1, 4))).cov()
    with pytest.raises(ValueError, match="dims differ"):
        GaussianStats(4).merge(GaussianStats(5))
    np.savez(tmp_path / "other.npz", arr_0=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"other.npz: not a statistics file.*arr_0"):
        GaussianStats.load(str(tmp_path / "other.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable"):
        GaussianStats.load(str(tmp_path / "junk.npz"))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        GaussianStats.load(str(tmp_path / "missing.npz"))
