"""Model FLOP utilisation: the model's training FLOPs per second per device over the device's peak.

Training FLOPs per step = 3 x `ModelTask.forward_flops()` (forward + backward, matmuls only) x sequences per
step; recomputation by activation checkpointing is not counted (MFU, not hardware FLOPs). The peak is
`train.peak_tflops`, else measured once on a GPU as the best rate of a large bf16 matmul.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

PEAK_MATMUL_SIZE = 8192  # n of the n x n x n matmul that measures the peak
PEAK_REPEATS = 20


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = PEAK_MATMUL_SIZE,
                        repeats: int = PEAK_REPEATS) -> float:
    """Best TFLOP/s of an (n x n) @ (n x n) matmul on `device` (2 n^3 FLOPs each), after one warm-up."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    cuda = device.type == "cuda"
    best = float("inf")
    for index in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        if index:  # the first call warms up (kernel selection)
            best = min(best, time.perf_counter() - start)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return 2 * n**3 / best / 1e12


@dataclass(frozen=True)
class FlopsMeter:
    """Turns a step time into `model_tflops` (per device) and `mfu` (when a peak is known)."""

    flops_per_step: float  # training FLOPs of one optimizer step, all devices together
    devices: int
    peak_tflops: Optional[float]  # per device; None: no mfu

    @classmethod
    def for_training(cls, forward_flops: int, sequences_per_step: int, devices: int,
                     peak_tflops: Optional[float]) -> "FlopsMeter":
        """3 x forward FLOPs per sequence x sequences per optimizer step (over all devices)."""
        return cls(3.0 * forward_flops * sequences_per_step, devices, peak_tflops)

    def model_tflops(self, step_seconds: float) -> float:
        """Achieved model TFLOP/s of one device."""
        return self.flops_per_step / self.devices / step_seconds / 1e12

    def mfu(self, step_seconds: float) -> Optional[float]:
        return self.model_tflops(step_seconds) / self.peak_tflops if self.peak_tflops else None

    def metrics(self, step_seconds: float) -> dict[str, float]:
        """{"model_tflops": ..., "mfu": ...}; mfu only when the peak is known."""
        out = {"model_tflops": self.model_tflops(step_seconds)}
        mfu = self.mfu(step_seconds)
        if mfu is not None:
            out["mfu"] = mfu
        return out


def resolve_peak_tflops(configured: Optional[float], device: torch.device) -> Optional[float]:
    """`train.peak_tflops` if set, else the measured bf16 matmul peak on a GPU, else None (CPU: no mfu)."""
    if configured is not None:
        return configured
    return measure_peak_tflops(device) if device.type == "cuda" else None
