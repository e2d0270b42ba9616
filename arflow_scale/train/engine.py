"""The DeepSpeed engine of one rank: ZeRO 0-3, AdamW param groups, the lr schedule, clipping, blocks compiled
in place (`train.compile`); and reading its fp32 master weights back (hashes, the EMA's source)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from arflow_scale.config import Config
from arflow_scale.model.compile import compile_forward

from .deepspeed_config import build_deepspeed_config, install_value_clipping, param_groups
from .nonfinite import UpdateGate
from .schedule import make_scheduler


def import_deepspeed():
    """`import deepspeed` as every rank needs it. Returns the module.

    - Without the optional MLflow import of DeepSpeed's autotuner (which we never run): about 1 s of CPU in every
      rank's process; rank 0's tracker imports MLflow itself when it logs.
    - On DeepSpeed's CPU accelerator, without its shared-memory all-reduce op (`skip_shared_memory_op`).
    """
    if "deepspeed" not in sys.modules:
        with modules_absent("mlflow"):
            import deepspeed  # noqa: F401
    import deepspeed

    skip_shared_memory_op(deepspeed)
    return deepspeed


@contextmanager
def modules_absent(*names: str) -> Iterator[None]:
    """Inside the block, `import NAME` raises ImportError for each of `names` not yet imported (a library's
    optional import then goes without); afterwards they import as usual."""
    absent = [name for name in names if name not in sys.modules]
    sys.modules.update(dict.fromkeys(absent))
    try:
        yield
    finally:
        for name in absent:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def skip_shared_memory_op(deepspeed) -> Optional[str]:
    """Mark DeepSpeed's CPU shared-memory communication op unavailable, so its process group starts without it.
    -> the op's name; None off DeepSpeed's CPU accelerator (which alone has the op).

    DeepSpeed builds the op (a C++ extension) whenever a CPU process group starts, but only its inference
    all-reduce uses it: training reduces through gloo either way. The build costs about 45 s of CPU on a fresh
    machine, is redone whenever the virtual environment's path changes, and a build killed midway leaves a lock
    that every later run waits on in silence.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    builder = accelerator.create_op_builder("ShareMemCommBuilder") if accelerator.device_name() == "cpu" else None
    if builder is None:
        return None
    deepspeed.ops.__compatible_ops__[builder.NAME] = False  # DeepSpeed keeps this dict; build_shm_op reads it
    return builder.NAME


@dataclass
class Engine:
    """A DeepSpeed engine with what our loop adds around it."""

    engine: Any  # deepspeed.DeepSpeedEngine
    grad_norm_probe: Optional["GradNormProbe"]  # ZeRO-0 only: DeepSpeed reports the norm at stages 1-3
    bf16: bool
    gate: UpdateGate  # drops a step's update when its loss or gradient is not finite (train.nonfinite)

    def grad_norm(self) -> float:
        value = self.grad_norm_probe.value if self.grad_norm_probe is not None else self.engine.get_global_grad_norm()
        return float(value if value is not None else "nan")


def build_engine(cfg: Config, model: nn.Module, world_size: int, device_type: str, precision: str, *,
                 load_universal: bool = False, compile_units: Sequence[nn.Module] = ()) -> Engine:
    """deepspeed.initialize over `model` with our config, param groups, schedule and clipping; `load_universal`:
    the engine will restore a universal checkpoint (another world size at ZeRO 1-2, `train.reshard`).

    With `train.compile`, `compile_units` (the family's blocks, `ModelTask.compile_units`) are compiled in
    place first (`compile_blocks`).
    """
    deepspeed = import_deepspeed()  # after the worker chose its accelerator (DS_ACCELERATOR)

    if cfg.train.compile:
        if not compile_units:
            raise ValueError("train.compile: no blocks to compile were given to build_engine")
        compile_blocks(compile_units, cfg.train.zero_stage)
    if precision == "bf16":
        autocast_inside(model, device_type)
    ds_config = build_deepspeed_config(cfg, world_size, device_type, load_universal=load_universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=partial(make_scheduler, optim_cfg=cfg.optim, total_steps=cfg.train.steps))
    if cfg.train.compile and cfg.train.zero_stage == 3:
        restore_torch_linear()
    # step pre-hooks, in this order: the norm before anything changes it, the gate before clipping makes an
    # infinite gradient finite
    probe = GradNormProbe(engine.basic_optimizer) if cfg.train.zero_stage == 0 else None
    gate = UpdateGate(engine.basic_optimizer, check_grads=cfg.train.zero_stage == 0)  # ZeRO 1-3: DeepSpeed checks
    if cfg.optim.clip == "value":
        install_value_clipping(engine.basic_optimizer, cfg.optim.clip_value)
    return Engine(engine=engine, grad_norm_probe=probe, bf16=precision == "bf16", gate=gate)


