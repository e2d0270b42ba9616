"""Image sets for FID: npz / PNG folder / shard folder loading, batching, conversion, ADM-style npz output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from arflow_scale.eval.images import as_uint8_rgb, iter_image_batches, load_images, save_npz, source_kind
from arflow_scale.eval.inception import to_uint8_images


def test_as_uint8_rgb_layouts():
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    rgb = as_uint8_rgb(grey)
    assert rgb.shape == (2, 4, 4, 3) and np.all(rgb[..., 0] == grey) and np.all(rgb[..., 2] == grey)
    np.testing.assert_array_equal(as_uint8_rgb(grey[:, None]), rgb)  # N1HW
    nchw = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 5), dtype=np.uint8)
    np.testing.assert_array_equal(as_uint8_rgb(nchw), nchw.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="must be uint8, got float32"):
        as_uint8_rgb(grey.astype(np.float32), "x.npz")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        as_uint8_rgb(np.zeros((2, 5, 5, 4), np.uint8))


def test_to_uint8_images_maps_minus_one_one_to_0_255():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    out = to_uint8_images(x)
    assert out.shape == (1, 1, 5, 1) and out.dtype == torch.uint8
    assert out.flatten().tolist() == [0, 0, 128, 255, 255]


def test_npz_batches_limit_and_round_trip_on_s3(tmp_path, s3_endpoint, make_bucket):
    images = np.random.default_rng(1).integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
    url = f"s3://{make_bucket()}/samples.npz"
    save_npz(images, url)
    assert source_kind(url) == "npz"
    batches = list(iter_image_batches(url, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert [len(b) for b in iter_image_batches(url, batch_size=4, limit=5)] == [4, 1]
    np.savez(tmp_path / "imgs.npz", images=images[:, :, :, 0])  # `images` key, grey
    assert load_images(str(tmp_path / "imgs.npz")).shape == (10, 6, 6, 3)


def test_png_folder_and_shard_folder(tmp_path):
    from arflow_scale.data import write_shards

    folder = tmp_path / "pngs"
    folder.mkdir()
    images = np.random.default_rng(2).integers(0, 256, (5, 7, 7, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("ignored")
    assert source_kind(str(folder)) == "folder"
    np.testing.assert_array_equal(load_images(str(folder)), images)

    write_shards("digits", str(tmp_path / "shards"), samples_per_shard=100, progress=False)
    assert source_kind(str(tmp_path / "shards")) == "manifest"
    assert source_kind(str(tmp_path / "shards" / "manifest.json")) == "manifest"
    subset = load_images(str(tmp_path / "shards"), limit=30)
    assert subset.shape == (30, 8, 8, 3) and np.all(subset[..., 0] == subset[..., 1])
    # a shard whose bytes changed (same size) is refused, naming it, not measured
    shard = sorted((tmp_path / "shards" / "shards").glob("*.tar"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{shard.name}: shard does not match its manifest"):
        load_images(str(tmp_path / "shards"), limit=30)


def test_bad_image_sets_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here: image set not found"):
        load_images(str(tmp_path / "nothing-here"))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"stats.npz: no images.*'arr_0'.*\['mu'\]"):
        load_images(str(tmp_path / "stats.npz"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="images differ in size"):
        load_images(str(mixed))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="no image files"):
        load_images(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not png")
    with pytest.raises(ValueError, match="x.png: not a readable image"):
        load_images(str(tmp_path / "broken"))
