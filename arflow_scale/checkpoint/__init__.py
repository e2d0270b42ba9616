"""The read side of checkpoints: their typed record, where things are, finding the newest complete one,
consolidated weights at any ZeRO stage, and safetensors export. Below train, eval and tracking."""
from .export import ExportedWeights, export_checkpoint, load_exported
from .layout import checkpoint_dir_name, checkpoint_step
from .record import CheckpointRecord, CheckpointVersionError
from .stage import load_teacher, pin_teacher, run_task
from .store import (fetch_checkpoint, is_complete, latest_checkpoint, list_checkpoints, read_config, read_record,
                    resolve_checkpoint)
from .weights import CheckpointWeights, load_ema_weights, load_raw_weights, state_dict_sha256

__all__ = [
    "CheckpointRecord", "CheckpointVersionError", "CheckpointWeights", "ExportedWeights", "checkpoint_dir_name",
    "checkpoint_step", "export_checkpoint", "fetch_checkpoint", "is_complete", "latest_checkpoint", "list_checkpoints",
    "load_ema_weights", "load_exported", "load_raw_weights", "load_teacher", "pin_teacher", "read_config", "read_record",
    "resolve_checkpoint", "run_task", "state_dict_sha256",
]