def autocast_inside(module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Run `module`'s forward under autocast to `dtype` whatever the caller's autocast state (once per module).

    DeepSpeed's engine switches the caller's autocast off around its module on CUDA (unless its own
    `torch_autocast` section is on), so a bf16 engine's weights would meet the fp32 batch. Hooks rather than a
    wrapper: the state dict and `forward` stay the module's own, and the context is left even when forward raises.
    """
    if getattr(module, "_autocast_inside", None) is not None:
        return
    entered: list[torch.autocast] = []

    def enter(_module, _args) -> None:
        context = torch.autocast(device_type, dtype=dtype)
        context.__enter__()
        entered.append(context)

    def leave(_module, _args, _output) -> None:
        entered.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
    module._autocast_inside = dtype


def restore_torch_linear() -> bool:
    """Put torch's F.linear back where a ZeRO-3 engine of this process swapped in DeepSpeed's autograd wrapper
    (`memory_efficient_linear`; the swap outlives that engine). Compiled blocks traced the wrapper's parameter
    checks and, on torch 2.11, recompiled for each block until dynamo's limit of 8, leaving the rest eager (seen
    on an H200 at XL/2). Our compiled ZeRO-3 config turns the wrapper off. True if F.linear was restored."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit

    original = getattr(ZeroInit, "linear_bk", None)
    if original is None or torch.nn.functional.linear is original:
        return False
    torch.nn.functional.linear = original
    return True


def compile_blocks(blocks: Sequence[nn.Module], zero_stage: int) -> None:
    """Compile every block's forward in place before deepspeed.initialize (torchtitan's per-block compile:
    one graph, reused by every block of the same shape).

    Under ZeRO-3 each block becomes a DeepSpeed leaf module: its own hooks gather all its parameters at once,
    eagerly around the compiled forward, instead of hooks on every linear inside it (each a graph break).
    """
    from deepspeed.utils.z3_leaf_module import set_z3_leaf_module

    for block in blocks:
        if zero_stage == 3:
            set_z3_leaf_module(block, True)
        compile_forward(block)


def wrapper_masters(optimizer) -> dict[int, torch.Tensor]:
    """{id(param): fp32 master} from DeepSpeed's mixed-precision wrapper without ZeRO (bf16 at stage
    0 with our torch AdamW: FP16_UnfusedOptimizer, one fp32 copy per parameter in `fp32_groups`,
    in param-group order); {} for any other optimizer."""
    groups, copies = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if groups is None or copies is None:
        return {}
    return {id(p): c for params, masters in zip(groups, copies) for p, c in zip(params, masters)}


def full_fp32_params(engine, bf16: bool) -> dict[str, torch.Tensor]:
    """The full fp32 weights on every rank (a collective under ZeRO): gathered under ZeRO-3, master
    weights when training in bf16 (ZeRO 1-3 through DeepSpeed's accessor, ZeRO-0 from its
    mixed-precision wrapper), the module's own parameters otherwise."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    if bf16:
        out, flat = {}, None
        for name, param in params.items():
            master = safe_get_full_fp32_param(param)
            if master is None:  # no ZeRO: the wrapper optimizer holds the masters
                flat = flat if flat is not None else wrapper_masters(engine.optimizer)
                master = flat.get(id(param))
            if master is None:
                raise RuntimeError(f"no fp32 master weight for {name} in {type(engine.optimizer).__name__} "
                                   f"(ZeRO stage {engine.zero_optimization_stage()}, bf16)")
            out[name] = master.detach().float().cpu().clone()
        return out
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().cpu().clone() for n, p in params.items()}
    return {n: p.detach().float().cpu().clone() for n, p in params.items()}


class GradNormProbe:
    """Pre-clipping gradient norm for ZeRO stage 0 (ZeRO 1-3 report it through DeepSpeed)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.value = float("nan")
        self.armed = True  # measured only on steps that log it: the norm is a host sync
        optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if not self.armed:
            return
        grads = [p.grad.float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.value = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def mean_across_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (a collective)."""
    value = value.detach().float().reshape(1).cpu().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()
