"""Training sections: optimizer, schedule, ZeRO, checkpoints, run storage, Ray cluster, tracking, faults."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from arflow_scale.schema import check, fail

WORKER_RANGE = re.compile(r"\s*(\d+)\s*\.\.\s*(\d+)\s*")  # cluster.num_workers "min..max"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.02  # on matrices only
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    clip: Literal["value", "norm", "none"] = "value"  # the reference clips by value
    clip_value: float = 3.0

    def validate(self) -> None:
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.clip_value > 0, "clip_value", f"must be positive, got {self.clip_value}")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    tf32: bool = True  # on GPU, fp32 matmuls (the hybrid attention's linear part) use TF32 tensor cores
    ema_decay: float = 0.9999
    log_every: int = 10
    sample_every: int = 0  # EMA sample grid to MLflow every M steps (0: only at the end)
    sample_steps: int = 50  # sampler steps for those grids
    seed: int = 0
    # Sequences per optimizer step over all ranks; None: data.batch_size x cluster.num_workers x grad_accum.
    # Kept when a run continues on another number of workers (train.elastic_batch says how).
    global_batch_size: Optional[int] = None
    elastic_batch: Literal["accumulate", "per_rank"] = "accumulate"  # what adapts: grad_accum or data.batch_size
    nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss or gradient stops the run, or skips the step
    max_skipped_steps: int = 10  # with nonfinite=skip: more skipped steps than this in a run stop it
    compile: bool = False  # torch.compile each model block in place before deepspeed.initialize (inductor)
    # ZeRO 1-3: reduce gradients in buckets while backward still runs (DeepSpeed's overlap_comm); None: on at
    # ZeRO 1-2 with several GPUs, off on CPU (gloo), DeepSpeed's own default (on) at ZeRO 3
    overlap_comm: Optional[bool] = None
    peak_tflops: Optional[float] = None  # per-device peak for `mfu`; None: a bf16 matmul measured on GPU, no mfu on CPU

    def validate(self) -> None:
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.sample_every >= 0, "sample_every", f"must be >= 0, got {self.sample_every}")
        check(self.global_batch_size is None or self.global_batch_size >= 1, "global_batch_size",
              f"must be >= 1 (or null), got {self.global_batch_size}")
        check(self.max_skipped_steps >= 0, "max_skipped_steps", f"must be >= 0, got {self.max_skipped_steps}")
        check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops",
              f"must be positive (or null to measure it on GPU), got {self.peak_tflops}")


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (and one at the end)
    keep_last: int = 3  # complete checkpoints kept in the run folder (older ones are deleted)
    upload_retries: int = 5  # a transient storage error while writing a checkpoint file is retried this often ...
    upload_backoff: float = 1.0  # ... after 1x, 2x, 4x ... this many seconds
    hash_restored: bool = False  # a resumed run gathers and hashes the weights and EMA it restored (`restored`)

    def validate(self) -> None:
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        check(self.upload_retries >= 0, "upload_retries", f"must be >= 0, got {self.upload_retries}")
        check(self.upload_backoff >= 0, "upload_backoff", f"must be >= 0, got {self.upload_backoff}")


@dataclass
class RunConfig:
    name: str = "arflow"
    storage_path: str = "runs"  # local folder or URL (file://, s3://bucket/prefix)
    storage_options: dict[str, str] = field(default_factory=dict)  # e.g. endpoint_url for S3
    max_failures: int = 0  # worker-group restarts Ray Train may do
    prepare_data: Optional[str] = None  # a source name (e.g. digits): write its shards to data.manifest if missing
    prepare_samples_per_shard: int = 64
    prepare_val_per_class: int = 0  # samples of every class held out for validation in those shards
    lock_heartbeat_seconds: float = 10.0  # the driver refreshes its run lock (<run folder>/run.lock) this often
    lock_missed_heartbeats: int = 6  # a lock not refreshed for this many heartbeats is stale (its holder died)

    def validate(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name", f"{self.name!r} must be non-empty, without '/'")
        check(bool(self.storage_path), "storage_path", "must be set")
        check(self.prepare_val_per_class >= 0, "prepare_val_per_class",
              f"must be >= 0, got {self.prepare_val_per_class}")
        check(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        check(self.lock_heartbeat_seconds > 0, "lock_heartbeat_seconds",
              f"must be positive, got {self.lock_heartbeat_seconds}")
        check(self.lock_missed_heartbeats >= 2, "lock_missed_heartbeats",
              f"must be >= 2, got {self.lock_missed_heartbeats}")


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # Ray address; None: RAY_ADDRESS, else a light local Ray
    # Ray Train workers: N, or "min..max" (elastic: Ray starts as many as the cluster fits, at least min, and
    # after losing workers continues on the remaining ones while at least min are left)
    num_workers: Union[int, str] = 2
    use_gpu: Optional[bool] = None  # None: auto (GPU if the cluster has them)
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    local_num_cpus: Optional[int] = None  # CPUs of the local Ray started when no address is given

    def validate(self) -> None:
        low, high = self.worker_range
        check(low >= 1, "num_workers", f"must be >= 1, got {self.num_workers!r}")
        check(high >= low, "num_workers", f"{self.num_workers!r}: the range's max is below its min")

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; (N, N) for a plain number."""
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        match = WORKER_RANGE.fullmatch(self.num_workers)
        if match is None:
            fail("num_workers", f"{self.num_workers!r} is neither a number of workers nor a range min..max")
        return int(match.group(1)), int(match.group(2))

    @property
    def elastic(self) -> bool:
        low, high = self.worker_range
        return high > low

    @property
    def scaling_workers(self) -> Union[int, tuple[int, int]]:
        """Ray Train's `ScalingConfig(num_workers=...)`: N, or (min, max) for an elastic range."""
        return self.worker_range if self.elastic else self.worker_range[0]

    @property
    def fixed_workers(self) -> int:
        """The number of workers where it must be known before the run starts (sweeps' FLOP counts)."""
        check(not self.elastic, "cluster.num_workers", f"{self.num_workers!r}: a fixed number of workers is "
              f"needed here (a range min..max is for single elastic runs)")
        return self.worker_range[0]


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite inside the run folder
    experiment: str = "arflow"
    system_metrics: bool = True
    parent_run_id: Optional[str] = None  # nest this run under an MLflow parent run (sweeps)


@dataclass
class FaultsConfig:
    """Fault injection for tests and drills; each fires once per run."""

    crash_rank_at_step: Optional[int] = None  # raise an exception in `rank` after this step
    kill_rank_at_step: Optional[int] = None  # SIGKILL `rank` after this step
    nan_loss_at_step: Optional[int] = None  # the loss of `rank` at this step becomes NaN (a divergence)
    pause_rank_at_step: Optional[int] = None  # `rank` sleeps pause_seconds after this step (a straggler)
    pause_seconds: float = 30.0
    rank: int = 0

    def validate(self) -> None:
        check(self.pause_seconds > 0, "pause_seconds", f"must be positive, got {self.pause_seconds}")
