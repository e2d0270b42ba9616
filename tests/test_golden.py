"""The CPU fp32 training of the demo configuration is a contract: its parameter and EMA hashes stay
bit-identical unless a change says its numerics change (then update the values here, saying why)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from arflow_scale.cli import main

pytestmark = pytest.mark.slow
DEMO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")

# `arflow train --config configs/demo.yaml train.steps=60 checkpoint.every=30 train.sample_every=0
# tracking.enabled=false` on CPU (2 workers, ZeRO-2, fp32), recorded 2026-11-26 before the trainer was split.
GOLDEN = {
    "final_step": 60,
    "final_loss": 0.9167394042015076,
    "params_sha256": "9c42b4b0f0b5be215ef439712a4dbcadd16918461eb4eed7012235c4eb741702",
    "ema_sha256": "2692a5ce1854f13126a10fe31799589fce71acba84599855c4fb671e32942fd2",
}


def test_demo_training_is_bit_identical_to_the_recorded_hashes(ray_local, tmp_path, capsys):
    code = main(["train", "--config", DEMO_CONFIG, "train.steps=60", "checkpoint.every=30", "train.sample_every=0",
                 "tracking.enabled=false", f"run.storage_path={tmp_path}/runs", f"data.manifest={tmp_path}/digits"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {key: result[key] for key in GOLDEN} == GOLDEN
