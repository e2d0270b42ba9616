"""Frechet distance: closed forms, agreement with scipy's sqrtm, singular covariances, small-sample warning."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg

from arflow_scale.eval.frechet import fid_from_stats, frechet_distance
from arflow_scale.eval.stats import GaussianStats


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    var1, var2 = rng.uniform(0.1, 3, size=32), rng.uniform(0.1, 3, size=32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_commuting_covariances_match_closed_form():
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    lam1, lam2 = rng.uniform(0.5, 2, size=16), rng.uniform(0.5, 2, size=16)
    sigma1, sigma2 = (basis * lam1) @ basis.T, (basis * lam2) @ basis.T
    expected = np.sum((np.sqrt(lam1) - np.sqrt(lam2)) ** 2)  # equal means
    assert frechet_distance(np.zeros(16), sigma1, np.zeros(16), sigma2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(np.ones(16), sigma1, np.ones(16), sigma1) == pytest.approx(0.0, abs=1e-10)


def test_general_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 40)), rng.normal(size=(40, 40))
    sigma1, sigma2 = a @ a.T / 40 + np.eye(40) * 0.1, b @ b.T / 40 + np.eye(40) * 0.1
    mu1, mu2 = rng.normal(size=40), rng.normal(size=40)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_singular_covariances_are_finite_and_stable():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 50)), rng.normal(size=(10, 50)) + 0.5  # 10 samples in 50 dims: rank 9
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    value = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    jitter = frechet_distance(x.mean(0), s1 + 1e-12 * np.eye(50), y.mean(0), s2 + 1e-12 * np.eye(50))
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(jitter, rel=1e-6)
    assert frechet_distance(x.mean(0), s1, x.mean(0), s1) == pytest.approx(0.0, abs=1e-6)


def test_fid_from_stats_warns_below_2048_samples():
    rng = np.random.default_rng(4)
    a = GaussianStats.from_features(rng.normal(size=(100, 8)))
    b = GaussianStats.from_features(rng.normal(size=(100, 8)) + 1.0)
    with pytest.warns(UserWarning, match="only 100 samples"):
        value = fid_from_stats(a, b)
    assert value == pytest.approx(frechet_distance(a.mean(), a.cov(), b.mean(), b.cov()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough samples: no warning
        assert fid_from_stats(a, b, min_samples=50) == value


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"expected \(D,\) and \(D, D\)"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_the_reference_is_factored_once_and_again_after_it_changes(monkeypatch, tmp_path):
    """Every FID against one reference reuses its eigendecomposition, also when the reference is loaded again (as
    each FID task loads it); new samples in it make a new one; a process keeps the last FACTORS_KEPT."""
    from collections import OrderedDict

    from arflow_scale.eval import frechet

    rng = np.random.default_rng(5)
    reference = GaussianStats.from_features(rng.normal(size=(60, 12)))
    calls = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda m: calls.append(m.shape) or eigh(m))
    monkeypatch.setattr(frechet, "_FACTORED", OrderedDict())  # nothing factored yet in this process
    samples = [GaussianStats.from_features(rng.normal(0.3 * i, 1.0, size=(40, 12))) for i in range(3)]
    for stats in samples:
        expected = frechet_distance(stats.mean(), stats.cov(), reference.mean(), reference.cov())
        assert fid_from_stats(stats, reference, min_samples=2) == pytest.approx(expected, rel=1e-9)
    assert len(calls) == 3 + 1  # one per frechet_distance above, one for the reference
    reference.save(str(tmp_path / "ref.npz"))
    loaded = GaussianStats.load(str(tmp_path / "ref.npz"))
    assert loaded is not reference and fid_from_stats(samples[1], loaded, min_samples=2) == \
        fid_from_stats(samples[1], reference, min_samples=2)
    assert len(calls) == 3 + 1  # the loaded copy has the same moments: no new factor
    reference.update(rng.normal(2.0, 1.0, size=(30, 12)))
    expected = frechet_distance(samples[0].mean(), samples[0].cov(), reference.mean(), reference.cov())
    assert fid_from_stats(samples[0], reference, min_samples=2) == pytest.approx(expected, rel=1e-9)
    assert len(calls) == 4 + 2
    assert frechet.FACTORS_KEPT == 2
    fid_from_stats(samples[0], samples[2], min_samples=2)  # a third reference: the first one's factor goes
    fid_from_stats(samples[0], loaded, min_samples=2)
    assert len(calls) == 4 + 2 + 2
