"""Training sections: optimizer, schedule, ZeRO, checkpoints, run storage, Ray cluster, tracking, faults."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from arflow_scale.schema import check


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
    compile: bool = False  # torch.compile each model block in place before deepspeed.initialize (inductor)
    peak_tflops: Optional[float] = None  # per-device peak for `mfu`; None: a bf16 matmul measured on GPU, no mfu on CPU

    def validate(self) -> None:
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.sample_every >= 0, "sample_every", f"must be >= 0, got {self.sample_every}")
        check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops",
              f"must be positive (or null to measure it on GPU), got {self.peak_tflops}")


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (and one at the end)
    keep_last: int = 3

    def validate(self) -> None:
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class RunConfig:
    name: str = "arflow"
    storage_path: str = "runs"  # local folder or URL (file://, s3://bucket/prefix)
    storage_options: dict[str, str] = field(default_factory=dict)  # e.g. endpoint_url for S3
    max_failures: int = 0  # worker-group restarts Ray Train may do
    prepare_data: Optional[str] = None  # a source name (e.g. digits): write its shards to data.manifest if missing
    prepare_samples_per_shard: int = 64

    def validate(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name", f"{self.name!r} must be non-empty, without '/'")
        check(bool(self.storage_path), "storage_path", "must be set")
        check(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # Ray address; None: RAY_ADDRESS, else a light local Ray
    num_workers: int = 2
    use_gpu: Optional[bool] = None  # None: auto (GPU if the cluster has them)
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    local_num_cpus: Optional[int] = None  # CPUs of the local Ray started when no address is given

    def validate(self) -> None:
        check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")


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
    rank: int = 0
