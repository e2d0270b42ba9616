"""Checkpoint files: weights hashing, RNG state, completeness of a checkpoint, latest checkpoint."""
from __future__ import annotations

import json

import pytest
import torch


def test_state_dict_sha256_bitwise():
    from arflow_scale.checkpoint import state_dict_sha256

    sd = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    same = {"b": torch.zeros(3), "a": torch.ones(2, 2)}
    assert state_dict_sha256(sd) == state_dict_sha256(same)
    nudged = {"a": torch.ones(2, 2), "b": torch.tensor([0.0, 0.0, 1e-30])}
    assert state_dict_sha256(sd) != state_dict_sha256(nudged)


def test_rng_state_roundtrip_weights_only(tmp_path):
    import random

    import numpy as np

    from arflow_scale.train.rng import rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(2), np.random.rand(), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(2), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]


def fake_checkpoint(run, step: int, world: int, drop: str | None = None, truncate: str | None = None):
    folder = run / f"checkpoint_{step:09d}"
    for rank in range(world):
        files = {f"data/rank_{rank}.pt": b"x" * (10 + rank)}
        if rank == 0:
            files["meta.json"] = json.dumps({"step": step, "world_size": world}).encode()
        for rel, payload in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(payload)
        (folder / "ranks").mkdir(exist_ok=True)
        (folder / "ranks" / f"rank_{rank}.json").write_text(
            json.dumps({"rank": rank, "files": {k: len(v) for k, v in files.items()}}))
    if drop:
        (folder / drop).unlink()
    if truncate:
        (folder / truncate).write_bytes(b"x")
    return folder


def test_latest_checkpoint_skips_incomplete(tmp_path):
    from arflow_scale.checkpoint import is_complete, latest_checkpoint

    run = tmp_path / "run"
    assert latest_checkpoint(str(run)) is None
    fake_checkpoint(run, 2, world=2)
    fake_checkpoint(run, 4, world=2, drop="ranks/rank_1.json")  # rank 1's upload never finished
    fake_checkpoint(run, 6, world=2, truncate="data/rank_1.pt")  # a half-written file
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert not is_complete(str(run / "checkpoint_000000004"))
    assert latest_checkpoint(str(run)) == f"{run}/checkpoint_000000002"
    fake_checkpoint(run, 8, world=2)
    assert latest_checkpoint(str(run)) == f"{run}/checkpoint_000000008"


def test_resolve_checkpoint_errors(tmp_path):
    from arflow_scale.checkpoint import resolve_checkpoint

    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint(str(tmp_path / "nothing"))
    fake_checkpoint(tmp_path / "run", 4, world=2, drop="data/rank_1.pt")
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint(str(tmp_path / "run" / "checkpoint_000000004"))
