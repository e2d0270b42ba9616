"""LatentVAE around a tiny random diffusers AutoencoderKL saved like a real one, and latent shards encoded
with it through `arflow data shards --vae` (checked against the raw AutoencoderKL, not our wrapper)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from arflow_scale.cli import main
from arflow_scale.data import SequenceStream, read_manifest
from arflow_scale.data.latents import draw_generators
from arflow_scale.data.sources import digits_source
from arflow_scale.model.vae import NOT_FOR_DECODING, LatentVAE, VaeIdentity, state_dict_sha256

SCALE = 0.37  # not SD's 0.18215: proves the factor is read from the VAE's config
IMAGE_SIZE = 16


def save_tiny_vae(folder: Path, seed: int = 0, **config) -> Path:
    """A random AutoencoderKL (about 4k parameters, 4x downsampling, 4 latent channels) saved with
    save_pretrained (safetensors unless safe_serialization=False is passed)."""
    from diffusers import AutoencoderKL

    safe = config.pop("safe_serialization", True)
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(4, 4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2,
                        sample_size=IMAGE_SIZE, scaling_factor=SCALE, **config)
    vae.save_pretrained(folder, safe_serialization=safe)
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


def raw_vae(folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, 3, H, W) in [-1, 1], grey repeated: what the writer feeds the VAE."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x.repeat(1, 3 // x.shape[1], 1, 1)


def stored_latents(url: str) -> dict[int, np.ndarray]:
    """Every .npy sample of a shard folder, by source index (the key's second part)."""
    out = {}
    for shard in read_manifest(url).shards:
        with tarfile.open(Path(url) / shard.path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".npy"):
                    out[int(member.name.split("_")[1].split(".")[0])] = np.load(
                        io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
    return out


def digits_npz(path: Path, count: int) -> tuple[str, np.ndarray, np.ndarray]:
    """The first `count` digits (8x8 grey) as an npz source -> (path, images (N, 8, 8, 1), labels)."""
    src = digits_source()
    images = np.stack([src.image(i) for i in range(count)])
    np.savez(path, images=images, labels=src.labels[:count])
    return str(path), images, src.labels[:count]


def shards_cli(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main(["data", "shards", *argv])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else {}), captured.err


# ----- the component -----
def test_load_identity_and_latent_shape(vae_dir, tmp_path):
    vae = LatentVAE.load(str(vae_dir), device="cpu")
    ident = vae.identity()
    assert (ident.scale_factor, ident.shift_factor, ident.latent_channels, ident.downsample, ident.image_channels,
            ident.encode_mode, ident.source) == (SCALE, 0.0, 4, 4, 3, "mean", str(vae_dir.resolve()))
    assert ident.weights_sha256 == state_dict_sha256(raw_vae(vae_dir)) and vae.device.type == "cpu"
    assert 1000 < sum(p.numel() for p in vae.vae.parameters()) < 10000
    assert vae.latent_shape(IMAGE_SIZE) == (4, 4, 4)
    with pytest.raises(ValueError, match="image size 10 is not a positive multiple of the VAE's downsampling 4"):
        vae.latent_shape(10)
    assert VaeIdentity.from_dict(json.loads(json.dumps(ident.to_dict()))) == ident
    with pytest.raises(ValueError, match="manifest.json: key 'scale_factor' has bad value -1"):
        VaeIdentity.from_dict({**ident.to_dict(), "scale_factor": -1}, where="manifest.json")
    overridden = LatentVAE.load(str(vae_dir), scale_factor=2.0, device="cpu").identity()
    assert overridden.scale_factor == 2.0 and ident.differences(overridden) == ["scale_factor: 0.37 != 2.0"]

    # Other weights, same config: only the weights hash tells them apart, and a mismatch names both.
    other_dir = save_tiny_vae(tmp_path / "other", seed=1)
    other = LatentVAE.load(str(other_dir), device="cpu").identity()
    assert other.config_sha256 == ident.config_sha256 and other.weights_sha256 != ident.weights_sha256
    with pytest.raises(ValueError, match=f"VAE mismatch between the loaded VAE \\({other_dir.resolve()}\\) and "
                                         f"the recorded VAE \\({vae_dir.resolve()}\\): weights_sha256"):
        LatentVAE.from_identity(ident, str(other_dir), device="cpu")
    assert LatentVAE.from_identity(ident, device="cpu").identity() == ident
    sampled = LatentVAE.load(str(vae_dir), encode_mode="sample", device="cpu").identity()
    assert sampled.differences(ident) == ["encode_mode: 'sample' != 'mean'"]
    sampled.require_same(ident, ignore=NOT_FOR_DECODING)  # decoding does not care how images were encoded


@pytest.mark.parametrize("shift", [None, 0.25], ids=["sd-no-shift", "shift"])
def test_scale_and_shift_applied_once_each_way(tmp_path, shift):
    """encode = (posterior mean - shift) * scale and decode(z) = raw decode(z / scale + shift), clamped:
    each factor exactly once, read from the config (0.37, 0.25), compared with the raw AutoencoderKL."""
    folder = save_tiny_vae(tmp_path / "vae", shift_factor=shift)
    vae, raw = LatentVAE.load(str(folder), device="cpu"), raw_vae(folder)
    assert vae.shift_factor == (shift or 0.0)
    x = torch.rand((3, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = raw.encode(x).latent_dist.mean
        z = torch.randn((3, 4, 4, 4), generator=torch.Generator().manual_seed(1))
        pixels = raw.decode(z / SCALE + (shift or 0.0)).sample
    latents = vae.encode(x, batch_size=2)
    torch.testing.assert_close(latents, (mean - (shift or 0.0)) * SCALE, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(latents, (mean - (shift or 0.0)) * SCALE ** 2, atol=1e-3)  # not scaled twice
    decoded = vae.decode(z, batch_size=2)
    torch.testing.assert_close(decoded, pixels.clamp(-1, 1), rtol=1e-5, atol=1e-6)
    assert decoded.abs().max() <= 1 and pixels.abs().max() > 1  # the clamp did something
    with pytest.raises(ValueError, match="images have 1 channels, the VAE .* takes 3"):
        vae.encode(x[:, :1])
    with pytest.raises(ValueError, match="must be a float tensor"):
        vae.encode((x * 127).to(torch.uint8))
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        LatentVAE.load(str(folder), encode_mode="sample", device="cpu").encode(x)


def test_bad_vae_sources_name_the_problem(vae_dir, tmp_path, capsys):
    missing = tmp_path / "no" / "such-vae"
    with pytest.raises(FileNotFoundError, match=f"VAE '{missing}': no such folder"):
        LatentVAE.load(str(missing))
    code, _, err = shards_cli(capsys, "--source", "digits", "--image-size", "16", "--vae", str(missing),
                              "--out", str(tmp_path / "out"))
    assert code == 2 and str(missing) in err and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        LatentVAE.load(str(tmp_path / "empty"))
    pickled = save_tiny_vae(tmp_path / "pickled", safe_serialization=False)  # .bin weights: never unpickled
    with pytest.raises(ValueError, match=f"VAE {pickled}: cannot load .* safetensors"):
        LatentVAE.load(str(pickled))
    config = json.loads((vae_dir / "config.json").read_text())
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="config.json: key '_class_name' is 'UNet2DModel'"):
        LatentVAE.load(str(tmp_path / "unet"))
    code, _, err = shards_cli(capsys, "--source", "digits", "--flip-copy", "--out", str(tmp_path / "o"))
    assert code == 2 and "--flip-copy: only with --vae" in err
    code, _, err = shards_cli(capsys, "--source", "digits", "--vae", str(vae_dir), "--out", str(tmp_path / "o"))
    assert code == 2 and "--vae needs --image-size" in err
    code, _, err = shards_cli(capsys, "--source", "digits", "--image-size", "16", "--vae", str(vae_dir),
                              "--vae-seed", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and "--vae-seed 1: only with --vae-encode sample" in err


# ----- latent shards -----
def test_digits_latent_shards_match_a_direct_encode(vae_dir, tmp_path, capsys):
    """All 1797 digits (16x16, grey repeated to RGB) through `arflow data shards --vae`: the stored
    latents are the raw AutoencoderKL's posterior means times the config's scale; the manifest says so."""
    url = str(tmp_path / "latents")
    code, result, _ = shards_cli(capsys, "--source", "digits", "--image-size", str(IMAGE_SIZE), "--vae", str(vae_dir),
                                 "--vae-batch-size", "256", "--samples-per-shard", "500", "--workers", "2",
                                 "--out", url)
    assert code == 0 and result["samples"] == 1797 and result["sample_shape"] == [4, 4, 4]
    manifest = read_manifest(url)
    expected_identity = LatentVAE.load(str(vae_dir), device="cpu").identity()
    assert manifest.latents.vae == expected_identity and manifest.latents.vae.scale_factor == SCALE
    assert (manifest.latents.latent_shape, manifest.latents.image_size, manifest.latents.flip_copy,
            manifest.latents.sample_seed) == ((4, 4, 4), IMAGE_SIZE, False, None)
    assert manifest.sample_ext == "npy" and manifest.dtype == "float32" and manifest.item_shape == (4, 4, 4)
    src = digits_source(IMAGE_SIZE)
    images = np.stack([src.image(i) for i in range(len(src))])
    with torch.no_grad():
        expected = (raw_vae(vae_dir).encode(to_unit(images)).latent_dist.mean * SCALE).numpy()
    stored = stored_latents(url)
    assert sorted(stored) == list(range(1797))
    np.testing.assert_allclose(np.stack([stored[i] for i in range(1797)]), expected, rtol=1e-5, atol=1e-6)
    images, labels = next(iter(SequenceStream.open(url, k=2, batch_size=3, flip=False)))
    assert images.shape == (3, 2, 4, 4, 4) and images.dtype == torch.float32
    assert main(["data", "inspect", url]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["latents"]["vae"] == expected_identity.to_dict()


def test_sample_mode_is_seeded_per_image(vae_dir, tmp_path, capsys):
    """--vae-encode sample: a rerun writes the same bytes; another worker count and VAE batch size the
    same draws (equal up to float rounding of batched convolutions); another seed other draws. Image i's
    latents are (mean + std * noise from its own (seed, i, 0) generator) * scale."""
    npz, images, _ = digits_npz(tmp_path / "d.npz", 30)
    common = ["--source", "npz", "--path", npz, "--image-size", str(IMAGE_SIZE), "--vae", str(vae_dir),
              "--vae-encode", "sample", "--samples-per-shard", "4"]
    runs = {}
    for name, extra in (("a", ["--vae-seed", "3", "--workers", "1", "--vae-batch-size", "5"]),
                        ("rerun", ["--vae-seed", "3", "--workers", "1", "--vae-batch-size", "5"]),
                        ("b", ["--vae-seed", "3", "--workers", "3", "--vae-batch-size", "2"]),
                        ("c", ["--vae-seed", "4"])):
        code, _, err = shards_cli(capsys, *common, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
        runs[name] = stored_latents(str(tmp_path / name))
    assert [s.sha256 for s in read_manifest(str(tmp_path / "a")).shards] == \
        [s.sha256 for s in read_manifest(str(tmp_path / "rerun")).shards]
    a, b, c = (np.stack([runs[n][i] for i in range(30)]) for n in ("a", "b", "c"))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.abs(a - c).mean() > 0.1 * SCALE  # other noise (the posterior std is about 1 here)
    manifest = read_manifest(str(tmp_path / "a"))
    assert manifest.latents.sample_seed == 3 and manifest.latents.vae.encode_mode == "sample"
    src = digits_source(IMAGE_SIZE)  # the npz holds the first 30 digits; resized as the writer resizes them
    x = to_unit(np.stack([src.image(i) for i in range(30)]))
    with torch.no_grad():
        posterior = raw_vae(vae_dir).encode(x).latent_dist
    noise = torch.cat([torch.randn((1, 4, 4, 4), generator=g) for g in draw_generators(3, np.arange(30), 0)])
    np.testing.assert_allclose(a, ((posterior.mean + posterior.std * noise) * SCALE).numpy(), rtol=1e-5, atol=1e-6)


def test_flip_copies_are_the_mirror_images_latents_and_the_stream_picks_them(vae_dir, tmp_path, capsys):
    npz, _, labels = digits_npz(tmp_path / "d.npz", 24)
    url = str(tmp_path / "flip")
    code, result, err = shards_cli(capsys, "--source", "npz", "--path", npz, "--image-size", str(IMAGE_SIZE),
                                   "--vae", str(vae_dir), "--flip-copy", "--samples-per-shard", "5", "--out", url)
    assert code == 0, err
    manifest = read_manifest(url)
    assert manifest.sample_shape == (2, 4, 4, 4) and manifest.item_shape == (4, 4, 4) and manifest.latents.flip_copy
    src = digits_source(IMAGE_SIZE)
    x = to_unit(np.stack([src.image(i) for i in range(24)]))
    raw = raw_vae(vae_dir)
    with torch.no_grad():
        as_is, mirrored = (raw.encode(v).latent_dist.mean.numpy() * SCALE for v in (x, x.flip(-1)))
    stored = stored_latents(url)
    np.testing.assert_allclose(np.stack([stored[i][0] for i in range(24)]), as_is, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack([stored[i][1] for i in range(24)]), mirrored, rtol=1e-5, atol=1e-6)
    assert not np.allclose(mirrored, as_is[..., ::-1], atol=1e-3)  # mirroring latents would not be the same

    def variants_seen(flip: bool) -> set[int]:
        """Which stored copy each streamed latent is (0 as is, 1 mirror image's), checking its class."""
        seen = set()
        it = iter(SequenceStream.open(url, k=2, batch_size=4, flip=flip, seed=5))
        for _ in range(6):
            batch, y = next(it)
            for sequence, label in zip(batch.numpy(), y.tolist()):
                for latent in sequence:
                    (match,) = [(i, v) for i in range(24) for v in (0, 1) if np.array_equal(stored[i][v], latent)]
                    assert labels[match[0]] == label
                    seen.add(match[1])
        it.close()
        return seen

    assert variants_seen(flip=True) == {0, 1} and variants_seen(flip=False) == {0}


def test_manifest_latents_field_reads_old_and_refuses_bad(vae_dir, tmp_path):
    npz, _, _ = digits_npz(tmp_path / "d.npz", 12)
    url = tmp_path / "lat"
    assert main(["data", "shards", "--source", "npz", "--path", npz, "--image-size", str(IMAGE_SIZE),
                 "--vae", str(vae_dir), "--out", str(url)]) == 0
    data = json.loads((url / "manifest.json").read_text())
    old = {k: v for k, v in data.items() if k != "latents"}  # a manifest written before the field existed
    (url / "manifest.json").write_text(json.dumps(old))
    assert read_manifest(str(url)).latents is None and read_manifest(str(url)).item_shape == (4, 4, 4)
    bad_scale = {**data, "latents": {**data["latents"], "vae": {**data["latents"]["vae"], "scale_factor": "x"}}}
    (url / "manifest.json").write_text(json.dumps(bad_scale))
    with pytest.raises(ValueError, match="manifest.json: latents.vae: key 'scale_factor' has bad value 'x'"):
        read_manifest(str(url))
    (url / "manifest.json").write_text(json.dumps({**data, "sample_shape": [4, 2, 2]}))
    with pytest.raises(ValueError, match=r"key 'latents' describes npy samples of shape \[4, 4, 4\], "
                                         r"the manifest has npy samples of shape \[4, 2, 2\]"):
        read_manifest(str(url))
