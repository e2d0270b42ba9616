"""One rank's training (torchtitan-like): set up, step, checkpoint, report. `Trainer.fit` is the loop.

The model family comes from the config (`model.family`, arflow_scale.tasks): the trainer never names one.
Every random choice of step s, micro-step m on rank r comes from a CPU generator seeded with (seed, r, s, m),
and the stream's position is part of the checkpoint, so a resumed run draws the same data, noise and label
dropout as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from arflow_scale.checkpoint import CheckpointRecord, checkpoint_dir_name, state_dict_sha256
from arflow_scale.data import SequenceStream
from arflow_scale.eval.grids import sample_grid
from arflow_scale.schema import dump_yaml
from arflow_scale.tasks import SampleSettings, task_for
from arflow_scale.tracking import Tracker, recordable_uri

from .args import TrainingStream, WorkerArgs
from .console import Notice, StepProgress, forward_worker_warnings
from .deepspeed_config import resolve_precision
from .ema import EMA
from .engine import build_engine, full_fp32_params, mean_across_ranks, wrapper_masters
from .faults import FaultInjector
from .mfu import FlopsMeter, resolve_peak_tflops
from .rng import step_generator
from .state import restore_state, save_state

log = logging.getLogger(__name__)
GRID_LABELS = 20  # images in an MLflow sample grid (two per class for up to 10 classes)


@dataclass
class StepResult:
    """What one optimizer step measured on this rank."""

    losses: list[torch.Tensor]  # one per micro-step, on the device (read only when logged)
    lr: float
    seconds: float
    data_wait: float


class Throughput:
    """Step times after a warm-up (the first fifth of this launch's steps); their median gives images/s."""

    def __init__(self, start_step: int, total_steps: int):
        self.warmup_until = start_step + max(1, (total_steps - start_step) // 5)
        self.times: list[float] = []

    def add(self, step: int, seconds: float) -> None:
        if step > self.warmup_until:
            self.times.append(seconds)

    def step_seconds(self, fallback: float) -> float:
        return statistics.median(self.times) if self.times else fallback


class Trainer:
    """Builds one rank's engine, EMA, stream and tracker from WorkerArgs, then trains (`fit`)."""

    def __init__(self, args: WorkerArgs):
        self.args, cfg = args, args.config
        self.cfg = cfg
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._configure_device()
        forward_worker_warnings(args.console_sink, self.rank)
        self.task = task_for(cfg.model)
        self.precision = resolve_precision(cfg.train.precision, self.device.type)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = self.task.build_model()
        self.engine = build_engine(cfg, model, self.world, self.device.type, self.precision,
                                   compile_units=self.task.compile_units(model))
        self.ema = EMA(self.engine.engine.module, cfg.train.ema_decay,
                       masters=wrapper_masters(self.engine.engine.optimizer))
        self.stream = self._open_stream()
        self.record = self._restore()
        self.start_step = self.record.step if self.record else 0
        self.last_loss = self.record.last_loss if self.record and self.record.last_loss is not None else math.nan
        tracking = args.tracking
        self.run_id = (self.record.mlflow_run_id if self.record else None) or tracking.run_id
        self.tracker = Tracker(tracking.uri, self.run_id, cfg.tracking.system_metrics) if self.rank == 0 \
            else Tracker(None, None)
        self.faults = FaultInjector(cfg.faults, args.run_url, self.rank, args.storage_options)
        self.config_yaml = dump_yaml(cfg, mask_secrets=True)  # stored in every checkpoint
        self.images_per_step = (cfg.data.batch_size * self.task.images_per_sample * cfg.train.grad_accum
                                * self.world)
        self.throughput = Throughput(self.start_step, cfg.train.steps)
        self.flops = FlopsMeter.for_training(  # rank 0 logs: only it measures a peak
            self.task.forward_flops(), cfg.data.batch_size * cfg.train.grad_accum * self.world, self.world,
            resolve_peak_tflops(cfg.train.peak_tflops, self.device) if self.rank == 0 else None)
        self.skipped_shards = 0

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        total = self.cfg.train.steps
        self.data = iter(self.stream)
        self.engine.engine.train()
        try:
            for step in range(self.start_step + 1, total + 1):
                result = self.train_step(step)
                if self.logs_at(step) or step % self.cfg.checkpoint.every == 0:
                    self.last_loss = mean_across_ranks(torch.stack(result.losses).mean())  # a sync: only when used
                self.throughput.add(step, result.seconds)
                if self.logs_at(step):
                    self.log_step(step, result)
                if self.samples_at(step):
                    self.log_sample_grid(step)
                if step == total:
                    self.save(step, self.final_metrics(step))
                elif step % self.cfg.checkpoint.every == 0:
                    self.save(step, {"step": step, "loss": self.last_loss})
                self.faults.after_step(step)
            if self.start_step >= total:  # a finished run launched again: report its result only
                ray.train.report(self.final_metrics(self.start_step))
        except BaseException:
            self.tracker.close("FAILED")
            raise
        self.tracker.close("FINISHED")
        dist.barrier()

    def train_step(self, step: int) -> StepResult:
        """One optimizer step over grad_accum micro-batches."""
        started, data_wait, losses = time.perf_counter(), 0.0, []
        engine = self.engine.engine
        lr = engine.get_lr()[0]
        if self.engine.grad_norm_probe is not None:
            self.engine.grad_norm_probe.armed = self.logs_at(step)
        for micro in range(self.cfg.train.grad_accum):
            fetch = time.perf_counter()
            images, labels = next(self.data)
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            data_wait += time.perf_counter() - fetch
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                loss = self.task.loss(engine, images, labels, step_generator(self.cfg.train.seed, self.rank, step, micro))
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        self.ema.update(engine.module)
        return StepResult(losses=losses, lr=lr, seconds=time.perf_counter() - started, data_wait=data_wait)

    # ------------------------------------------------------------------ when
    def logs_at(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    def samples_at(self, step: int) -> bool:
        every = self.cfg.train.sample_every
        return step == self.cfg.train.steps or bool(every and step % every == 0)

    # ------------------------------------------------------------------ reporting
    def log_step(self, step: int, result: StepResult) -> None:
        images_per_s = self.images_per_step / result.seconds
        flops = self.flops.metrics(result.seconds)
        self.tracker.log_metrics({**flops,
            self.task.loss_metric: self.last_loss, "lr": result.lr, "grad_norm": self.engine.grad_norm(),
            "images_per_s": images_per_s, "tokens_per_s": images_per_s * self.task.tokens_per_image,
            "step_time": result.seconds, "data_wait_fraction": result.data_wait / result.seconds,
            "skipped_shards": float(getattr(self.stream, "skipped_shards", 0))}, step=step)
        remaining = self.cfg.train.steps - step
        self.notify(StepProgress(
            step=step, total=self.cfg.train.steps, loss=self.last_loss, loss_name=self.task.loss_metric,
            lr=result.lr, images_per_s=images_per_s, data_wait_fraction=result.data_wait / result.seconds,
            eta_seconds=remaining * self.throughput.step_seconds(result.seconds), mfu=flops.get("mfu")))
        skipped = int(getattr(self.stream, "skipped_shards", 0))
        if skipped > self.skipped_shards:
            self.notify(Notice(f"{skipped} corrupt shard(s) skipped so far on rank 0"))
            self.skipped_shards = skipped

    def notify(self, event: Any) -> None:
        """Send an event to the driver's console (rank 0 only; fire and forget)."""
        if self.rank == 0 and self.args.console_sink is not None:
            self.args.console_sink.push.remote(event)

    def log_sample_grid(self, step: int) -> None:
        """An EMA sample grid to MLflow (all ranks take part in gathering the EMA; rank 0 draws)."""
        if not (self.args.tracking.uri and self.run_id):  # the same answer on every rank
            return
        full_ema = self.ema.full_state_dict(dst=0)  # a collective under ZeRO 1-3; None on the other ranks
        if self.rank == 0 and self.tracker.active:
            model = self.task.model_from_weights(full_ema, self.device)
            labels = [i % self.task.num_classes for i in range(min(GRID_LABELS, 2 * self.task.num_classes))]
            settings = SampleSettings(sampler="ode", steps=self.cfg.train.sample_steps, cfg_scale=1.0,
                                      compile=self.cfg.eval.compile_sampler)
            grid = sample_grid(self.task, model, labels, settings, seed=self.cfg.train.seed)
            self.tracker.log_image(grid, f"samples/ema_step_{step:07d}.png")

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, metrics: dict[str, Any]) -> None:
        """Every rank writes its part and reports it; Ray registers the checkpoint once all ranks did."""
        record = CheckpointRecord(
            step=step, world_size=self.world, zero_stage=self.cfg.train.zero_stage, ema_layout=self.ema.layout,
            last_loss=self.last_loss, mlflow_run_id=self.run_id,
            tracking_uri=recordable_uri(self.args.tracking.uri), model_family=self.task.family)
        with tempfile.TemporaryDirectory(prefix=f"arflow_ckpt_r{self.rank}_") as folder:
            save_state(folder, engine=self.engine.engine, ema=self.ema, stream=self.stream, rank=self.rank,
                       record=record, config_yaml=self.config_yaml)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=checkpoint_dir_name(step))
        self.notify(Notice(f"checkpoint {self.args.run_url.rstrip('/')}/{checkpoint_dir_name(step)}"))

    def final_metrics(self, step: int) -> dict[str, Any]:
        """The run's result (rank 0's dict is the one Ray Train keeps); hashes gather the full weights."""
        params = full_fp32_params(self.engine.engine, self.engine.bf16)
        ema_full = self.ema.full_state_dict(dst=0)  # None on the other ranks
        return {"step": step, "final_step": step, "final_loss": self.last_loss, "mlflow_run_id": self.run_id or "",
                "images_per_s": self.images_per_step / self.throughput.step_seconds(math.inf),
                "params_sha256": state_dict_sha256(params),
                "ema_sha256": state_dict_sha256(ema_full) if ema_full is not None else ""}

    # ------------------------------------------------------------------ set-up helpers
    def _configure_device(self) -> None:
        if self.device.type == "cpu":  # DeepSpeed's CPU accelerator; threads = the worker's CPU reservation
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(max(1, int(self.cfg.cluster.resources_per_worker.get("CPU", 1))))
        else:  # fp32 matmuls (autocast-free parts such as the hybrid attention's state) on TF32 cores
            torch.set_float32_matmul_precision("high" if self.cfg.train.tf32 else "highest")

    def _open_stream(self) -> TrainingStream:
        factory = self.args.stream_factory
        if factory is not None:
            return factory(self.cfg, self.task, self.rank, self.world)
        return SequenceStream.from_config(self.cfg.data, k=self.task.images_per_sample, seed=self.cfg.train.seed,
                                          rank=self.rank, world_size=self.world)

    def _restore(self) -> Optional[CheckpointRecord]:
        restored = ray.train.get_checkpoint()
        if restored is None:
            return None
        with restored.as_directory() as folder:
            record = restore_state(folder, engine=self.engine.engine, ema=self.ema, stream=self.stream, rank=self.rank)
        log.info("rank %d resumed from %s at step %d", self.rank, restored.path, record.step)
        self.notify(Notice(f"resumed from {restored.path} at step {record.step}"))
        return record
