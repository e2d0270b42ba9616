"""Distributed training: Ray Train driver, per-worker DeepSpeed loop, checkpoints, EMA, export."""
from .driver import train

__all__ = ["train"]
