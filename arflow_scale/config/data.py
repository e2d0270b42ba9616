"""Data section: where the shard manifest lives and how sequences are streamed from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from arflow_scale.schema import check


@dataclass
class DataConfig:
    manifest: str = ""  # URL of a shard folder or its manifest.json (file://, s3://, local path)
    batch_size: int = 8  # sequences per rank per micro-step
    flip: bool = True  # random horizontal flip, per image
    class_sampling: Literal["uniform", "proportional"] = "uniform"
    shuffle_buffer: int = 256  # in-class shuffle buffer, samples
    num_workers: int = 0  # DataLoader worker processes per rank
    prefetch: int = 8  # shard units fetched ahead in background threads (0: off); output is identical
    retries: int = 5  # transient storage errors are retried this often ...
    retry_backoff: float = 0.5  # ... with exponential backoff starting here (seconds)
    skip_missing: bool = False  # a manifest naming a missing shard: error (False) or skip (True)
    verify_checksums: bool = True  # each shard's CRC-32 (sha256 in older manifests) checked while streaming
    require_all_classes: bool = True  # a class no loader worker can draw K samples from: error (True) or warning
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint, key, config_kwargs...)

    def validate(self) -> None:
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.prefetch >= 0, "prefetch", f"must be >= 0, got {self.prefetch}")
        check(self.retries >= 0, "retries", f"must be >= 0, got {self.retries}")
        check(self.retry_backoff >= 0, "retry_backoff", f"must be >= 0, got {self.retry_backoff}")
