"""FARMER as a model family (fast, no Ray): its config section and validation, the task the infrastructure
calls (loss, sampling, FLOPs, parameters), the distillation stage's task, `arflow model info --family farmer`,
sweep sizes over FARMER's keys and the sampling benchmark."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from arflow_scale.cli import main
from arflow_scale.config import ConfigError, config_from_dict
from arflow_scale.model.config import farmer_args_of
from arflow_scale.model.farmer import FARMER
from arflow_scale.model.farmer_distill import FarmerOneStep, distill_loss
from arflow_scale.model.farmer_flops import count_student_parameters, forward_flops, student_forward_flops
from arflow_scale.model.farmer_sizes import farmer_args
from arflow_scale.tasks import FarmerDistillTask, FarmerTask, SampleSettings, task_for

from conftest import randomized

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["model.family=farmer", "model.k=1", "model.size=tiny/2", "model.image_size=8", "model.in_channels=1",
        "model.num_classes=10"]
UNGUIDED = SampleSettings(sampler="ode", steps=1, cfg_scale=1.0)


def farmer_cfg(*overrides: str):
    return config_from_dict({}, TINY + list(overrides))


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- the model section

def test_farmer_section_builds_the_registry_args_with_its_overrides():
    cfg = farmer_cfg("model.farmer.flow_width=48", "model.farmer.noise_std=0.05", "model.class_dropout=0.2")
    args = farmer_args_of(cfg.model)
    assert args == farmer_args("tiny/2", image_size=8, in_channels=1, num_classes=10, flow_width=48,
                               noise_std=0.05, class_dropout=0.2)
    assert args.flow_heads == 2 and args.prior_width == 32  # the rest from the registry entry


@pytest.mark.parametrize("overrides, message", [
    (["model.k=5"], "model.k: 5, but FARMER models one image per sample"),
    (["model.farmer.flow_width=30"], "model.farmer.flow_width: 30 not a multiple of 4"),
    (["model.farmer.prior_heads=3"], "model.farmer.prior_width: 32 not divisible by prior_heads=3"),
    (["model.size=XXL/16"], "model.size: 'XXL/16' is not NAME/PATCH"),
    (["model.size=S/3"], "model.image_size: 8 not a multiple of patch=3"),
    (["model.width=64"], "model.width: an ARFlow registry override"),
    (["model.activation_checkpointing=all"], "model.activation_checkpointing: 'all': FARMER has no"),
    (["model.farmer.informative_channels=9"], "model.farmer.informative_channels: 9 not in"),
    (["model.farmer.flow_widht=32"], "model.farmer.flow_widht: unknown key"),
    (["model.family=arflow", "model.k=5", "model.farmer.noise_std=0.1"],
     "model.farmer: FARMER's keys apply to model.family: farmer only"),
    (["eval.temperature=-0.5"], "eval.temperature: must be >= 0"),
    (["model.vae=runs/tiny-vae"], "model.vae: 'runs/tiny-vae': FARMER models pixels"),
])
def test_bad_farmer_sections_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        farmer_cfg(*overrides)


def test_arflow_functions_refuse_a_farmer_section():
    from arflow_scale.model import resolve

    with pytest.raises(ConfigError, match="family: resolve"):
        resolve(farmer_cfg().model)


# ---------------------------------------------------------------- the task

def test_task_registry_resolves_farmer_with_its_loss_metric_and_counts():
    cfg = farmer_cfg()
    task = task_for(cfg.model)
    assert isinstance(task, FarmerTask) and task.loss_metric == "bits_per_dim"
    assert (task.images_per_sample, task.tokens_per_image, task.image_shape) == (1, 16, (1, 8, 8))
    with torch.device("meta"):
        assert task.count_parameters() == numel(task.build_model())
    assert task.forward_flops() == forward_flops(task.args)
    guided = dataclasses.replace(UNGUIDED, cfg_scale=2.0)
    assert task.sample_flops(guided) > task.sample_flops(UNGUIDED) > 0


def test_task_loss_is_the_models_objective_on_single_image_samples():
    task = task_for(farmer_cfg().model)
    torch.manual_seed(0)
    model = randomized(task.build_model(), std=0.05)
    images, labels = torch.rand(4, 1, 1, 8, 8) * 2 - 1, torch.tensor([0, 3, 5, 9])
    loss = task.loss(model, images, labels, torch.Generator().manual_seed(1))
    expected = model.loss(images[:, 0], labels, torch.Generator().manual_seed(1))
    assert torch.equal(loss, expected) and loss.dim() == 0
    with pytest.raises(ValueError, match=r"one image per sample: images must be \(B, 1, C, H, W\)"):
        task.loss(model, images.expand(4, 2, 1, 8, 8), labels, torch.Generator())


def test_validation_losses_score_each_image_from_its_own_seed():
    """Held-out bits/dim per image: image b's dequantization from seeds[b] alone, no label dropped, so an
    image scores the same alone and in any batch; the distillation stage scores its student's pixel MSE."""
    from arflow_scale.tasks.farmer import dequantize_each

    task = task_for(farmer_cfg().model)
    torch.manual_seed(0)
    model = randomized(task.build_model(), std=0.05)
    images, labels = torch.rand(3, 1, 1, 8, 8) * 2 - 1, torch.tensor([2, 4, 6])
    batch = task.validation_losses(model, images, labels, [11, 12, 13])
    alone = task.validation_losses(model, images[1:2], labels[1:2], [12])
    assert batch.shape == (3,) and torch.allclose(batch[1:2], alone, rtol=1e-6)
    assert torch.allclose(alone[0], model.bits_per_dim(images[1, 0:1], labels[1:2], torch.Generator().manual_seed(12)))
    stage = task.student_task(task, model.state_dict())
    one_step = stage.build_model()
    mse = stage.validation_losses(one_step, images, labels, [11, 12, 13])
    x_tilde = dequantize_each(images[:, 0], [11, 12, 13])
    z, _ = stage.teacher.flow(x_tilde)
    assert torch.allclose(mse, (one_step.student(z) - x_tilde).pow(2).flatten(1).mean(dim=1))
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        dequantize_each(images[:, 0], [1, 2])


