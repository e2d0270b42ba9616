"""The tools' one-rank process group: joins on a free port, restores the environment, leaves on exit."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from arflow_scale.bench.process_group import single_rank_group


def test_single_rank_group_ignores_a_stale_port_and_restores_the_environment(monkeypatch):
    with socket.socket() as busy:  # a MASTER_PORT left behind by someone else, still listened on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        stale = str(busy.getsockname()[1])
        monkeypatch.setenv("MASTER_PORT", stale)
        monkeypatch.delenv("RANK", raising=False)
        with single_rank_group(torch.device("cpu")):
            assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
            assert os.environ["LOCAL_RANK"] == "0" and os.environ["MASTER_PORT"] != stale
            total = torch.ones(2)
            dist.all_reduce(total)
            assert total.tolist() == [1.0, 1.0]
            with single_rank_group(torch.device("cpu")):  # nested: the existing group serves
                assert dist.is_initialized()
            assert dist.is_initialized()
        assert not dist.is_initialized()
        assert os.environ["MASTER_PORT"] == stale and "RANK" not in os.environ
