"""Seeding: every random draw of step s, micro-step m on rank r comes from a generator seeded with
(seed, r, s, m), and the process RNG states travel in checkpoints, so a resumed run draws what an
uninterrupted one would."""
from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator seeded from (seed, rank, step, micro-step)."""
    digest = hashlib.sha256(f"arflow/{seed}/{rank}/{step}/{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def rng_state() -> dict[str, Any]:
    """All RNG states of this process as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
