"""The per-worker training loop that Ray Train runs on every rank (torchtitan-like, model-agnostic).

Pieces: a DeepSpeed engine (ZeRO 0-3, AdamW param groups, warmup + constant/cosine lr, accumulation,
clipping), an EMA, a resumable SequenceStream for this rank, a fault injector, and rank 0's tracker.
Only `build_model` / `flow_matching_loss` / the sampler are ARFlow-specific (see `TrainTask`).
Every random choice of step s, micro-step m on rank r comes from a CPU generator seeded with
(seed, r, s, m), and the stream's position is part of the checkpoint, so a resumed run draws the same
data, noise levels, noise and label dropout as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator seeded from (seed, rank, step, micro-step)."""
    digest = hashlib.sha256(f"arflow/{seed}/{rank}/{step}/{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr for 0-based optimizer step `step`: linear warmup, then constant/cosine."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, *, optim_cfg, total_steps: int):
    """LambdaLR over `lr_factor` (DeepSpeed steps it once per optimizer step and checkpoints it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=optim_cfg.warmup_steps, total=total_steps, schedule=optim_cfg.schedule,
        min_ratio=optim_cfg.min_lr_ratio))


@dataclass
class TrainTask:
    """The model-specific parts: build the model, compute a loss, draw a sample grid."""

    build_model: Callable[[Any], torch.nn.Module]
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
    tokens_per_image: int


def arflow_task(cfg) -> TrainTask:
    from arflow_scale.flow import flow_matching_loss
    from arflow_scale.model import build_model

    tokens = (cfg.model.image_size // cfg.model.patch_size) ** 2
    return TrainTask(build_model=lambda c: build_model(c.model),
                     loss=lambda m, x, y, g: flow_matching_loss(m, x, y, g, cfg.model.class_dropout),
                     tokens_per_image=tokens)


class InMemoryBatches:
    """One fixed random batch repeated forever (benchmarks); the SequenceStream interface."""

    def __init__(self, batch_size: int, k: int, sample_shape: tuple[int, int, int], num_classes: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand((batch_size, k, *sample_shape), generator=generator) * 2 - 1
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        self.batches, self.skipped_shards = 0, 0

    def __iter__(self):
        while True:
            self.batches += 1
            yield self.images, self.labels

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])


def wrapper_masters(optimizer) -> dict[int, torch.Tensor]:
    """{id(param): fp32 master} from DeepSpeed's mixed-precision wrapper without ZeRO (bf16 at stage
    0 with our torch AdamW: FP16_UnfusedOptimizer, one fp32 copy per parameter in `fp32_groups`,
    in param-group order); {} for any other optimizer."""
    groups, copies = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if groups is None or copies is None:
        return {}
    return {id(p): c for params, masters in zip(groups, copies) for p, c in zip(params, masters)}


def full_fp32_params(engine, bf16: bool) -> dict[str, torch.Tensor]:
    """The full fp32 weights on every rank (a collective under ZeRO): gathered under ZeRO-3, master
    weights when training in bf16 (ZeRO 1-3 through DeepSpeed's accessor, ZeRO-0 from its
    mixed-precision wrapper), the module's own parameters otherwise."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    if bf16:
        out, flat = {}, None
        for name, param in params.items():
            master = safe_get_full_fp32_param(param)
            if master is None:  # no ZeRO: the wrapper optimizer holds the masters
                flat = flat if flat is not None else wrapper_masters(engine.optimizer)
                master = flat.get(id(param))
            if master is None:
                raise RuntimeError(f"no fp32 master weight for {name} in {type(engine.optimizer).__name__} "
                                   f"(ZeRO stage {engine.zero_optimization_stage()}, bf16)")
            out[name] = master.detach().float().cpu().clone()
        return out
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().cpu().clone() for n, p in params.items()}
    return {n: p.detach().float().cpu().clone() for n, p in params.items()}


