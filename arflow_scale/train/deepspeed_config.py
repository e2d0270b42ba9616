"""Build the DeepSpeed config dict (ZeRO stage, precision, batch sizes, AdamW, clipping) from a Config.

The optimizer is DeepSpeed's `torch_adam` AdamW (plain `torch.optim.AdamW`, no compiled op; on CUDA its
`fused=True` step, on CPU its default implementation). Clipping
by norm goes to DeepSpeed's `gradient_clipping`; clipping by value is elementwise and therefore done by
`clip_grads_by_value` on the optimizer's (possibly partitioned, already averaged) gradients.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from arflow_scale.checkpoint.layout import param_group_names
from arflow_scale.config import Config


def resolve_precision(precision: str, device_type: str) -> str:
    """`auto` -> bf16 on GPU, fp32 on CPU; explicit choices pass through."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (ndim >= 2) only; biases, norms, vectors get none."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return [{"params": [params[n] for n in names], "weight_decay": weight_decay if decayed else 0.0}
            for names, decayed in param_group_names({n: p.ndim for n, p in params.items()})]


def build_deepspeed_config(cfg: Config, world_size: int, device_type: str = "cpu",
                           load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config for `cfg` on `world_size` data-parallel ranks (`cfg` holds the batch plan of that
    world size, `train.batching.with_plan`); `load_universal`: the engine will load a universal checkpoint."""
    precision = resolve_precision(cfg.train.precision, device_type)
    micro = cfg.data.batch_size
    adamw = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
             "weight_decay": cfg.optim.weight_decay, "torch_adam": True}
    if device_type == "cuda":
        adamw["fused"] = True  # passed through to torch.optim.AdamW
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro * cfg.train.grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": adamw},
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "gradient_clipping": cfg.optim.clip_value if cfg.optim.clip == "norm" else 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if cfg.train.zero_stage == 3:
        ds["zero_optimization"].update({
            "stage3_param_persistence_threshold": 0,  # every parameter partitioned (EMA relies on ds_tensor)
            "stage3_gather_16bit_weights_on_model_save": False,
            # compiled blocks trace torch's linear; DeepSpeed's replacement guards on parameter ids (engine.py)
            "memory_efficient_linear": not cfg.train.compile,
        })
    if cfg.train.zero_stage in (1, 2):
        ds["zero_optimization"]["contiguous_gradients"] = True
    overlap = overlap_comm(cfg, world_size, device_type)
    if overlap is not None:
        ds["zero_optimization"]["overlap_comm"] = overlap
    return ds


def overlap_comm(cfg: Config, world_size: int, device_type: str) -> Optional[bool]:
    """DeepSpeed's `overlap_comm` for this run, None to leave DeepSpeed's default (ZeRO-3's: on).

    `train.overlap_comm` when set; otherwise on at ZeRO 1-2 with several GPUs (NCCL reduces on its own stream
    while backward goes on) and off with one rank or on CPU (gloo has no stream to overlap on; the CPU runs keep
    their recorded numerics).
    """
    if cfg.train.zero_stage == 0:
        return None
    if cfg.train.overlap_comm is not None:
        return cfg.train.overlap_comm
    if cfg.train.zero_stage == 3:
        return None
    return device_type == "cuda" and world_size > 1


def clip_grads_by_value(optimizer: torch.optim.Optimizer, clip_value: float) -> None:
    """Clamp every gradient the optimizer is about to apply to [-clip_value, clip_value].

    Elementwise, so it gives the same result on ZeRO partitions as on full gradients.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.grad.clamp_(-clip_value, clip_value)


def install_value_clipping(basic_optimizer: torch.optim.Optimizer, clip_value: float):
    """Register a step pre-hook on the torch optimizer inside DeepSpeed that clips by value."""
    def hook(optimizer, args, kwargs):
        clip_grads_by_value(optimizer, clip_value)
    return basic_optimizer.register_step_pre_hook(hook)
