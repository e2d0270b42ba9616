"""Fast tests of the training components (no Ray): DeepSpeed config, schedule, seeding, EMA, clipping,
fault markers, grids, driver storage and inputs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from arflow_scale.config import config_from_dict


def tiny_cfg(*overrides: str):
    return config_from_dict({}, ["model.size=tiny/2", "model.image_size=8", "model.in_channels=1", "model.k=3",
                                 *overrides])


def test_deepspeed_config_batches_zero_precision_clipping():
    from arflow_scale.train.deepspeed_config import build_deepspeed_config, resolve_precision

    cfg = tiny_cfg("data.batch_size=4", "train.grad_accum=3", "train.zero_stage=3", "optim.clip=norm",
                   "optim.clip_value=1.5", "optim.lr=2e-4")
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 1.5
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True
    assert opt["params"]["betas"] == [0.9, 0.95] and opt["params"]["lr"] == 2e-4
    assert not ds["bf16"]["enabled"]
    assert build_deepspeed_config(tiny_cfg(), 1, "cuda")["bf16"]["enabled"]
    assert build_deepspeed_config(tiny_cfg("optim.clip=value"), 1)["gradient_clipping"] == 0.0
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("fp32", "cuda") == "fp32"


def test_overlap_comm_is_on_with_several_gpus_off_on_cpu_and_as_set():
    from arflow_scale.train.deepspeed_config import build_deepspeed_config
    from arflow_scale.train.engine import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    def effective(stage: int, world: int, device: str, *extra: str) -> bool:
        """overlap_comm as DeepSpeed resolves our zero_optimization section."""
        zero = build_deepspeed_config(tiny_cfg(f"train.zero_stage={stage}", *extra), world, device)
        return DeepSpeedZeroConfig(**zero["zero_optimization"]).overlap_comm

    assert effective(1, 8, "cuda") is True and effective(2, 8, "cuda") is True
    assert effective(2, 1, "cuda") is False and effective(2, 2, "cpu") is False  # one GPU; gloo
    assert effective(3, 2, "cpu") is True  # DeepSpeed's own ZeRO-3 default, left as it was
    assert effective(2, 8, "cuda", "train.overlap_comm=false") is False
    assert effective(3, 2, "cpu", "train.overlap_comm=false") is False
    assert effective(2, 2, "cpu", "train.overlap_comm=true") is True
    zero0 = build_deepspeed_config(tiny_cfg("train.zero_stage=0"), 8, "cuda")["zero_optimization"]
    assert "overlap_comm" not in zero0


def test_param_groups_decay_matrices_only():
    from arflow_scale.model import build_model
    from arflow_scale.train.deepspeed_config import param_groups

    model = build_model(tiny_cfg().model)
    decay, no_decay = param_groups(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_value_clipping_hook_clamps_before_step():
    from arflow_scale.train.deepspeed_config import install_value_clipping

    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([param], lr=1.0)
    install_value_clipping(optimizer, 0.5)
    param.grad = torch.tensor([2.0, -3.0, 0.25, -0.1])
    optimizer.step()
    assert torch.equal(param.detach(), torch.tensor([-0.5, 0.5, -0.25, 0.1]))


def test_lr_schedule_warmup_constant_cosine():
    from arflow_scale.train.schedule import lr_factor

    const = [lr_factor(s, warmup=4, total=20, schedule="constant", min_ratio=0.0) for s in range(8)]
    assert const == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, warmup=0, total=10, schedule="cosine", min_ratio=0.1) for s in range(11)]
    assert cos[0] == 1.0 and math.isclose(cos[10], 0.1) and all(a >= b for a, b in zip(cos, cos[1:]))


def test_a_changed_schedule_is_named_with_both_factors(caplog):
    from arflow_scale.config import config_from_dict
    from arflow_scale.train.launch_plan import warn_of_schedule_jump
    from arflow_scale.train.schedule import schedule_jump

    cosine = config_from_dict({}, ["optim.schedule=cosine", "optim.warmup_steps=2", "train.steps=100"])
    longer = config_from_dict({}, ["optim.schedule=cosine", "optim.warmup_steps=2", "train.steps=200"])
    constant = config_from_dict({}, ["train.steps=100"])
    assert schedule_jump(50, (cosine.optim, 100), (cosine.optim, 100)) is None
    assert schedule_jump(50, (constant.optim, 100), (constant.optim, 300)) is None  # constant after warmup
    assert schedule_jump(1, (cosine.optim, 100), (longer.optim, 200)) is None  # still warming up: the same
    jump = schedule_jump(100, (cosine.optim, 100), (longer.optim, 200))  # extended after a finished cosine
    halfway = 0.5 * (1 + math.cos(math.pi * (100 - 2) / (200 - 2)))  # the longer cosine, past its warmup
    assert jump.startswith(f"the schedule's factor after step 100 is {halfway:.4g} under these settings, 0 under ")
    with caplog.at_level("WARNING", logger="arflow_scale.train.launch_plan"):
        warn_of_schedule_jump(longer, cosine, 100, "runs/x")
        warn_of_schedule_jump(cosine, cosine, 50, "runs/x")
    assert len(caplog.records) == 1 and "run runs/x continues from step 100 under other schedule settings " \
        "(train.steps 100 -> 200, optim.schedule cosine): the schedule's factor after step 100" in caplog.text


def test_step_generator_depends_on_seed_rank_step_micro():
    from arflow_scale.train.rng import step_generator

    def draw(*key):
        return torch.rand(3, generator=step_generator(*key))

    assert torch.equal(draw(0, 1, 5, 0), draw(0, 1, 5, 0))
    others = [draw(1, 1, 5, 0), draw(0, 0, 5, 0), draw(0, 1, 6, 0), draw(0, 1, 5, 1)]
    assert all(not torch.equal(draw(0, 1, 5, 0), o) for o in others)


def test_ema_update_state_roundtrip():
    from arflow_scale.train.ema import EMA

    module = torch.nn.Linear(3, 2)
    ema = EMA(module, decay=0.5)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(2.0)
    ema.update(module)
    for name, p in module.named_parameters():
        assert torch.allclose(ema.shadow[name], 0.5 * start[name] + 0.5 * p.detach())
    other = EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    with pytest.raises(ValueError, match="does not match"):
        EMA(torch.nn.Linear(4, 2), 0.5).load_state_dict({**ema.state_dict(), "shadow": {"x": torch.zeros(1)}})


def test_ema_consolidate_zero3_partitions():
    """ZeRO-3 layout: rank r holds flat[r*ps:(r+1)*ps], the last one zero-padded."""
    from arflow_scale.checkpoint.weights import consolidate

    full = torch.arange(7.0).reshape(7, 1)
    rank0, rank1 = {"w": full.flatten()[:4]}, {"w": torch.cat([full.flatten()[4:], torch.zeros(1)])}
    out = consolidate([rank0, rank1], {"w": {"shape": [7, 1], "numel": 7}})
    assert torch.equal(out["w"], full)


def test_ema_consolidate_zero12_fragments():
    """ZeRO 1-2 layout: each rank holds the contiguous piece of a flattened parameter that falls in its
    optimizer partition (maybe none), placed by its start."""
    from arflow_scale.checkpoint.weights import consolidate

    w, b = torch.arange(12.0).reshape(3, 4), torch.arange(3.0) + 100
    rank0 = {"w": w.flatten()[:5], "b": torch.empty(0)}
    rank1 = {"w": w.flatten()[5:], "b": b}
    starts = [{"w": 0, "b": 0}, {"w": 5, "b": 0}]
    meta = {"w": {"shape": [3, 4], "numel": 12}, "b": {"shape": [3], "numel": 3}}
    out = consolidate([rank0, rank1], meta, starts)
    assert torch.equal(out["w"], w) and torch.equal(out["b"], b)
    swapped = consolidate([rank1, rank0], meta, starts[::-1])  # placement by start, not by rank order
    assert torch.equal(swapped["w"], w) and torch.equal(swapped["b"], b)


def test_faults_fire_once_per_run_folder(tmp_path):
    from arflow_scale.config import FaultsConfig
    from arflow_scale.train.faults import FaultInjector, InjectedFault

    cfg = FaultsConfig(crash_rank_at_step=3, rank=1)
    FaultInjector(cfg, str(tmp_path), rank=0).after_step(3)  # other rank: nothing
    first = FaultInjector(cfg, str(tmp_path), rank=1)
    first.after_step(2)
    with pytest.raises(InjectedFault, match="crash_rank_at_step=3"):
        first.after_step(3)
    FaultInjector(cfg, str(tmp_path), rank=1).after_step(3)  # the restarted worker: no second crash
    assert (tmp_path / "faults" / "crash-rank1-step3").is_file()

    nan_at_2 = FaultsConfig(nan_loss_at_step=2, rank=1)
    loss = torch.tensor(0.5)
    assert FaultInjector(nan_at_2, str(tmp_path), rank=0).poison_loss(2, loss) is loss  # other rank
    assert FaultInjector(nan_at_2, str(tmp_path), rank=1).poison_loss(1, loss) is loss  # other step
    assert torch.isnan(FaultInjector(nan_at_2, str(tmp_path), rank=1).poison_loss(2, loss))
    assert FaultInjector(nan_at_2, str(tmp_path), rank=1).poison_loss(2, loss) is loss  # once per run folder


def test_grid_image_layout():
    from arflow_scale.eval.grids import grid_image

    images = torch.linspace(-1, 1, 5 * 1 * 4 * 4).reshape(5, 1, 4, 4)
    grid = grid_image(images, nrow=3, scale=2, pad=1)
    assert grid.shape == (2 * 9, 3 * 9, 3) and grid.dtype.name == "uint8"
    assert grid[0, 0, 0] == 0 and grid[-1, -1, 0] == 255  # darkest first pixel, white filler


def test_model_from_weights_rejects_foreign_weights():
    from arflow_scale.model import build_model
    from arflow_scale.tasks import task_for

    cfg = tiny_cfg()
    weights = {n: p.detach() + 1 for n, p in build_model(cfg.model).named_parameters()}
    model = task_for(cfg.model).model_from_weights(weights)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="do not fit"):
        task_for(cfg.model).model_from_weights({"nope": torch.zeros(1)})


def test_driver_storage_resolution(tmp_path, monkeypatch):
    from pyarrow.fs import S3FileSystem

    from arflow_scale.train.driver import ray_storage
    from arflow_scale.train.launch_plan import run_folder_url, worker_storage_options

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert run_folder_url("runs", "a") == f"{tmp_path}/runs/a"
    assert run_folder_url("file:///x/y", "a") == "/x/y/a"
    assert run_folder_url("s3://b/p/", "a") == "s3://b/p/a"
    assert ray_storage("runs", {}) == (f"{tmp_path}/runs", None)
    path, fs = ray_storage("s3://bucket/prefix", {"endpoint_url": "http://127.0.0.1:9000"})
    assert path == "bucket/prefix" and isinstance(fs, S3FileSystem)
    opts = worker_storage_options("s3://bucket/prefix", {"client_kwargs": {"endpoint_url": "http://h:1"}})
    assert opts["endpoint_url"] == "http://h:1"
    assert worker_storage_options("runs", {}) == {}


def test_prepare_inputs_absolute_manifest_and_shards(tmp_path, monkeypatch):
    from arflow_scale.train.launch_plan import prepare_inputs

    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg("data.manifest=shards/digits", "run.prepare_data=digits", "run.prepare_samples_per_shard=200")
    prepared = prepare_inputs(cfg)
    assert prepared.data.manifest == f"{tmp_path}/shards/digits"
    assert (tmp_path / "shards" / "digits" / "manifest.json").is_file()
    before = (tmp_path / "shards" / "digits" / "manifest.json").stat().st_mtime_ns
    prepare_inputs(cfg)  # present: not written again
    assert (tmp_path / "shards" / "digits" / "manifest.json").stat().st_mtime_ns == before


def test_fid_every_must_be_multiple_of_checkpoint_every():
    from arflow_scale.config import ConfigError
    from arflow_scale.train.driver import train

    with pytest.raises(ConfigError, match="eval.fid_every"):
        train(tiny_cfg("eval.fid_every=5", "checkpoint.every=2", "eval.ref_stats=x.npz", "data.manifest=/nonexistent"))


def test_plain_loop_benchmark_reference_runs():
    from argparse import Namespace

    from arflow_scale.bench.train import bench_config, plain_loop_images_per_s

    args = Namespace(size="tiny/2", image_size=8, channels=1, k=2, batch_size=2, steps=5, threads=1)
    assert plain_loop_images_per_s(bench_config(args, 0, "/tmp/unused"), threads=1) > 0


def test_fid_scheduler_records_unlaunchable_checkpoints_and_never_raises(tmp_path):
    """A FID checkpoint that cannot be read (deleted by keep_last meanwhile, damaged) is recorded as an
    error for its step; polling and finishing go on, so a finished training run is never lost."""
    from arflow_scale.checkpoint import checkpoint_step
    from arflow_scale.eval.scheduler import FidScheduler

    run = tmp_path / "run"
    for step in (1, 2, 4):
        folder = run / f"checkpoint_{step:09d}"
        (folder / "ranks").mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": step, "world_size": 1}))
        (folder / "ranks" / "rank_0.json").write_text(
            json.dumps({"files": {"meta.json": (folder / "meta.json").stat().st_size}}))  # complete, no EMA
    cfg = config_from_dict({"eval": {"fid_every": 2, "fid_at_end": True}, "checkpoint": {"every": 1}})
    scheduler = FidScheduler(cfg, str(run), {}, None, None, poll_seconds=0.01)
    assert scheduler.run_while_polling(lambda: "trained") == "trained"
    assert sorted(scheduler.failed) == [2, 4] and not scheduler.refs  # step 1 is not a FID step
    results = scheduler.finish(str(run / "checkpoint_000000004"))
    assert list(results) == ["2", "4"] and all("error" in r for r in results.values())
    assert checkpoint_step(f"{run}/checkpoint_000000400/") == 400


def test_make_puts_the_venvs_tools_first_on_path():
    """`make` runs as an activated .venv does: every process it starts (pytest, Ray workers, `arflow` subprocesses,
    submitted jobs) finds this environment's tools (`arflow`, `ninja`) before any system copy."""
    import os
    import shutil
    import sys
    from pathlib import Path

    if "MAKELEVEL" not in os.environ:
        pytest.skip("run outside make: PATH is the caller's own")
    for tool in ("arflow", "ninja"):
        ours = Path(sys.executable).with_name(tool)
        assert ours.is_file(), f"{tool} is not installed in the environment"
        assert os.path.samefile(shutil.which(tool), ours), tool


