"""Typed configuration of a whole run: YAML in `configs/`, overridden by dotted key=value arguments."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from arflow_scale.schema import ConfigError, apply_overrides, build, dump_yaml, flatten, read_yaml_mapping, to_dict
from .data import DataConfig
from .distill import DistillConfig
from .eval import EvalConfig
from arflow_scale.model.config import ModelConfig
from .train import (CheckpointConfig, ClusterConfig, FaultsConfig, OptimConfig, RunConfig,
                    TrackingConfig, TrainConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate a Config from a nested dict plus dotted overrides."""
    return build(Config, apply_overrides(data or {}, list(overrides)))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML at `path` (or the embedded defaults), apply overrides, validate.

    Errors name the file and the dotted key.
    """
    data = read_yaml_mapping(path) if path is not None else {}
    try:
        return config_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


__all__ = [
    "Config", "ConfigError", "ModelConfig", "DataConfig", "OptimConfig", "TrainConfig",
    "CheckpointConfig", "RunConfig", "ClusterConfig", "TrackingConfig", "FaultsConfig", "EvalConfig", "DistillConfig",
    "load_config", "config_from_dict", "flatten", "to_dict", "dump_yaml",
]
