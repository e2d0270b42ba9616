"""The typed record of a checkpoint (`meta.json`): written and read by this module only.

Version 1 (no `version` key) is what checkpoints held before the record was typed: step, world_size,
zero_stage, last_loss, ema_partitioned, mlflow_run_id, tracking_uri. Version 2 adds `version`,
`ema_layout` (instead of the flag) and `model_family`. Version 3 adds what continuing on another number
of workers needs: the batch layout (`micro_batch_size`, `grad_accum`), the parameter shapes and the count
of skipped non-finite steps (older records read them as unknown: None, 0). Version 4 adds the final state of
a run to the checkpoint of its last step (`params_sha256`, `ema_sha256`, `val_loss`, `val_loss_ema`), so a
finished run launched again reports it without starting workers. A record of a newer version than this code
knows is refused with a message naming the file, never half-read.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

RECORD_VERSION = 4
EMA_LAYOUTS = ("full", "fragments", "zero3")
EmaLayout = Literal["full", "fragments", "zero3"]
FIELDS_SINCE = {  # the fields each version added (absent from older records)
    3: ("micro_batch_size", "grad_accum", "param_shapes", "skipped_steps"),
    4: ("params_sha256", "ema_sha256", "val_loss", "val_loss_ema"),
}
LOSS_FIELDS = ("last_loss", "val_loss", "val_loss_ema")  # a non-finite value is stored and read as None


class CheckpointVersionError(ValueError):
    """A checkpoint written by a newer version of arflow_scale than the one reading it."""


@dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint is: its step, the run that wrote it and how its state is partitioned."""

    step: int
    world_size: int
    zero_stage: int = 0
    ema_layout: EmaLayout = "full"  # full: rank 0 holds it; fragments (ZeRO 1-2) / zero3: every rank a piece
    last_loss: Optional[float] = None  # mean training loss over ranks at `step` (None before any step)
    mlflow_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None  # the MLflow store the run logs to (passwords masked)
    model_family: str = "arflow"
    micro_batch_size: Optional[int] = None  # sequences per rank per micro-step (None: before version 3)
    grad_accum: Optional[int] = None  # micro-steps per optimizer step
    param_shapes: Optional[dict[str, list[int]]] = None  # {parameter name: shape} of the model
    skipped_steps: int = 0  # non-finite steps skipped so far in the run (train.nonfinite=skip)
    # the state saved, when the run hashed it (its last step, train.steps): sha256 of the full fp32 weights / EMA
    params_sha256: Optional[str] = None
    ema_sha256: Optional[str] = None
    val_loss: Optional[float] = None  # held-out loss of the saved raw weights, when the run measured it at this step
    val_loss_ema: Optional[float] = None  # ... of the saved EMA
    version: int = RECORD_VERSION

    @property
    def hashed(self) -> bool:
        """Whether the record holds the hashes of the state it saved (a run's last checkpoint, version 4 on)."""
        return self.params_sha256 is not None and self.ema_sha256 is not None

    @property
    def ema_partitioned(self) -> bool:
        """Whether every rank saved its own piece of the EMA (else rank 0 saved all of it)."""
        return self.ema_layout != "full"

    @property
    def global_batch_size(self) -> Optional[int]:
        """Sequences per optimizer step over all ranks (None when the record predates version 3)."""
        if self.micro_batch_size is None or self.grad_accum is None:
            return None
        return self.micro_batch_size * self.grad_accum * self.world_size

    def to_json(self) -> str:
        """The record as meta.json text (a non-finite loss is written as null: strict JSON)."""
        data = dataclasses.asdict(self)
        for key in LOSS_FIELDS:
            if data[key] is not None and not math.isfinite(data[key]):
                data[key] = None
        return json.dumps(data, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: str = "meta.json") -> "CheckpointRecord":
        """Parse meta.json text of version 1 to RECORD_VERSION; `where` names the file in errors."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise CheckpointVersionError(
                f"{where}: checkpoint record version {version!r} was written by a newer arflow_scale "
                f"(this one reads versions up to {RECORD_VERSION}); upgrade to read it")
        return cls._from_v1(data, where) if version == 1 else cls._from_v2_on(data, where, version)

    @classmethod
    def _from_v1(cls, data: dict[str, Any], where: str) -> "CheckpointRecord":
        zero_stage = int(data.get("zero_stage", 0))
        partitioned = bool(data.get("ema_partitioned", False))
        layout = "full" if not partitioned else "zero3" if zero_stage == 3 else "fragments"
        return cls._checked(where, step=data.get("step"), world_size=data.get("world_size"), zero_stage=zero_stage,
                            ema_layout=layout, last_loss=data.get("last_loss"),
                            mlflow_run_id=data.get("mlflow_run_id"), tracking_uri=data.get("tracking_uri"))

    @classmethod
    def _from_v2_on(cls, data: dict[str, Any], where: str, version: int) -> "CheckpointRecord":
        later = {name for since, added in FIELDS_SINCE.items() if since > version for name in added}
        names = {f.name for f in dataclasses.fields(cls)} - later
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} in a version-{version} checkpoint record")
        return cls._checked(where, **{k: v for k, v in data.items() if k != "version"})

    @classmethod
    def _checked(cls, where: str, **fields: Any) -> "CheckpointRecord":
        for key in ("step", "world_size"):
            if not isinstance(fields.get(key), int) or fields[key] < (0 if key == "step" else 1):
                raise ValueError(f"{where}: {key} = {fields.get(key)!r} is not a valid {key}")
        if fields.get("ema_layout", "full") not in EMA_LAYOUTS:
            raise ValueError(f"{where}: ema_layout {fields['ema_layout']!r} is not one of {EMA_LAYOUTS}")
        for key in ("micro_batch_size", "grad_accum"):
            if fields.get(key) is not None and (not isinstance(fields[key], int) or fields[key] < 1):
                raise ValueError(f"{where}: {key} = {fields[key]!r} is not a positive integer")
        if not isinstance(fields.get("skipped_steps", 0), int) or fields.get("skipped_steps", 0) < 0:
            raise ValueError(f"{where}: skipped_steps = {fields['skipped_steps']!r} is not a count")
        shapes = fields.get("param_shapes")
        if shapes is not None and not (isinstance(shapes, dict) and all(
                isinstance(v, list) and all(isinstance(d, int) for d in v) for v in shapes.values())):
            raise ValueError(f"{where}: param_shapes must map parameter names to lists of integers")
        for key in ("params_sha256", "ema_sha256"):
            if fields.get(key) is not None and not isinstance(fields[key], str):
                raise ValueError(f"{where}: {key} = {fields[key]!r} is not a sha256 hex digest")
        for key in LOSS_FIELDS:
            loss = fields.get(key)
            fields[key] = None if loss is None or not math.isfinite(float(loss)) else float(loss)
        return cls(**fields)
