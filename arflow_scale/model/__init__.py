"""The ARFlow transformer, its size registry, the chunk-wise hybrid attention and FLOP counting."""
from .arflow import ARFlow, ARFlowCache, build_model
from .config import ModelConfig, model_config
from .attention import MODES, chunk_attention, full_attention, hybrid_attention, intra_attention
from .flops import count_parameters, forward_flops, sampling_flops
from .sizes import SIZES, ModelDims, parse_size, resolve

__all__ = [
    "ARFlow", "ARFlowCache", "build_model", "model_config", "hybrid_attention", "full_attention",
    "intra_attention", "chunk_attention", "MODES", "count_parameters", "forward_flops", "sampling_flops", "SIZES",
    "ModelDims", "parse_size", "resolve", "ModelConfig",
]
