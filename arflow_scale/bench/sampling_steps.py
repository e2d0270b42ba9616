"""Sampling speed (tools/gpu_bench.py): milliseconds per ODE step through the cache, eager or compiled (CUDA
graphs on GPU), early in the trajectory and late (the hybrid state keeps its size; the `full` ablation's
KV cache grows). One warm-up trajectory (it compiles), then a timed one. Imports nothing beyond torch.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from arflow_scale.flow.samplers import GuidedVelocity, use_compiled

EDGE = 5  # steps averaged at each end of the trajectory


def _trajectory(model: nn.Module, labels: torch.Tensor, steps: int, cfg_scale: float, compiled: bool,
                generator: torch.Generator) -> list[float]:
    """Seconds of each model call of one Euler ODE trajectory (synchronised on CUDA)."""
    device = labels.device
    d = model.dims
    x = torch.randn((labels.shape[0], d.in_channels, d.image_size, d.image_size), generator=generator).to(device)
    velocity = GuidedVelocity(model, labels, cfg_scale, None, compiled)
    times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    seconds = []
    for t_cur, t_next in zip(times[:-1], times[1:]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        x = x + (t_next - t_cur) * velocity(x, t_cur)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def sampling_step_ms(model: nn.Module, labels: torch.Tensor, steps: int, cfg_scale: float, compile: bool) -> dict:
    """{"early_ms", "late_ms"} (medians of the first and last EDGE steps after the first one), the warm-up
    trajectory's seconds and the rows per model call; bf16 autocast on CUDA as sample grids use it."""
    device = labels.device
    compiled = use_compiled(compile, model, device)
    generator = torch.Generator().manual_seed(0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        start = time.perf_counter()
        _trajectory(model, labels, steps, cfg_scale, compiled, generator)
        warmup_s = time.perf_counter() - start
        seconds = _trajectory(model, labels, steps, cfg_scale, compiled, generator)
    edge = max(1, min(EDGE, (steps - 1) // 2))
    return {"compiled": compiled, "early_ms": round(statistics.median(seconds[1:1 + edge]) * 1e3, 3),
            "late_ms": round(statistics.median(seconds[-edge:]) * 1e3, 3), "warmup_trajectory_s": round(warmup_s, 2),
            "rows_per_call": labels.shape[0] * (2 if cfg_scale != 1.0 else 1), "steps": steps}
