"""The ARFlow transformer, its size registry, the chunk-wise hybrid attention and FLOP counting.

The registry and FLOP counting load with the package; the torch modules (the transformer, the attention) load on
first use, so reading a config (`arflow_scale.config`, every CLI command) does not pay for importing torch."""
from __future__ import annotations

import importlib
from typing import Any

from .config import ModelConfig, model_config
from .flops import count_parameters, forward_flops, sampling_flops
from .sizes import SIZES, ModelDims, parse_size, resolve

_TORCH_MODULES = {"ARFlow": "arflow", "ARFlowCache": "arflow", "build_model": "arflow", "MODES": "attention",
                  "chunk_attention": "attention", "full_attention": "attention", "hybrid_attention": "attention",
                  "intra_attention": "attention"}

__all__ = ["ModelConfig", "model_config", "count_parameters", "forward_flops", "sampling_flops", "SIZES",
           "ModelDims", "parse_size", "resolve", *_TORCH_MODULES]


def __getattr__(name: str) -> Any:
    if name in _TORCH_MODULES:
        return getattr(importlib.import_module(f".{_TORCH_MODULES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
