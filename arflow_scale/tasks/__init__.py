"""Model families behind one interface (`ModelTask`): the registry the infrastructure resolves
`model.family` through."""
from __future__ import annotations

from arflow_scale.model.config import ModelConfig

from .arflow import ARFlowTask
from .base import ModelTask, SampleSettings, StateDict
from .farmer import FarmerDistillTask, FarmerTask

FAMILIES: dict[str, type[ModelTask]] = {ARFlowTask.family: ARFlowTask, FarmerTask.family: FarmerTask}


def task_for(model_cfg: ModelConfig) -> ModelTask:
    """The ModelTask of `model.family`, bound to this model section."""
    try:
        return FAMILIES[model_cfg.family](model_cfg)
    except KeyError:
        raise ValueError(f"model.family: {model_cfg.family!r} is not one of {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "ModelTask", "SampleSettings", "StateDict", "task_for", "ARFlowTask", "FarmerTask",
           "FarmerDistillTask"]
