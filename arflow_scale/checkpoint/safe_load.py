"""DeepSpeed checkpoint files loaded with `torch.load(weights_only=True)`.

DeepSpeed unpickles its own files with weights_only=False. Its pickles hold plain containers,
tensors and four small DeepSpeed classes; we allow-list exactly those and load everything else the
weights-only way, so a tampered checkpoint cannot run code on resume or export.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

_TORCH_LOAD = torch.load  # the real loader, whatever `weights_only_torch_load` puts in its place for a while


def deepspeed_safe_globals() -> list[type]:
    """The DeepSpeed classes that appear inside its checkpoint pickles (ZeRO 0-3, fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path_or_file: Any, map_location: Any = "cpu", mmap: bool = False, **_: Any) -> Any:
    """torch.load with weights_only=True and the DeepSpeed allow-list (any weights_only arg is ignored);
    `mmap` maps a file's tensors instead of reading them (slices are read when used)."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return _TORCH_LOAD(path_or_file, map_location=map_location, weights_only=True, mmap=mmap or None)


def safe_checkpoint_engine(engine) -> None:
    """Make `engine.load_checkpoint` read its files with `safe_load` (saving is unchanged)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:  # other engines (nebula, fast) are left alone
        current.__class__ = SafeTorchCheckpointEngine


class _WeightsOnlyTorch:
    """Stands in for the `torch` module inside deepspeed.utils.zero_to_fp32: `load` is `safe_load`."""

    load = staticmethod(safe_load)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """While open, every `torch.load` of this process is `safe_load` (not reentrant): for DeepSpeed code that
    unpickles with weights_only=False in many modules (the universal checkpoint's conversion and loading)."""
    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


@contextlib.contextmanager
def weights_only_zero_to_fp32() -> Iterator[None]:
    """While open, DeepSpeed's zero_to_fp32 consolidation reads its files with `safe_load`."""
    from deepspeed.utils import zero_to_fp32

    saved = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch()
    try:
        yield
    finally:
        zero_to_fp32.torch = saved
