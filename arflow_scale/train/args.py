"""What the driver hands every Ray Train worker: typed arguments, and the stream interface a trainer draws from."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from arflow_scale.config import Config
from arflow_scale.tasks import ModelTask
from arflow_scale.tracking import TrackingTarget

ARGS_KEY = "worker"  # the key of WorkerArgs in Ray Train's train_loop_config dict


class TrainingStream(Protocol):
    """What the trainer draws batches from: an endless iterator of (images (B, S, C, H, W), labels (B,))
    whose position is saved with every checkpoint, and the data problems it met so far. `load_state_dicts`
    continues from every old rank's saved state on another number of ranks (`train.reshard.restore_stream`)."""

    skipped_shards: int
    corrupt_shards: list[int]  # manifest indices of the corrupt shards skipped
    dropped_classes: list[int]  # classes some loader worker of this rank no longer draws from

    def __iter__(self): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def load_state_dicts(self, states: Sequence[dict]) -> None:
        """Continue from the saved states of every rank of a run, on any world size."""


class StreamFactory(Protocol):
    """Makes rank `rank`'s stream (benchmarks pass in-memory batches; runs use the shard stream)."""

    def __call__(self, cfg: Config, task: ModelTask, rank: int, world_size: int) -> TrainingStream: ...


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a worker needs besides its Ray Train context."""

    config: Config
    run_url: str  # the run folder (checkpoints, fault markers)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options of the run folder
    tracking: TrackingTarget = TrackingTarget(None, None)
    env_ref: Optional[Any] = None  # ObjectRef of forwarded environment (credentials travel in the object store)
    console_sink: Optional[Any] = None  # the driver's ConsoleSink actor
    stream_factory: Optional[StreamFactory] = None  # None: the config's shard stream

    def loop_config(self) -> dict[str, Any]:
        """Ray Train's train_loop_config: these arguments as one object-store reference. Ray Train's controller
        keeps the loop config; a reference spares it importing this package, torch and MLflow to unpickle it."""
        import ray

        return {ARGS_KEY: ray.put(self)}

    @classmethod
    def from_loop_config(cls, loop_config: dict[str, Any]) -> "WorkerArgs":
        import ray

        return ray.get(loop_config[ARGS_KEY])