class GradNormProbe:
    """Pre-clipping gradient norm for ZeRO stage 0 (ZeRO 1-3 report it through DeepSpeed)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.value = float("nan")
        self.armed = True  # measured only on steps that log it: the norm is a host sync
        optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if not self.armed:
            return
        grads = [p.grad.float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.value = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _mean_across_ranks(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.detach().float().reshape(1).cpu().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. loop_config: config (dict), run_url, storage_options, tracking_uri, run_id."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from arflow_scale.config import config_from_dict, dump_yaml
    from arflow_scale.data import SequenceStream
    from arflow_scale.tracking import Tracker
    from arflow_scale.train import checkpoint as ckpt
    from arflow_scale.train.deepspeed_config import (build_deepspeed_config, install_value_clipping,
                                                     param_groups, resolve_precision)
    from arflow_scale.train.ema import EMA
    from arflow_scale.train.export import draw_grid, model_from_weights
    from arflow_scale.train.faults import FaultInjector

    env_ref = loop_config.get("env")  # an ObjectRef: credentials travel through the object store only
    for key, value in (ray.get(env_ref) if env_ref is not None else {}).items():
        os.environ.setdefault(key, value)
    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device.type == "cpu":  # as many threads as the worker's CPU reservation (Ray sets 1)
        torch.set_num_threads(max(1, int(cfg.cluster.resources_per_worker.get("CPU", 1))))
    else:  # fp32 matmuls (autocast-free parts such as the hybrid attention's state) on TF32 cores
        torch.set_float32_matmul_precision("high" if cfg.train.tf32 else "highest")
    task = arflow_task(cfg)
    precision = resolve_precision(cfg.train.precision, device.type)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = task.build_model(cfg)
    ds_config = build_deepspeed_config(cfg, world, device.type)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=partial(make_scheduler, optim_cfg=cfg.optim, total_steps=cfg.train.steps))
    probe = GradNormProbe(engine.basic_optimizer) if cfg.train.zero_stage == 0 else None
    if cfg.optim.clip == "value":
        install_value_clipping(engine.basic_optimizer, cfg.optim.clip_value)
    ema = EMA(engine.module, cfg.train.ema_decay, masters=wrapper_masters(engine.optimizer))
    if loop_config.get("in_memory_data"):
        shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
        stream = InMemoryBatches(cfg.data.batch_size, cfg.model.k, shape, cfg.model.num_classes,
                                 cfg.train.seed + rank)
    else:
        stream = SequenceStream.from_config(cfg.data, k=cfg.model.k, seed=cfg.train.seed, rank=rank,
                                            world_size=world)

    meta: dict[str, Any] = {"step": 0, "last_loss": float("nan")}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            meta = ckpt.restore_state(folder, engine=engine, ema=ema, stream=stream, rank=rank)
        log.info("rank %d resumed from %s at step %d", rank, restored.path, meta["step"])
    start_step = int(meta["step"])
    run_id = meta.get("mlflow_run_id") or loop_config.get("run_id")
    tracker = Tracker(loop_config.get("tracking_uri"), run_id, cfg.tracking.system_metrics) if rank == 0 \
        else Tracker(None, None)
    faults = FaultInjector(cfg.faults, loop_config["run_url"], rank, loop_config.get("storage_options"))
    config_yaml = dump_yaml(cfg, mask_secrets=True)  # stored in every checkpoint
    images_per_step = cfg.data.batch_size * cfg.model.k * cfg.train.grad_accum * world
    last_loss = float(meta.get("last_loss", float("nan")))

    def sample_grid(step: int) -> None:
        if not (loop_config.get("tracking_uri") and run_id):  # same answer on every rank
            return
        full_ema = ema.full_state_dict(dst=0)  # a collective under ZeRO 1-3; None on the other ranks
        if rank == 0 and tracker.active:
            sampler_model = model_from_weights(cfg, full_ema, device)
            labels = [i % cfg.model.num_classes for i in range(min(20, 2 * cfg.model.num_classes))]
            grid = draw_grid(sampler_model, labels, steps=cfg.train.sample_steps, seed=cfg.train.seed)
            tracker.log_image(grid, f"samples/ema_step_{step:07d}.png")

    def save(step: int, metrics: dict[str, Any]) -> None:
        state = {"step": step, "last_loss": last_loss, "zero_stage": cfg.train.zero_stage,
                 "ema_partitioned": ema.partitioned, "mlflow_run_id": run_id,
                 "tracking_uri": loop_config.get("tracking_uri")}
        with tempfile.TemporaryDirectory(prefix=f"arflow_ckpt_r{rank}_") as folder:
            ckpt.save_state(folder, engine=engine, ema=ema, stream=stream, rank=rank, world_size=world,
                            meta=state, config_yaml=config_yaml)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=ckpt.checkpoint_dir_name(step))

    def final_metrics(step: int) -> dict[str, Any]:
        params = full_fp32_params(engine, precision == "bf16")
        ema_full = ema.full_state_dict(dst=0)  # None on the other ranks (Ray Train keeps rank 0's metrics)
        return {"step": step, "final_step": step, "final_loss": last_loss, "mlflow_run_id": run_id or "",
                "images_per_s": images_per_step / statistics.median(step_times) if step_times else 0.0,
                "params_sha256": ckpt.state_dict_sha256(params),
                "ema_sha256": ckpt.state_dict_sha256(ema_full) if ema_full is not None else ""}

    data_iter = iter(stream)
    step_times: list[float] = []  # after warm-up; their median gives the run's throughput
    engine.train()
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            started, data_wait = time.perf_counter(), 0.0
            losses = []
            lr = engine.get_lr()[0]
            logs = step % cfg.train.log_every == 0 or step == cfg.train.steps
            if probe is not None:
                probe.armed = logs
            for micro in range(cfg.train.grad_accum):
                fetch = time.perf_counter()
                x, y = next(data_iter)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                data_wait += time.perf_counter() - fetch
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = task.loss(engine, x, y, step_generator(cfg.train.seed, rank, step, micro))
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach())
            ema.update(engine.module)
            if logs or step % cfg.checkpoint.every == 0:  # the cross-rank mean is a sync: only when used
                last_loss = _mean_across_ranks(torch.stack(losses).mean())
            step_time = time.perf_counter() - started
            if step > start_step + max(1, (cfg.train.steps - start_step) // 5):  # skip warm-up steps
                step_times.append(step_time)
            if logs:
                grad_norm = probe.value if probe is not None else engine.get_global_grad_norm()
                tracker.log_metrics({
                    "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm if grad_norm is not None else "nan"),
                    "images_per_s": images_per_step / step_time,
                    "tokens_per_s": images_per_step * task.tokens_per_image / step_time,
                    "step_time": step_time, "data_wait_fraction": data_wait / step_time,
                    "skipped_shards": float(getattr(stream, "skipped_shards", 0))}, step=step)
            if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step != cfg.train.steps:
                sample_grid(step)
            if step == cfg.train.steps:
                sample_grid(step)
                save(step, final_metrics(step))
            elif step % cfg.checkpoint.every == 0:
                save(step, {"step": step, "loss": last_loss})
            faults.after_step(step)
        if start_step >= cfg.train.steps:  # a finished run launched again: report its result only
            ray.train.report(final_metrics(start_step))
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")
    dist.barrier()
