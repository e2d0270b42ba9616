"""FARMER through the whole system on a real local Ray, 2 CPU workers, real DeepSpeed engines and MLflow:
`arflow train` with configs/farmer-demo.yaml lowers the logged bits/dim, a crashed run resumes bit-identically
(ZeRO-3), `arflow sample` and the FID tasks run on its checkpoint, and the distillation stage trains a one-step
inverse that reproduces the teacher's sequential inverse (docs/farmer.md §8)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from arflow_scale.cli import main

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["tracking.system_metrics=false", "train.log_every=10"]
TEACHER_STEPS = 200
TEACHER_OVERRIDES = [f"train.steps={TEACHER_STEPS}", "checkpoint.every=100", "train.sample_every=100",
                     "optim.warmup_steps=20"]
BITS_PER_DIM_BELOW = 6.8  # mean logged bits/dim of the last 50 steps (uniform pixels: 8; measured here: 6.38)
# Mean |student(z) - inverse(z)| of the kept (clamped) pixels in [-1, 1] on test latents, and the share of the
# identity map's error it must stay under. Measured here after 160 steps on a 200-step teacher: 0.110 on prior
# samples (identity 0.258), 0.072 on digits' latents (identity 0.143). The demo's longer stage on its longer
# teacher reaches 0.061 and 0.036 (docs/farmer.md §13).
STUDENT_ERROR_BELOW = {"prior": 0.15, "data": 0.1}
OF_IDENTITY = {"prior": 0.5, "data": 0.6}


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def history(result: dict, metric: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    by_step: dict[int, list[float]] = {}
    for m in MlflowClient(result["mlflow_tracking_uri"]).get_metric_history(result["mlflow_run_id"], metric):
        by_step.setdefault(m.step, []).append(m.value)
    return by_step


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from arflow_scale.data import write_shards

    root = tmp_path_factory.mktemp("farmer")
    write_shards("digits", str(root / "digits"), samples_per_shard=64, val_per_class=5, progress=False)
    return root


def train_config(root: Path, config: str, name: str, *overrides: str) -> dict:
    """`arflow train`'s work in-process (module fixtures cannot capture stdout): its result JSON."""
    from arflow_scale.config import load_config
    from arflow_scale.train.driver import train

    cfg = load_config(CONFIGS / config, [f"run.storage_path={root}/runs", f"run.name={name}",
                                         f"data.manifest={root}/digits", *QUIET, *overrides])
    return train(cfg).to_json()


def cli_train(capsys, config: str, root: Path, name: str, *overrides: str) -> dict:
    assert main(["train", "--config", str(CONFIGS / config), f"run.storage_path={root}/runs", f"run.name={name}",
                 f"data.manifest={root}/digits", *QUIET, *overrides]) == 0
    return last_json(capsys)


@pytest.fixture(scope="module")
def teacher(ray_local, workspace):
    """configs/farmer-demo.yaml for 200 steps (ZeRO-2), with sample grids at 100 and 200."""
    return train_config(workspace, "farmer-demo.yaml", "teacher", *TEACHER_OVERRIDES)


def test_training_lowers_the_logged_bits_per_dim(teacher, workspace):
    from mlflow.tracking import MlflowClient

    bits = history(teacher, "bits_per_dim")
    assert sorted(bits) == list(range(10, TEACHER_STEPS + 1, 10))
    assert bits[10][0] > 8.0  # the identity flow and a fresh prior: above uniform pixels
    late = [v[0] for step, v in bits.items() if step > TEACHER_STEPS - 50]
    assert np.mean(late) < BITS_PER_DIM_BELOW, late
    assert teacher["final_step"] == TEACHER_STEPS and teacher["final_loss"] == pytest.approx(bits[TEACHER_STEPS][0])
    # held-out bits/dim of the 50 validation digits (uniform dequantization, no label dropped), raw and EMA
    assert 0 < teacher["val_loss"] < BITS_PER_DIM_BELOW and 0 < teacher["val_loss_ema"] < 8.0, teacher
    client = MlflowClient(teacher["mlflow_tracking_uri"])
    grids = [a.path for a in client.list_artifacts(teacher["mlflow_run_id"], "samples")]
    assert grids == ["samples/ema_step_0000100.png", "samples/ema_step_0000200.png"]
    assert client.get_run(teacher["mlflow_run_id"]).data.params["model.family"] == "farmer"
    # launched again, the finished run reports its final state from its last checkpoint's record (no workers)
    again = train_config(workspace, "farmer-demo.yaml", "teacher", *TEACHER_OVERRIDES)
    assert {**again, "images_per_s": None} == {**teacher, "images_per_s": None}