def test_task_sampling_reads_cfg_scale_and_temperature():
    task = task_for(farmer_cfg().model)
    torch.manual_seed(0)
    model = randomized(task.build_model(), std=0.05).eval()
    labels = torch.tensor([1, 2, 3])

    def draw(**settings):
        return task.sample(model, labels, dataclasses.replace(UNGUIDED, **settings), torch.Generator().manual_seed(4))

    plain = draw()
    assert plain.shape == (3, 1, 8, 8) and plain.min() >= -1 and plain.max() <= 1
    assert torch.equal(plain, model.sample(labels, generator=torch.Generator().manual_seed(4)))
    assert not torch.equal(plain, draw(temperature=0.5)) and not torch.equal(plain, draw(cfg_scale=3.0))


# ---------------------------------------------------------------- the distillation stage's task

def test_student_task_trains_only_the_student_against_the_frozen_teacher():
    task = task_for(farmer_cfg("model.farmer.student_depth=1").model)
    teacher_task = task_for(farmer_cfg().model)
    torch.manual_seed(0)
    teacher = randomized(teacher_task.build_model(), std=0.05)
    stage = task.student_task(teacher_task, teacher.state_dict())
    assert isinstance(stage, FarmerDistillTask) and stage.loss_metric == "distill_mse"
    model = stage.build_model()
    assert isinstance(model, FarmerOneStep) and set(model.state_dict()) == {
        f"student.{k}" for k in model.student.state_dict()}
    assert numel(model) == stage.count_parameters() == count_student_parameters(task.args)
    assert model.student.args.student_depth == 1
    assert stage.forward_flops() > student_forward_flops(task.args)
    assert all(not p.requires_grad for p in stage.teacher.parameters())
    for name, tensor in teacher.state_dict().items():  # the teacher carries the given weights
        assert torch.equal(stage.teacher.state_dict()[name], tensor)
    images, labels = torch.rand(3, 1, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2])
    loss = stage.loss(model, images, labels, torch.Generator().manual_seed(2))
    assert torch.equal(loss, distill_loss(model.student, stage.teacher.flow, images[:, 0], labels,
                                          torch.Generator().manual_seed(2)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in stage.teacher.parameters())
    # the stage samples like the joint model: same prior draws, one student pass for the inverse
    again = stage.model_from_weights(model.state_dict())
    one_step = stage.sample(again, labels, UNGUIDED, torch.Generator().manual_seed(5))
    assert torch.equal(one_step, teacher.eval().sample(labels, generator=torch.Generator().manual_seed(5),
                                                       student=again.student))


def test_distillation_pairs_from_the_prior_and_from_data():
    """distill_prior_fraction 0.5: the first half of the batch are prior samples against the sequential
    inverse, the rest (F(x~), x~); drawn from the generator in that documented order, weighted by count."""
    args = farmer_args("tiny/2", image_size=8, in_channels=1, num_classes=10, distill_prior_fraction=0.5)
    torch.manual_seed(0)
    teacher = randomized(FARMER(args), std=0.05)
    model = randomized(FarmerOneStep(teacher, args), std=0.02)
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(3)
    data = distill_loss(model.student, teacher.flow, x[2:], y[2:], g)
    z = teacher.prior.sample(y[:2], generator=g)
    prior = distill_loss(model.student, teacher.flow, z, y[:2])
    assert torch.allclose(model(x, y, torch.Generator().manual_seed(3)), (prior + data) / 2, rtol=1e-6)
    with pytest.raises(ConfigError, match="model.farmer.distill_prior_fraction: must be in"):
        farmer_cfg("model.farmer.distill_prior_fraction=1.5")


def test_student_task_refuses_a_teacher_that_does_not_fit():
    task = task_for(farmer_cfg().model)
    other = task_for(farmer_cfg("model.farmer.flow_width=48").model)
    with pytest.raises(ValueError, match=r"distill.teacher: .*flow_width 48 \(this run: 32\)"):
        task.student_task(other, other.build_model().state_dict())
    arflow = task_for(config_from_dict({}, ["model.image_size=8", "model.in_channels=1"]).model)
    with pytest.raises(ValueError, match="distill.teacher: a model.family arflow checkpoint"):
        task.student_task(arflow, {})
    with pytest.raises(ValueError, match="distill.teacher: model.family arflow has no distillation stage"):
        arflow.student_task(task, {})


def test_pin_teacher_names_the_key(tmp_path):
    from arflow_scale.checkpoint import pin_teacher

    cfg = farmer_cfg()
    assert pin_teacher(cfg) is cfg  # no teacher: nothing to do
    with pytest.raises(ConfigError, match=r"distill.teacher: .*neither a checkpoint"):
        pin_teacher(farmer_cfg(f"distill.teacher={tmp_path}/nothing"))


# ---------------------------------------------------------------- the command line and sweeps

def test_model_info_farmer_equals_the_built_model(capsys):
    argv = ["model", "info", "--family", "farmer", "--size", "B/8", "--image-size", "64", "--num-classes", "100"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out.strip())
    args = farmer_args("B/8", image_size=64, in_channels=3, num_classes=100)
    with torch.device("meta"):
        model = FARMER(args)
        student = FarmerOneStep(model, args)
    assert info["params"] == numel(model) == info["flow_params"] + info["prior_params"]
    assert info["student_params"] == numel(student)
    assert info["forward_flops"] == forward_flops(args) and info["train_flops"] == 3 * forward_flops(args)
    assert (info["family"], info["tokens_per_image"], info["token_dim"]) == ("farmer", 64, 192)
    assert (info["sample_steps_prior"], info["sample_steps_flow_inverse"]) == (65, 4 * 63)
    assert main(["model", "info", "--family", "farmer", "--depth", "3"]) == 2
    assert "model.farmer keys" in capsys.readouterr().err


def test_farmer_cpu_sweep_expands_sizes_over_farmer_keys(tmp_path):
    from pathlib import Path

    from arflow_scale.scaling.sweep import expand, flops_per_step, load_sweep

    path = Path(__file__).resolve().parents[1] / "configs/sweeps/farmer-cpu.yaml"
    sweep, folder = load_sweep(path, [f"storage_path={tmp_path}"])
    points = expand(sweep, folder)
    assert [p.name for p in points[:2]] == ["farmer-cpu-f16-s60", "farmer-cpu-f16-s120"]
    for p in points:
        task = task_for(p.config.model)
        assert isinstance(task, FarmerTask) and p.coords["size"] in ("f16", "tiny", "f64")
        assert p.params == task.count_parameters()
        assert p.flops_per_step == flops_per_step(p.config) == 3 * task.forward_flops() * 64
        assert p.tokens == p.images * 16 and p.images == 64 * p.steps
    params = [p.params for p in points[::2]]
    assert params == sorted(params) and len(set(params)) == 3
    with pytest.raises(ConfigError, match="name: required when a size has no depth/width"):
        load_sweep(path, [f"storage_path={tmp_path}", "sizes=[{model: {farmer.flow_width: 16}}]"])


def test_sample_speed_compares_both_inverses_on_the_same_prior_draws():
    from arflow_scale.bench.sampling import sample_speed

    args = farmer_args("tiny/2", image_size=8, in_channels=1, num_classes=10)
    torch.manual_seed(0)
    teacher = randomized(FARMER(args), std=0.05).eval()
    model = FarmerOneStep(teacher, args).eval()  # the untrained student: the identity map
    labels = torch.arange(6)
    speed = sample_speed(model, labels, rounds=1, seed=3)
    slow = teacher.sample(labels, generator=torch.Generator().manual_seed(3))
    fast = model.sample(labels, generator=torch.Generator().manual_seed(3))
    assert speed.mean_abs_diff == pytest.approx(float((fast - slow).abs().mean()))
    assert speed.mean_abs_diff > 0 and speed.images == 6
    assert min(dataclasses.astuple(speed.wall)) > 0 and min(dataclasses.astuple(speed.cpu)) > 0
    assert speed.to_json()["speedup"] == pytest.approx(speed.wall.sequential / speed.wall.student)
