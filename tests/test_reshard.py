"""Re-partitioning a checkpoint for another world size, without Ray: two gloo processes train real DeepSpeed
engines (ZeRO 0-3) for two steps, record their full state live (gathered fp32 masters, AdamW moments and
step, schedule, EMA) and save checkpoints through the Checkpointer; then one process (world 1) restores each
checkpoint with `restore_resharded` and must hold exactly that state, train on, and apply the non-finite guard.
ZeRO-3 also runs end to end on Ray, 2 -> 1 -> 2 workers, in test_train_resume.py."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import free_port

pytestmark = pytest.mark.slow
STAGES = (0, 1, 2, 3)
MOMENTS = ("exp_avg", "exp_avg_sq")


def config(stage: int, **train):
    from arflow_scale.config import config_from_dict

    return config_from_dict({}, [
        "model.size=tiny/2", "model.image_size=8", "model.in_channels=1", "model.num_classes=10", "model.k=3",
        "data.batch_size=2", "cluster.num_workers=2", f"train.zero_stage={stage}", "train.steps=10",
        "train.ema_decay=0.5", "optim.lr=1e-2", "optim.warmup_steps=3", *(f"train.{k}={v}" for k, v in train.items())])


def init_process_group(rank: int, world: int, port: int) -> None:
    from arflow_scale.train.engine import import_deepspeed

    deepspeed = import_deepspeed()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK="0",
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")


def build(cfg, world: int, load_universal: bool = False):
    from arflow_scale.bench.batches import InMemoryBatches
    from arflow_scale.tasks import task_for
    from arflow_scale.train.ema import EMA
    from arflow_scale.train.engine import build_engine, wrapper_masters

    torch.manual_seed(0)
    task = task_for(cfg.model)
    engine = build_engine(cfg, task.build_model(), world, "cpu", "fp32", load_universal=load_universal)
    ema = EMA(engine.engine.module, cfg.train.ema_decay, masters=wrapper_masters(engine.engine.optimizer))
    stream = InMemoryBatches(cfg.data.batch_size, task.images_per_sample, task.image_shape, task.num_classes,
                             seed=torch.distributed.get_rank())
    return task, engine, ema, stream


def train_steps(task, engine, stream, first: int, count: int) -> list[float]:
    from arflow_scale.train.rng import step_generator

    batches, losses = iter(stream), []
    for step in range(first, first + count):
        images, labels = next(batches)
        loss = task.loss(engine.engine, images, labels, step_generator(0, torch.distributed.get_rank(), step, 0))
        engine.engine.backward(loss)
        engine.engine.step()
        losses.append(float(loss))
    return losses


def link_moments(engine) -> None:
    """DeepSpeed 0.19.8 (ZeRO 1-2) links parameters to their AdamW moments at the first group's first step, before
    the other groups have moments: link again once all exist (else safe_get_full_optimizer_state fails for them)."""
    zero = engine.engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def full_state(engine, ema=None) -> dict:
    """This engine's whole training state, gathered (a collective under ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module, adam = engine.engine.module, engine.engine.basic_optimizer
    state = {"lr_epoch": engine.engine.lr_scheduler.last_epoch, "ema": ema.full_state_dict() if ema else {}}
    if engine.engine.zero_optimization_stage() == 0:
        params = dict(module.named_parameters())
        state["fp32"] = {n: p.detach().clone() for n, p in params.items()}
        for key in MOMENTS:
            state[key] = {n: adam.state[p][key].clone() for n, p in params.items()}
        state["step"] = sorted({float(adam.state[p]["step"]) for p in params.values()})
        return state
    params = dict(module.named_parameters())
    state["fp32"] = {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}
    for key in MOMENTS:
        state[key] = {n: safe_get_full_optimizer_state(p, key).clone() for n, p in params.items()}
    state["step"] = sorted({float(s["step"]) for s in adam.state.values()})
    return state