def test_crash_resumes_bit_identical_under_zero3(ray_local, workspace, capsys):
    short = ["train.steps=6", "checkpoint.every=2", "train.log_every=1", "train.sample_every=0",
             "train.zero_stage=3", "data.batch_size=8"]
    reference = cli_train(capsys, "farmer-demo.yaml", workspace, "z3ref", *short)
    crashed = cli_train(capsys, "farmer-demo.yaml", workspace, "z3crash", *short, "run.max_failures=1",
                        "faults.crash_rank_at_step=3", "faults.rank=1")
    assert crashed["final_step"] == reference["final_step"] == 6
    for key in ("params_sha256", "ema_sha256", "final_loss"):
        assert crashed[key] == reference[key], key
    ours, theirs = history(crashed, "bits_per_dim"), history(reference, "bits_per_dim")
    assert sorted(ours) == list(range(1, 7)) and len(ours[3]) == 1  # step 3 ran twice, logged once
    assert all(values == [theirs[step][0]] * len(values) for step, values in ours.items())
    assert [p.name for p in (workspace / "runs" / "z3crash" / "faults").iterdir()] == ["crash-rank1-step3"]


def test_sample_cli_guided_and_unguided(teacher, workspace, capsys):
    from PIL import Image

    grids = {}
    for name, extra in (("plain", []), ("guided", ["--cfg-scale", "3.0", "--temperature", "0.8"])):
        out = workspace / f"{name}.png"
        assert main(["sample", "--checkpoint", teacher["checkpoint"], "--labels", "0,1,2,3,4", "--out", str(out),
                     "--seed", "3", *extra]) == 0
        printed = last_json(capsys)
        grids[name] = np.asarray(Image.open(out))
        assert grids[name].shape[1] > grids[name].shape[0] > 0 and grids[name].std() > 0
    assert printed["cfg_scale"] == 3.0 and printed["temperature"] == 0.8
    assert not np.array_equal(grids["plain"], grids["guided"])
    assert main(["sample", "--checkpoint", teacher["checkpoint"], "--labels", "10", "--out",
                 str(workspace / "bad.png")]) == 2
    assert "outside 0..9" in capsys.readouterr().err


def test_fid_tasks_on_a_farmer_checkpoint(teacher, workspace, capsys):
    from arflow_scale.eval.reference import image_set_stats

    ref = workspace / "ref16.npz"
    image_set_stats(str(workspace / "digits"), num=16, batch_size=16, progress=False).save(str(ref))
    assert main(["fid", "model", "--checkpoint", teacher["checkpoint"], "--num-samples", "16", "--tasks", "2",
                 "--ref", str(ref), "--batch-size", "16", "--sample-batch-size", "8", "--no-progress"]) == 0
    result = last_json(capsys)
    assert result["n"] == 16 and math.isfinite(result["fid"]) and result["fid"] > 0
    fid = history(teacher, "fid")
    assert fid == {TEACHER_STEPS: [pytest.approx(result["fid"])]}  # logged to the training run at its step


@pytest.fixture(scope="module")
def student(teacher, workspace):
    """configs/farmer-distill-demo.yaml from the teacher's run folder; rank 1 crashes after step 90 and the
    stage continues from its step-80 checkpoint."""
    return train_config(workspace, "farmer-distill-demo.yaml", "student", f"distill.teacher={workspace}/runs/teacher",
                        "train.steps=160", "checkpoint.every=80", "train.sample_every=0", "run.max_failures=1",
                        "faults.crash_rank_at_step=90", "faults.rank=1")


