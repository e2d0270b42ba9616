"""Training steps on one device, side by side (tools/gpu_bench.py): a plain PyTorch loop, eager or compiled, and
our DeepSpeed engine (`train.engine.build_engine`) at a ZeRO stage, eager or compiled, on the same model, batch
and in-memory data. Imports no Ray, MLflow or webdataset.

Every variant runs `warmup` steps (the first one compiles), then `steps` timed steps (synchronised on CUDA);
images/s and MFU come from the median step. `host_ms` is how long the step's Python call took before the wait for
the GPU: close to `step_ms`, the GPU waits on the host (kernel launches, or reads of device values inside the
step). Both sides do what one optimizer step of `arflow train` does except the EMA: loss (bf16 autocast on GPU),
backward, AdamW (fused on CUDA) with value clipping.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from arflow_scale.bench.batches import InMemoryBatches
from arflow_scale.config import Config, config_from_dict
from arflow_scale.model.compile import compile_forward
from arflow_scale.tasks import ModelTask, task_for
from arflow_scale.train.deepspeed_config import clip_grads_by_value, param_groups, resolve_precision
from arflow_scale.train.engine import build_engine
from arflow_scale.train.mfu import FlopsMeter
from arflow_scale.train.rng import step_generator

# name -> (ZeRO stage or None for the plain loop, what is compiled: "", "blocks" or "model")
VARIANTS: dict[str, tuple[Optional[int], str]] = {
    "plain_eager": (None, ""), "plain_compiled": (None, "blocks"), "plain_compiled_model": (None, "model"),
    "zero2_eager": (2, ""), "zero2_compiled": (2, "blocks"), "zero3_eager": (3, ""), "zero3_compiled": (3, "blocks"),
}
DEFAULT_VARIANTS = ("plain_eager", "plain_compiled", "zero2_eager", "zero2_compiled", "zero3_eager", "zero3_compiled")
StepFn = Callable[[int], torch.Tensor]  # step number -> loss (detached)


@dataclass(frozen=True)
class StepTimes:
    """What one variant measured."""

    variant: str
    first_step_s: float  # the first step, compilation included
    step_s: list[float]  # the timed steps
    host_s: list[float]  # the same steps until their call returned, before the wait for the device
    losses: list[float]  # every step's loss, warm-up included
    peak_memory_mib: Optional[float]  # CUDA: peak allocated over the variant; CPU: not measured
    extra: dict = field(default_factory=dict)

    def summary(self, images_per_step: int, meter: FlopsMeter) -> dict:
        """One JSON-ready line: images/s, step ms, model TFLOP/s, MFU, peak memory, losses."""
        median = statistics.median(self.step_s)
        return {"variant": self.variant, "images_per_s": round(images_per_step / median, 2),
                "step_ms": round(median * 1e3, 3), "host_ms": round(statistics.median(self.host_s) * 1e3, 3),
                **{k: float(f"{v:.4g}") for k, v in meter.metrics(median).items()},
                "peak_memory_mib": self.peak_memory_mib, "first_step_s": round(self.first_step_s, 2),
                "losses": [round(v, 6) for v in self.losses], **self.extra}


def bench_config(size: str, image_size: int, in_channels: int, k: int, batch_size: int, *, num_classes: int = 1000,
                 zero_stage: int = 2, compile: bool = False, activation_checkpointing: str = "none",
                 precision: str = "auto", attention_backend: str = "auto",
                 overlap_comm: Optional[bool] = None) -> Config:
    """The Config of one variant: the model section, one rank's batch, the optimizer defaults; overlap_comm:
    `train.overlap_comm` (None: the trainer's default, off on one rank)."""
    return config_from_dict({
        "model": {"size": size, "image_size": image_size, "in_channels": in_channels, "k": k,
                  "num_classes": num_classes, "activation_checkpointing": activation_checkpointing,
                  "attention_backend": attention_backend},
        "data": {"batch_size": batch_size},
        "train": {"zero_stage": zero_stage, "compile": compile, "precision": precision, "steps": 10**6,
                  "overlap_comm": overlap_comm}})


def _batch(cfg: Config, task: ModelTask, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = next(iter(InMemoryBatches(cfg.data.batch_size, task.images_per_sample, task.image_shape,
                                               task.num_classes, cfg.train.seed)))
    return images.to(device), labels.to(device)


def plain_step(cfg: Config, device: torch.device, compiled: str) -> StepFn:
    """A plain loop's step: fp32 weights, bf16 autocast on CUDA, AdamW (fused on CUDA) with value clipping.
    compiled: "" eager, "blocks" every block's forward compiled in place, "model" the whole forward."""
    task = task_for(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model().to(device).train()
    for unit in {"": [], "blocks": task.compile_units(model), "model": [model]}[compiled]:
        compile_forward(unit)
    optim = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                                  eps=optim.eps, fused=device.type == "cuda")
    images, labels = _batch(cfg, task, device)
    bf16 = resolve_precision(cfg.train.precision, device.type) == "bf16"

    def step(number: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = task.loss(model, images, labels, step_generator(cfg.train.seed, 0, number, 0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grads_by_value(optimizer, optim.clip_value)
        optimizer.step()
        return loss.detach()

    return step


def engine_step(cfg: Config, device: torch.device) -> StepFn:
    """One optimizer step of our DeepSpeed engine (single rank; the process group must exist), as the
    trainer runs it: bf16 autocast when the engine is bf16, `engine.backward`, `engine.step`."""
    task = task_for(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model()
    precision = resolve_precision(cfg.train.precision, device.type)
    engine = build_engine(cfg, model, 1, device.type, precision, compile_units=task.compile_units(model)).engine
    images, labels = _batch(cfg, task, device)

    def step(number: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = task.loss(engine, images, labels, step_generator(cfg.train.seed, 0, number, 0))
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(name: str, make_step: Callable[[], StepFn], device: torch.device, warmup: int, steps: int) -> StepTimes:
    """Build the variant (`make_step`), run warmup + steps optimizer steps, time each one."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step()
    losses, times, host = [], [], []
    for number in range(1, warmup + steps + 1):
        _synchronize(device)
        start = time.perf_counter()
        loss = step(number)
        host.append(time.perf_counter() - start)
        _synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return StepTimes(name, times[0], times[warmup:], host[warmup:], losses,
                     round(peak, 1) if peak is not None else None)


def variant_step(name: str, base: Config, device: torch.device) -> Callable[[], StepFn]:
    """The step builder of a VARIANTS entry over the base Config."""
    stage, compiled = VARIANTS[name]
    if stage is None:
        return lambda: plain_step(base, device, compiled)
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, zero_stage=stage, compile=bool(compiled)))
    return lambda: engine_step(cfg, device)


SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


@dataclass(frozen=True)
class StepProfile:
    """What torch.profiler saw per optimizer step: the wall time, how much of it the device was busy, how often the
    host waited on it, and the top operators. Busy well below wall: the GPU idles (launch-bound or stalled)."""

    wall_ms: float  # mean ProfilerStep window (the step and the wait for the device after it)
    device_busy_ms: Optional[float]  # union of the device's kernel and copy intervals; None without a GPU
    host_reads: float  # aten::_local_scalar_dense per step: a tensor's value read on the host (.item(), float())
    syncs: float  # cuda*Synchronize calls per step, the bench's own one after each step included
    top: list[dict]  # operators by self device time (CUDA) or self CPU time

    def line(self) -> dict:
        busy = self.device_busy_ms
        return {"wall_ms": round(self.wall_ms, 3), "device_busy_ms": None if busy is None else round(busy, 3),
                "device_busy_fraction": None if busy is None else round(busy / self.wall_ms, 3),
                "host_reads_per_step": self.host_reads, "syncs_per_step": self.syncs, "top": self.top}


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time when at least one of them runs."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def profile_steps(step: StepFn, device: torch.device, trace_path: str, steps: int = 3, top: int = 25) -> StepProfile:
    """torch.profiler over `steps` optimizer steps after one wait and one warm-up step: writes a Chrome trace to
    `trace_path` and returns the per-step summary (`StepProfile`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps)) as prof:
        for number in range(1, steps + 3):
            step(number)
            _synchronize(device)
            prof.step()
    prof.export_chrome_trace(trace_path)
    events = prof.events()
    windows = [e.time_range for e in events if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU]
    on_device = [(e.time_range.start, e.time_range.end) for e in events  # kernels, copies, not annotated ranges
                 if e.device_type != DeviceType.CPU and not e.is_user_annotation]
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ranked = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return StepProfile(
        wall_ms=sum(w.end - w.start for w in windows) / len(windows) / 1e3,
        device_busy_ms=busy_time(on_device) / steps / 1e3 if device.type == "cuda" else None,
        host_reads=sum(e.name == "aten::_local_scalar_dense" for e in events) / steps,
        syncs=sum(e.name in SYNC_CALLS for e in events) / steps,
        top=[{"op": e.key, "self_ms": round(getattr(e, key) / 1e3 / steps, 3), "calls": e.count // steps}
             for e in ranked])
