"""The CPU fp32 training of the demo configuration is a contract: its parameter and EMA hashes stay
bit-identical unless a change says its numerics change (then record the new values here, saying why).

fp32 CPU kernels round differently by the vector width torch dispatches to (`torch.backends.cpu.
get_cpu_capability()`; with `ATEN_CPU_CAPABILITY=default` this demo gives a third pair of hashes), so each
machine kind has its own record. A run must equal one of them; on a machine none matches, the failure names
the capability and the hashes: record them from a commit whose numerics are known unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from arflow_scale.cli import main

pytestmark = pytest.mark.slow
DEMO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")

# `arflow train --config configs/demo.yaml train.steps=60 checkpoint.every=30 train.sample_every=0
# tracking.enabled=false` on CPU (2 workers, ZeRO-2, fp32), as recorded on each machine kind:
GOLDEN_RUNS = {
    # 2026-11-26, before the trainer was split, on the machine kind CI ran on then (its CPU capability was
    # not written down); every CI run since has matched it.
    "ci-2026-11-26": {
        "final_step": 60,
        "final_loss": 0.9167394042015076,
        "params_sha256": "9c42b4b0f0b5be215ef439712a4dbcadd16918461eb4eed7012235c4eb741702",
        "ema_sha256": "2692a5ce1854f13126a10fe31799589fce71acba84599855c4fb671e32942fd2",
    },
    # 2026-11-28, AMD EPYC (family 25, model 1), torch CPU capability AVX2, at the code of the run above
    # (0dbd005): the same training, another rounding.
    "amd-epyc-avx2": {
        "final_step": 60,
        "final_loss": 0.917574942111969,
        "params_sha256": "afebe4c39e265a0204057fc744963948f301b651cabd85b742ad65f6623e8bf2",
        "ema_sha256": "b029fabf6afa7d724010f6934f80d7d19faa2a59c12105e3e4474807c01ce72a",
    },
    # 2026-11-29, AMD EPYC (family 25, model 17), torch CPU capability AVX512: the same hashes at 0dbd005 (the
    # code of both runs above) and at d6386ad.
    "amd-epyc-avx512": {
        "final_step": 60,
        "final_loss": 0.9207025170326233,
        "params_sha256": "d6844ee43bd820f21a8961528df628069d7fb7e1fa276bfaa227286c0a45e490",
        "ema_sha256": "0e7ee40c317039131b09e8fe66273b05e5426ce467e8b876a6c1d07283f99600",
    },
}
GOLDEN_KEYS = ("final_step", "final_loss", "params_sha256", "ema_sha256")


def assert_golden(result: dict) -> None:
    """The run's step, loss and hashes equal one recorded run's, bit for bit."""
    ours = {key: result[key] for key in GOLDEN_KEYS}
    assert ours in GOLDEN_RUNS.values(), (
        f"the demo's hashes match no recorded run (this CPU's torch capability: "
        f"{torch.backends.cpu.get_cpu_capability()}): {ours}")


def test_demo_training_is_bit_identical_to_the_recorded_hashes(ray_local, tmp_path, capsys):
    code = main(["train", "--config", DEMO_CONFIG, "train.steps=60", "checkpoint.every=30", "train.sample_every=0",
                 "tracking.enabled=false", f"run.storage_path={tmp_path}/runs", f"data.manifest={tmp_path}/digits"])
    assert code == 0
    assert_golden(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
