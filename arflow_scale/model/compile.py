"""Compiling modules in place for training and sampling, with the compiler's caches in the user's cache folder."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_user_compile_cache() -> str:
    """Keep inductor's compiled kernels (and Triton's) in `$XDG_CACHE_HOME` (default ~/.cache)/arflow_scale/
    torchinductor, where later runs reuse them, unless TORCHINDUCTOR_CACHE_DIR names a folder. Returns it.

    Importing torch._dynamo writes torch's default (a temp folder) into the variable: that value counts as unset.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # loads the compiler: only when used

    current = os.environ.get(CACHE_ENV)
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ[CACHE_ENV] = str(base / "arflow_scale" / "torchinductor")
    return os.environ[CACHE_ENV]


def compile_forward(module: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile `module.forward` in place (once; a second call changes nothing) and return the module.

    Parameters, state-dict names and module hooks stay as they are; the hooks run eagerly around the compiled
    forward (DeepSpeed's ZeRO-3 gathering hooks among them, so they do not break the graph).
    """
    if "forward" not in vars(module):
        use_user_compile_cache()
        module.forward = torch.compile(module.forward, **compile_kwargs)
    return module


def is_compiled(module: nn.Module) -> bool:
    """True when `compile_forward` compiled this module's forward."""
    return "forward" in vars(module)