def write_checkpoints(rank: int, world: int, port: int, folder: str) -> None:
    """Spawned rank: per stage, train two steps, save the live full state (rank 0) and a checkpoint."""
    from arflow_scale.checkpoint import CheckpointRecord
    from arflow_scale.config import CheckpointConfig
    from arflow_scale.train.checkpointer import Checkpointer
    from arflow_scale.train.state import save_state

    init_process_group(rank, world, port)
    for stage in STAGES:
        cfg = config(stage)
        task, engine, ema, stream = build(cfg, world)
        for step in (1, 2):
            train_steps(task, engine, stream, step, 1)
            ema.update(engine.engine.module)
        link_moments(engine)
        reference = full_state(engine, ema)
        record = CheckpointRecord(step=2, world_size=world, zero_stage=stage, ema_layout=ema.layout, last_loss=1.0,
                                  micro_batch_size=2, grad_accum=1)
        Checkpointer(f"{folder}/zero{stage}", {}, CheckpointConfig(), rank).save(2, lambda out: save_state(
            out, engine=engine.engine, ema=ema, stream=stream, rank=rank, record=record, config_yaml=""))
        if rank == 0:
            torch.save(reference, f"{folder}/reference_zero{stage}.pt")


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def guard_skips_and_stops(task, engine, stream, stage: int) -> dict:
    """A NaN loss: `skip` leaves the weights and moments, advances the schedule; `stop` names the step."""
    from arflow_scale.train.nonfinite import NonFiniteError, NonFiniteGuard

    images, labels = next(iter(stream))
    before, out = full_state(engine), {}
    for mode, settings in (("skip", {"nonfinite": "skip"}), ("bound", {"nonfinite": "skip", "max_skipped_steps": 0}),
                           ("stop", {"nonfinite": "stop"})):
        guard = NonFiniteGuard(config(stage, **settings).train, engine.gate)
        loss = task.loss(engine.engine, images, labels, torch.Generator().manual_seed(0)) * math.nan
        engine.engine.backward(loss)
        finite = guard.before_update([loss.detach()]).loss_finite
        engine.engine.step()
        try:
            out[mode] = guard.after_update(7, engine.engine, finite, [loss.detach()])
        except NonFiniteError as err:
            out[mode] = str(err)
        if mode == "skip":
            out["lr_epochs"] = [before["lr_epoch"], engine.engine.lr_scheduler.last_epoch]
    after = full_state(engine)
    out["unchanged"] = all(same(before[k], after[k]) for k in ("fp32", *MOMENTS, "step"))
    return out


def read_checkpoints(rank: int, world: int, port: int, folder: str) -> None:
    """Spawned single rank: restore every stage's 2-rank checkpoint, compare with the live reference."""
    from arflow_scale.config import CheckpointConfig
    from arflow_scale.train.checkpointer import Checkpointer
    from arflow_scale.train.reshard import needs_universal, restore_resharded

    init_process_group(rank, world, port)
    results = {}
    for stage in STAGES:
        url, record = Checkpointer(f"{folder}/zero{stage}", {}, CheckpointConfig(), rank).latest()
        task, engine, ema, stream = build(config(stage), world, load_universal=needs_universal(record, world))
        restore_resharded(url, record=record, engine=engine.engine, ema=ema, stream=stream, rank=rank,
                                     world_size=world, scratch=f"{folder}/scratch{stage}")
        ours, theirs = full_state(engine, ema), torch.load(f"{folder}/reference_zero{stage}.pt", weights_only=True)
        results[stage] = {key: same(ours[key], theirs[key]) for key in theirs}
        results[stage]["universal"] = needs_universal(record, world)
        results[stage]["stream_batches"] = stream.batches  # before training on
        results[stage]["losses"] = train_steps(task, engine, stream, 3, 2)
        if stage in (0, 1):  # the gate (ZeRO-0) and DeepSpeed's own overflow skip (ZeRO 1-3)
            results[stage]["guard"] = guard_skips_and_stops(task, engine, stream, stage)
    with open(f"{folder}/results.json", "w") as f:
        json.dump(results, f)


def test_checkpoints_of_two_ranks_restore_exactly_on_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(write_checkpoints, args=(2, free_port(), str(tmp_path)), nprocs=2)
    mp.spawn(read_checkpoints, args=(1, free_port(), str(tmp_path)), nprocs=1)
    results = json.loads((tmp_path / "results.json").read_text())
    for stage in map(str, STAGES):
        got = results[stage]
        assert {k: got[k] for k in ("fp32", *MOMENTS, "step", "lr_epoch", "ema")} == dict.fromkeys(
            ("fp32", *MOMENTS, "step", "lr_epoch", "ema"), True), f"ZeRO-{stage}: {got}"
        assert got["universal"] == (stage in ("1", "2"))
        assert got["stream_batches"] == 2  # the stream continues after the 2 batches each old rank drew
        assert all(math.isfinite(loss) for loss in got["losses"])
    for stage in ("0", "1"):
        guard = results[stage]["guard"]
        assert guard["skip"] is False and guard["unchanged"], f"ZeRO-{stage}: {guard}"
        assert guard["stop"].startswith("step 7: a non-finite loss") and "train.nonfinite=stop" in guard["stop"]
        assert guard["bound"].endswith("1 non-finite steps skipped, more than train.max_skipped_steps=0")
        assert guard["lr_epochs"][1] == guard["lr_epochs"][0] + 1  # a skipped step still counts