def test_distilled_student_reproduces_the_teachers_inverse(teacher, student, workspace):
    from arflow_scale.checkpoint import load_ema_weights, read_config, run_task
    from arflow_scale.eval.images import load_images
    from arflow_scale.model.farmer import dequantize
    from arflow_scale.model.farmer_distill import FarmerOneStep
    from arflow_scale.model.farmer_flow import unpatchify

    assert student["final_step"] == 160
    assert 0 < student["val_loss"] < 0.05, student  # held-out pixel MSE on exact data pairs
    run_cfg = read_config(student["checkpoint"])
    assert run_cfg.distill.teacher == teacher["checkpoint"]  # the run folder, pinned to its newest checkpoint
    # resumed after the crash: the replayed steps 81..90 are not logged again (step 90 once), every step once
    mse = history(student, "distill_mse")
    assert {90, 100, 110, 120, 160} <= set(mse) and all(len(values) == 1 for values in mse.values())
    cfg, ema = load_ema_weights(student["checkpoint"])
    model = run_task(cfg).model_from_weights(ema)
    assert isinstance(model, FarmerOneStep) and model.student.args.student_depth == 4
    images = torch.from_numpy(load_images(f"{workspace}/digits", limit=64)[..., :1]).permute(0, 3, 1, 2)
    with torch.no_grad():  # test latents: the teacher prior's samples and digits under fresh dequantization noise
        prior = model.teacher.prior.sample(torch.arange(64) % 10, generator=torch.Generator().manual_seed(7))
        data, _ = model.teacher.flow(dequantize(images.float() / 127.5 - 1, torch.Generator().manual_seed(8)))
        latents = {"prior": prior, "data": data}
        for name, z in latents.items():
            target = model.teacher.flow.inverse(z).clamp(-1, 1)  # what sampling keeps
            error = (model.student(z).clamp(-1, 1) - target).abs().mean().item()
            identity = (unpatchify(z, 2, 1).clamp(-1, 1) - target).abs().mean().item()
            print(f"student error on {name} latents: {error:.4f} (identity {identity:.4f})")
            assert error < STUDENT_ERROR_BELOW[name] and error < OF_IDENTITY[name] * identity, (name, error, identity)


def test_distilled_stage_samples_through_the_cli_and_fid_tasks(student, workspace, capsys):
    from arflow_scale.eval.graph import FidPlan, sample_images

    assert main(["bench", "sampling", "--checkpoint", student["checkpoint"], "--batch", "8", "--rounds", "1"]) == 0
    speed = last_json(capsys)
    assert speed["images"] == 8 and speed["mean_abs_diff"] < STUDENT_ERROR_BELOW["prior"]
    assert speed["wall"]["sequential"] > 0 and speed["cpu"]["student"] > 0
    out = workspace / "student.png"
    assert main(["sample", "--checkpoint", f"{workspace}/runs/student", "--labels", "0,1,2", "--out", str(out)]) == 0
    images = sample_images(student["checkpoint"], 0, 4, FidPlan.of(num_samples=4, tasks=1))
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8


def test_a_relaunch_with_another_teacher_is_refused(teacher, student, workspace):
    from arflow_scale.schema import ConfigError

    other = f"{workspace}/runs/teacher/checkpoint_000000100"
    with pytest.raises(ConfigError, match=r"distill.teacher: .*checkpoint_000000100, but the run continues from "):
        train_config(workspace, "farmer-distill-demo.yaml", "student", f"distill.teacher={other}", "train.steps=300")


def test_export_and_an_exported_teacher_serves_the_stage(teacher, workspace):
    from arflow_scale.checkpoint import export_checkpoint, load_ema_weights, pin_teacher, run_task
    from arflow_scale.config import load_config

    exported = workspace / "teacher.safetensors"
    info = export_checkpoint(teacher["checkpoint"], str(exported))  # consolidated from ZeRO-2's partitions
    assert (info["params_sha256"], info["ema_sha256"]) == (teacher["params_sha256"], teacher["ema_sha256"])
    cfg = pin_teacher(load_config(CONFIGS / "farmer-distill-demo.yaml", [f"distill.teacher={exported}"]))
    assert cfg.distill.teacher == str(exported)
    weights = load_ema_weights(teacher["checkpoint"]).weights
    stage = run_task(cfg)
    assert all(torch.equal(stage.teacher.state_dict()[name], tensor) for name, tensor in weights.items())
