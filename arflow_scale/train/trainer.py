"""One rank's training (torchtitan-like): set up, step, checkpoint, report. `Trainer.fit` is the loop.

The model family comes from the config (`model.family`, arflow_scale.tasks): the trainer never names one.
Every random choice of step s, micro-step m on rank r comes from a CPU generator seeded with (seed, r, s, m),
and the stream's position is part of the checkpoint, so a run resumed on the same number of workers draws the
same data, noise and label dropout as an uninterrupted one. On another number of workers the checkpoint is
re-partitioned (`train.reshard`) and the global batch stays the configured one (`train.batching`). The trainer
owns its checkpoints (`train.checkpointer`); Ray Train sees metrics and rank 0's `WorkerResult`.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from arflow_scale.checkpoint import CheckpointRecord, run_task, state_dict_sha256
from arflow_scale.checkpoint.layout import files_of_rank
from arflow_scale.data import SequenceStream
from arflow_scale.eval.grids import sample_grid
from arflow_scale.model.decoder import Decoder
from arflow_scale.model.precision import use_tf32
from arflow_scale.schema import dump_yaml
from arflow_scale.tasks import SampleSettings
from arflow_scale.tracking import Tracker, recordable_uri

from .args import TrainingStream, WorkerArgs
from .result import RestoredState, WorkerResult
from .batching import plan_batches, with_plan
from .checkpointer import Checkpointer
from .console import Notice, StepProgress, forward_worker_warnings
from .data_health import DataHealthWatch, gather_data_health
from .deepspeed_config import resolve_precision
from .ema import EMA
from .engine import build_engine, full_fp32_params, mean_across_ranks, wrapper_masters
from .faults import FaultInjector
from .nonfinite import NonFiniteError, NonFiniteGuard, weights_finite
from .reshard import RESHARD_PATHS, needs_universal, restore_resharded
from .mfu import FlopsMeter, resolve_peak_tflops
from .rng import step_generator
from .state import restore_state, save_state
from .stop import StopPoll
from .validation import open_validator

log = logging.getLogger(__name__)
GRID_LABELS = 20  # images in an MLflow sample grid (two per class for up to 10 classes)


@dataclass
class StepResult:
    """What one optimizer step measured on this rank."""

    losses: list[torch.Tensor]  # one per micro-step, on the device (read only when logged)
    lr: float
    seconds: float
    data_wait: float
    stop: bool  # every rank learned in this step that the driver asked the run to stop


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
        self.args = args
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.plan = plan_batches(args.config, self.world)
        self.cfg = cfg = with_plan(args.config, self.plan)  # this world size's micro-batch and accumulation
        self.device = ray.train.torch.get_device()
        self._configure_device()
        forward_worker_warnings(args.console_sink, self.rank)
        self.task = run_task(cfg, args.storage_options)
        self.precision = resolve_precision(cfg.train.precision, self.device.type)
        self.checkpointer = Checkpointer(args.run_url, args.storage_options, cfg.checkpoint, self.rank)
        latest_url, latest = self.checkpointer.latest()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = self.task.build_model()
        self.engine = build_engine(cfg, model, self.world, self.device.type, self.precision,
                                   load_universal=needs_universal(latest, self.world),
                                   compile_units=self.task.compile_units(model))
        self.ema = EMA(self.engine.engine.module, cfg.train.ema_decay,
                       masters=wrapper_masters(self.engine.engine.optimizer))
        self.stream = self._open_stream()
        self.record = self._restore(latest_url, latest)
        self.start_step = self.record.step if self.record else 0
        self.restored = self._hash_restored() if self.record and cfg.checkpoint.hash_restored else None
        self.last_loss = self.record.last_loss if self.record and self.record.last_loss is not None else math.nan
        skipped = self.record.skipped_steps if self.record else 0
        self.guard = NonFiniteGuard(cfg.train, self.engine.gate, skipped=skipped)
        self.stop_poll = StopPoll(args.console_sink, self.rank)
        tracking = args.tracking
        self.run_id = (self.record.mlflow_run_id if self.record else None) or tracking.run_id
        self.tracker = Tracker(tracking.uri, self.run_id, cfg.tracking.system_metrics) if self.rank == 0 \
            else Tracker(None, None)
        self.logged_until = self.tracker.last_step(self.task.loss_metric)  # steps redone after a restart: logged
        self.faults = FaultInjector(cfg.faults, args.run_url, self.rank, args.storage_options)
        self.config_yaml = dump_yaml(args.config, mask_secrets=True)  # stored in every checkpoint
        self.images_per_step = self.plan.global_batch * self.task.images_per_sample
        self.throughput = Throughput(self.start_step, cfg.train.steps)
        self.validator = None if args.stream_factory is not None else open_validator(
            cfg, self.task, rank=self.rank, world_size=self.world, device=self.device, bf16=self.precision == "bf16")
        self.val_losses: dict[str, float] = {}  # the latest val_loss / val_loss_ema
        self.final_hashes: Optional[tuple[str, str]] = None  # (params, EMA) sha256 at train.steps, once saved
        self.decoder: Optional[Decoder] = None  # rank 0's, made at its first sample grid (a VAE loads once)
        self.data_health = DataHealthWatch()
        self.flops = FlopsMeter.for_training(  # rank 0 logs: only it measures a peak
            self.task.forward_flops(), self.plan.global_batch, self.world,
            resolve_peak_tflops(cfg.train.peak_tflops, self.device) if self.rank == 0 else None)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> WorkerResult:
        """Train from the restored step to `train.steps` (a finished run launched again only reports: one whose last
        record predates its hashes; the driver reports newer ones without workers); a non-finite loss, gradient or
        weight ends it with a result whose `error` names the step; the driver's stop request (train/stop.py) with
        a checkpoint of the step in which every rank learns it."""
        total = self.cfg.train.steps
        self.data = iter(self.stream)
        self.engine.engine.train()
        try:
            for step in range(self.start_step + 1, total + 1):
                result = self.train_step(step)
                self.report_step(step, result)
                stop = result.stop and step < total
                if stop or step == total or step % self.cfg.checkpoint.every == 0:
                    self.save(step)
                if stop:
                    return self.stopped(step)
                self.faults.after_step(step)
            if self.start_step >= total and self.validator is not None:  # a finished run launched again
                self.val_losses = self.validation_losses()
            outcome = self.final_result(max(self.start_step, total))
        except NonFiniteError as err:  # every rank decided it together: a result, not a failure Ray would retry
            self.tracker.close("FAILED")
            return WorkerResult(final_step=self.start_step, final_loss=math.nan, mlflow_run_id=self.run_id or "",
                                error=str(err))
        except BaseException:
            self.tracker.close("FAILED")
            raise
        self.tracker.close("FINISHED")
        dist.barrier()
        return outcome

    def report_step(self, step: int, result: StepResult) -> None:
        """What follows a step before its checkpoint: the loss (a sync, only when used), throughput, the log
        line and metrics, validation and the sample grid when due."""
        if self.logs_at(step) or step % self.cfg.checkpoint.every == 0 or result.stop:
            self.last_loss = mean_across_ranks(torch.stack(result.losses).mean())
        self.throughput.add(step, result.seconds)
        if self.logs_at(step):
            self.log_step(step, result)
        if self.validates_at(step):
            self.log_validation(step)
        if self.samples_at(step):
            self.log_sample_grid(step)

    def stopped(self, step: int) -> WorkerResult:
        """The run stops on the driver's request after checkpointing `step`: MLflow's run is KILLED."""
        self.tracker.close("KILLED")
        self.notify(Notice(f"stopped at step {step} on request"))
        dist.barrier()
        return WorkerResult(final_step=step, final_loss=self.last_loss, mlflow_run_id=self.run_id or "",
                            stopped=True)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step over grad_accum micro-batches."""
        started, data_wait, losses = time.perf_counter(), 0.0, []
        engine = self.engine.engine
        lr = engine.get_lr()[0]
        if self.engine.grad_norm_probe is not None:
            self.engine.grad_norm_probe.armed = self.logs_at(step)
        accum = self.cfg.train.grad_accum
        for micro in range(accum):
            fetch = time.perf_counter()
            images, labels = next(self.data)
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            data_wait += time.perf_counter() - fetch
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                loss = self.task.loss(engine, images, labels, step_generator(self.cfg.train.seed, self.rank, step, micro))
            loss = self.faults.poison_loss(step, loss)
            engine.backward(loss)
            losses.append(loss.detach())
            if micro == accum - 1:  # the optimizer steps next: every rank agrees whether it may, and on a stop
                consensus = self.guard.before_update(losses, stop_asked=self.stop_poll.poll())
            engine.step()
        if self.guard.after_update(step, engine, consensus.loss_finite, losses):
            self.ema.update(engine.module)
        return StepResult(losses=losses, lr=lr, seconds=time.perf_counter() - started, data_wait=data_wait,
                          stop=consensus.stop)

    # ------------------------------------------------------------------ when
    def logs_at(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    def validates_at(self, step: int) -> bool:
        every = self.cfg.eval.val_every
        return self.validator is not None and (step == self.cfg.train.steps or bool(every and step % every == 0))

    def samples_at(self, step: int) -> bool:
        every = self.cfg.train.sample_every
        return step == self.cfg.train.steps or bool(every and step % every == 0)

    # ------------------------------------------------------------------ reporting
    def log_step(self, step: int, result: StepResult) -> None:
        images_per_s = self.images_per_step / result.seconds
        health = gather_data_health(self.stream)  # a collective: all ranks' corrupt shards and dropped classes
        flops = self.flops.metrics(result.seconds)
        if step > self.logged_until:  # a step redone after a restart keeps the values logged the first time
            self.tracker.log_metrics({
                self.task.loss_metric: self.last_loss, "lr": result.lr, "grad_norm": self.engine.grad_norm(),
                "images_per_s": images_per_s, "tokens_per_s": images_per_s * self.task.tokens_per_image,
                "step_time": result.seconds, "data_wait_fraction": result.data_wait / result.seconds,
                "skipped_steps": float(self.guard.skipped), "world_size": float(self.world),
                **health.metrics(), **flops}, step=step)
        remaining = self.cfg.train.steps - step
        self.notify(StepProgress(
            step=step, total=self.cfg.train.steps, loss=self.last_loss, loss_name=self.task.loss_metric,
            lr=result.lr, images_per_s=images_per_s, data_wait_fraction=result.data_wait / result.seconds,
            eta_seconds=remaining * self.throughput.step_seconds(result.seconds), world_size=self.world,
            mfu=flops.get("mfu")))
        if (changed := self.data_health.notice(health)) is not None:
            self.notify(Notice(changed))

    def validation_losses(self) -> dict[str, float]:
        """{val_loss, val_loss_ema} of the current raw and EMA weights (a collective: every rank calls it)."""
        if self.validator is None:
            return {}
        raw = self.validator.evaluate(self.engine.engine.module)
        ema_model = self.task.model_from_weights(self.ema.full_state_dict(), self.device)
        return {"val_loss": raw, "val_loss_ema": self.validator.evaluate(ema_model)}

    def log_validation(self, step: int) -> None:
        self.val_losses = self.validation_losses()
        if step > self.logged_until:
            self.tracker.log_metrics(self.val_losses, step=step)
        self.notify(Notice(f"validation at step {step}: " + "  ".join(
            f"{name} {value:.4f}" for name, value in self.val_losses.items())))

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
                                      guided_channels=self.cfg.eval.guided_channels,
                                      temperature=self.cfg.eval.temperature, compile=self.cfg.eval.compile_sampler)
            self.decoder = self.decoder or Decoder.for_model(self.cfg.model, self.device)
            grid = sample_grid(self.task, model, labels, settings, self.decoder, seed=self.cfg.train.seed)
            self.tracker.log_image(grid, f"samples/ema_step_{step:07d}.png")

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> None:
        """Every rank writes its part and the checkpointer uploads it (then prunes); Ray Train gets the metrics.
        Non-finite weights are never saved: the run stops instead, naming the step. The last step's save hashes the
        state (a collective) for its record and the run's result."""
        module = self.engine.engine.module
        held = list(self.ema.local_weights(module).values()) + list(self.ema.shadow.values())
        if not weights_finite(held, self.device):
            raise NonFiniteError(f"step {step}: the weights or their EMA are not finite; checkpoint "
                                 f"{self.checkpointer.url(step)} not saved")
        final_state = {}  # the last step's record holds the run's final state: a relaunch reports it without workers
        if step == self.cfg.train.steps:
            self.final_hashes = params_sha256, ema_sha256 = self.state_hashes()
            final_state = {"params_sha256": params_sha256, "ema_sha256": ema_sha256, **self.val_losses}
        record = CheckpointRecord(
            step=step, world_size=self.world, zero_stage=self.cfg.train.zero_stage, ema_layout=self.ema.layout,
            last_loss=self.last_loss, mlflow_run_id=self.run_id, tracking_uri=recordable_uri(self.args.tracking.uri),
            model_family=self.task.family, micro_batch_size=self.plan.micro_batch, grad_accum=self.plan.grad_accum,
            param_shapes={name: list(meta["shape"]) for name, meta in self.ema.meta.items()},
            skipped_steps=self.guard.skipped, **final_state)
        url = self.checkpointer.save(step, lambda folder: save_state(
            folder, engine=self.engine.engine, ema=self.ema, stream=self.stream, rank=self.rank, record=record,
            config_yaml=self.config_yaml))
        ray.train.report({"step": step, "loss": self.last_loss})  # metrics only, on every rank
        self.notify(Notice(f"checkpoint {url}"))

    def final_result(self, step: int) -> WorkerResult:
        """The run's result (rank 0's is the one Ray Train keeps); hashes gather the full weights (once: the last
        step's save hashed them already)."""
        params_sha256, ema_sha256 = self.final_hashes or self.state_hashes()
        images_per_s = self.images_per_step / self.throughput.step_seconds(math.inf)
        return WorkerResult(final_step=step, final_loss=self.last_loss, params_sha256=params_sha256,
                            ema_sha256=ema_sha256, images_per_s=images_per_s, mlflow_run_id=self.run_id or "",
                            restored=self.restored, **self.val_losses)

    def state_hashes(self) -> tuple[str, str]:
        """sha256 of the full fp32 weights and of the EMA (a collective: every rank calls it; the EMA's is ""
        on ranks other than 0)."""
        params = full_fp32_params(self.engine.engine, self.engine.bf16)
        ema_full = self.ema.full_state_dict(dst=0)  # None on the other ranks
        return state_dict_sha256(params), state_dict_sha256(ema_full) if ema_full is not None else ""

    # ------------------------------------------------------------------ set-up helpers
    def _hash_restored(self) -> RestoredState:
        """The state just restored, hashed before any step (`checkpoint.hash_restored`): a resume on another
        world size can be checked against `arflow export` of the checkpoint."""
        params_sha256, ema_sha256 = self.state_hashes()
        self.notify(Notice(f"restored state at step {self.record.step}: params sha256 {params_sha256[:16]}, "
                           f"ema sha256 {ema_sha256[:16]}"))
        return RestoredState(step=self.record.step, params_sha256=params_sha256, ema_sha256=ema_sha256)

    def _configure_device(self) -> None:
        if self.device.type == "cpu":  # DeepSpeed's CPU accelerator; threads = the worker's CPU reservation
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(max(1, int(self.cfg.cluster.resources_per_worker.get("CPU", 1))))
        else:  # fp32 matmuls (autocast-free parts such as the hybrid attention's state) on TF32 cores
            use_tf32(self.cfg.train.tf32, self.device)

    def _open_stream(self) -> TrainingStream:
        factory = self.args.stream_factory
        if factory is not None:
            return factory(self.cfg, self.task, self.rank, self.world)
        return SequenceStream.from_config(self.cfg.data, k=self.task.images_per_sample, seed=self.cfg.train.seed,
                                          rank=self.rank, world_size=self.world)

    def _restore(self, url: Optional[str], record: Optional[CheckpointRecord]) -> Optional[CheckpointRecord]:
        """Restore the run folder's newest complete checkpoint: exactly on the world size that wrote it,
        re-partitioned on another (`train.reshard`)."""
        if url is None or record is None:
            return None
        same_world = record.world_size == self.world
        wanted = files_of_rank(self.rank, record.ema_partitioned) if same_world else (lambda rel: True)
        kwargs = dict(engine=self.engine.engine, ema=self.ema, stream=self.stream, rank=self.rank)
        with tempfile.TemporaryDirectory(prefix=f"arflow_restore_r{self.rank}_") as scratch:
            folder = self.checkpointer.fetch(url, Path(scratch) / "checkpoint", wanted)
            if same_world:
                restore_state(folder, **kwargs)
            else:
                restore_resharded(folder, record=record, world_size=self.world, scratch=Path(scratch) / "work",
                                  **kwargs)
        log.info("rank %d resumed from %s at step %d", self.rank, url, record.step)
        how = "" if same_world else (f" on {self.world} worker(s) (written by {record.world_size}; "
                                     f"{RESHARD_PATHS[record.zero_stage]})")
        self.notify(Notice(f"resumed from {url} at step {record.step}{how}"))
        old_batch = record.global_batch_size
        if old_batch not in (None, self.plan.global_batch):
            self.notify(Notice(f"the global batch changes from {old_batch} to {self.plan.global_batch} sequences "
                               f"(train.global_batch_size={old_batch} keeps it)"))
        return record