ZERO2_ENGINE = """
import json, os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
from arflow_scale.config import config_from_dict
from arflow_scale.tasks import task_for
from arflow_scale.train.engine import build_engine, import_deepspeed
deepspeed = import_deepspeed()
deepspeed.init_distributed("gloo")
cfg = config_from_dict({}, ["model.size=tiny/2", "model.image_size=8", "model.in_channels=1", "train.zero_stage=2"])
build_engine(cfg, task_for(cfg.model).build_model(), 1, "cpu", "fp32")
print(json.dumps({"shm_op": repr(deepspeed.comm.comm.cdb.shm_comm_op), "mlflow": "mlflow" in sys.modules}))
"""


def test_a_cpu_zero2_engine_starts_without_op_builds_or_mlflow(tmp_path):
    """DeepSpeed's shared-memory op serves only its inference all-reduce, yet its build cost about 45 s of CPU on a
    fresh machine (again whenever the venv moved): a fresh extensions folder stays empty. MLflow (for DeepSpeed's
    autotuner) is not imported."""
    import os
    import subprocess
    import sys

    from arflow_scale.bench.process_group import free_local_port

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    done = subprocess.run([sys.executable, "-c", ZERO2_ENGINE, str(free_local_port())], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"shm_op": "None", "mlflow": False}
    assert not (tmp_path / "extensions").exists()


def test_modules_absent_hides_only_modules_not_yet_imported():
    import sys

    from arflow_scale.train.engine import modules_absent

    assert "json" in sys.modules and "arflow_absent_probe" not in sys.modules
    with modules_absent("json", "arflow_absent_probe"):
        import json as again  # noqa: F401  (already imported: still there)
        with pytest.raises(ImportError):
            import arflow_absent_probe  # noqa: F401
    assert "arflow_absent_probe" not in sys.modules and sys.modules["json"] is json
