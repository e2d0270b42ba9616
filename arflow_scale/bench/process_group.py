"""A one-rank process group for the tools and tests that build DeepSpeed engines inside one process."""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist

_GROUP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_rank_group(device: torch.device) -> Iterator[None]:
    """Join a one-rank group on a free 127.0.0.1 port (NCCL on CUDA, gloo elsewhere); leave it on exit.

    A group that already exists is used as it is. DeepSpeed keeps its communicator for the process, so join once
    per process and keep the block open while engines are built. DeepSpeed's engine reads the rendezvous variables
    while it is built, so they stay set inside the block and are restored on exit: no later child process inherits
    the port, and a stale MASTER_PORT in the caller's environment is not used.
    """
    if dist.is_initialized():
        yield
        return
    from arflow_scale.train.engine import import_deepspeed

    deepspeed = import_deepspeed()
    saved = {name: os.environ.get(name) for name in _GROUP_ENV}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_local_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    try:
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
