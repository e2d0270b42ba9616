"""Autoregressive samplers (docs/arflow.md §5): each step feeds ONE image (the current x_t) through the model cache.

`ode`: Euler on t in linspace(0, 1, steps + 1). `sde`: the reference Euler-Maruyama schedule
(SiT/ARFlow): t in linspace(0, 0.96, steps), diffusion w(t) = 1 - t, drift v + w * score with
score = (t v - x) / (1 - t), then one deterministic drift step of 0.04. Exactly one model call
per step. CFG runs the batch [x; x] with labels [y; null]: rows B.. of the cache hold the
unconditional states, separate from the conditional ones.

Compiled sampling (`compile=True`, the default on CUDA): the model call of a step is one compiled function
of (x, t, labels, the cache's states); on CUDA it is captured in CUDA graphs (`mode="reduce-overhead"`).
Hybrid and intra states keep their shapes from the second step on, so two graphs serve a whole trajectory;
the `full` ablation's growing KV cache would recompile every step, so it samples eagerly.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from einops import rearrange
from torch import nn

from arflow_scale.model.compile import use_user_compile_cache

from .objective import unwrap_model

LAST_STEP = 0.04  # deterministic final step of the reference SDE sampler
States = tuple  # one attention state per layer (ARFlowCache.states)


def model_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, states: States
               ) -> tuple[torch.Tensor, States]:
    """One model call continuing a cached sequence, as a pure function: x (B, 1, C, H, W), t (B, 1),
    labels (B,), the per-layer states -> velocity (B, 1, C, H, W) and the states after this image (contiguous:
    one compiled graph serves every step after the first)."""
    cache = model.new_cache()
    cache.states = list(states)
    velocity = model(x, t, labels, cache=cache)
    return velocity, tuple(s.contiguous() if isinstance(s, torch.Tensor) else s for s in cache.states)


@functools.cache
def compiled_model_step(device_type: str) -> Callable:
    """`model_step` compiled once per process and device type (CUDA graphs on CUDA); static shapes."""
    use_user_compile_cache()
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(model_step, mode=mode, dynamic=False)


def use_compiled(compile: Optional[bool], model: nn.Module, device: torch.device) -> bool:
    """The resolved setting: None means on CUDA only; never for the `full` ablation (growing state)."""
    wanted = device.type == "cuda" if compile is None else compile
    return wanted and model.dims.attention != "full"


class GuidedVelocity:
    """One model call per step through one cache; returns the (guided) velocity (B, C, H, W).

    compiled: run the call through `compiled_model_step` (see the module note) instead of eagerly.
    """

    def __init__(self, model: nn.Module, labels: torch.Tensor, cfg_scale: float,
                 guided_channels: Optional[int], compiled: bool = False):
        self.model, self.cfg_scale, self.guided_channels = model, cfg_scale, guided_channels
        self.guided = cfg_scale != 1.0
        null = torch.full_like(labels, model.null_class)
        self.labels = torch.cat([labels, null]) if self.guided else labels
        self.states: States = tuple(model.new_cache().states)
        self.dtype = next(model.parameters()).dtype  # feed the model its own dtype; integrate in fp32
        self.cuda_graphs = compiled and labels.device.type == "cuda"
        self.step = compiled_model_step(labels.device.type) if compiled else model_step
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        x_in = torch.cat([x, x]) if self.guided else x
        x_in = rearrange(x_in, "b c h w -> b 1 c h w").to(self.dtype)
        t_in = torch.full((x_in.shape[0], 1), t, device=x.device, dtype=self.dtype)
        if self.cuda_graphs:  # a new replay; what we keep of the last one (the states) is copied out of its pool
            torch.compiler.cudagraph_mark_step_begin()
        velocity, states = self.step(self.model, x_in, t_in, self.labels, self.states)
        self.states = tuple(_copied(s) for s in states) if self.cuda_graphs else states
        velocity = rearrange(velocity, "b 1 c h w -> b c h w").float()
        self.calls += 1
        if not self.guided:
            return velocity
        cond, uncond = velocity.chunk(2)
        guided = uncond + self.cfg_scale * (cond - uncond)
        if self.guided_channels is None:
            return guided
        g = self.guided_channels
        return torch.cat([guided[:, :g], cond[:, g:]], dim=1)


def _copied(state: object) -> object:
    """A tensor state cloned (out of a CUDA graph's memory pool); None passes through."""
    return state.clone() if isinstance(state, torch.Tensor) else state


def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(0 if generator is None else int(generator))


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, *, sampler: str = "ode", steps: int = 50,
           cfg_scale: float = 1.0, guided_channels: Optional[int] = None,
           generator: torch.Generator | int | None = None, compile: Optional[bool] = None) -> torch.Tensor:
    """Generate images (B, C, H, W) in data space for `labels` (B,); same generator seed, same images.

    guided_channels: None guides all channels, 3 guides only the first 3 (reference habit).
    generator: a CPU torch.Generator or an int seed.
    compile: the model call of each step compiled (CUDA graphs on CUDA); None: on CUDA only.
    """
    net = unwrap_model(model)
    if sampler not in ("ode", "sde"):
        raise ValueError(f"sample: sampler {sampler!r} is not 'ode' or 'sde'")
    if steps < 1 or (sampler == "sde" and steps < 2):
        raise ValueError(f"sample: steps={steps} too small for sampler {sampler!r}")
    d = net.dims
    if guided_channels is not None and not 1 <= guided_channels <= d.in_channels:
        raise ValueError(f"sample: guided_channels={guided_channels} not in 1..{d.in_channels}")
    param = next(net.parameters())
    generator = _generator(generator)
    labels = labels.to(device=param.device, dtype=torch.long)
    shape = (labels.shape[0], d.in_channels, d.image_size, d.image_size)
    x = torch.randn(shape, generator=generator).to(param.device)  # fp32 trajectory
    velocity = GuidedVelocity(net, labels, cfg_scale, guided_channels, use_compiled(compile, net, param.device))
    if sampler == "ode":
        times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
        for t_cur, t_next in zip(times[:-1], times[1:]):
            x = x + (t_next - t_cur) * velocity(x, t_cur)
        return x
    times = torch.linspace(0.0, 1.0 - LAST_STEP, steps, dtype=torch.float64).tolist()

    def drift(x: torch.Tensor, t: float) -> torch.Tensor:
        v = velocity(x, t)
        score = (t * v - x) / (1 - t)
        return v + (1 - t) * score

    for t_cur, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t_cur
        noise = torch.randn(shape, generator=generator).to(param.device)
        x = x + drift(x, t_cur) * dt + (2 * (1 - t_cur) * dt) ** 0.5 * noise
    return x + drift(x, times[-1]) * LAST_STEP
