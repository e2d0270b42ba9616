"""`arflow bench kernels`: the fused attention kernels compiled for sm_90 on this CPU machine, as Triton's JIT
would compile them on an H100/H200 (argument specialisation included). At head dim 64, the model's size, no
kernel may spill registers and the flash-style kernels' loads must stay pipelined: a regression in either is a
GPU slowdown that no CPU test would otherwise see."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

from arflow_scale.bench.kernels import programs_per_sm  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _compiled(*flags: str) -> tuple[list[dict], dict]:
    """`arflow bench kernels` at head dim 64 (in a process without TRITON_INTERPRET) -> (kernel lines, summary)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run([str(Path(sys.executable).with_name("arflow")), "bench", "kernels", "--batch", "1",
                           "--heads", "2", "--k", "2", "--head-dim", "64", *flags],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *kernels, summary = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    return kernels, summary


def test_programs_per_sm_takes_the_tightest_limit():
    assert programs_per_sm(90, registers=255, num_warps=8, shared_bytes=48 * 1024) == 1  # registers
    assert programs_per_sm(90, registers=128, num_warps=4, shared_bytes=0) == 4  # registers: 128 x 128 threads
    assert programs_per_sm(90, registers=32, num_warps=4, shared_bytes=100 * 1024) == 2  # shared memory
    assert programs_per_sm(90, registers=16, num_warps=4, shared_bytes=0) == 16  # threads: 2048 / 128
    assert programs_per_sm(80, registers=32, num_warps=4, shared_bytes=100 * 1024) == 1  # A100: 164 KB


@pytest.mark.skipif(not CUOBJDUMP.is_file(), reason=f"{CUOBJDUMP} is missing: this triton does not bundle it")
def test_kernels_at_head_dim_64_do_not_spill_and_pipeline_their_loads():
    """In a process of its own: the suite's TRITON_INTERPRET=1 (conftest) makes kernels that cannot be compiled."""
    kernels, summary = _compiled()
    assert [k["kernel"] for k in kernels] == ["chunk_kv_kernel", "state_scan_kernel", "hybrid_fwd_kernel",
                                              "prep_bwd_kernel", "state_grad_scan_kernel", "hybrid_bwd_kernel"]
    assert summary["spilling"] == [], kernels
    by_name = {k["kernel"]: k for k in kernels}
    for name in ("hybrid_fwd_kernel", "hybrid_bwd_kernel", "chunk_kv_kernel", "state_grad_scan_kernel"):
        assert by_name[name]["async_loads"] > 0, by_name[name]  # their loops prefetch into shared memory
    assert all(0 < k["registers"] <= 255 and k["programs_per_sm"] >= 1 for k in kernels)
    assert by_name["hybrid_fwd_kernel"]["tiles"] == {"BLOCK_M": 128, "BLOCK_N": 64}
    assert by_name["prep_bwd_kernel"]["grid"] == [4, 2, 2]  # 256-token chunks in blocks of 64 rows, 2 chunks, B*H


def test_bad_shapes_and_interpreted_kernels_are_refused_by_name(capsys):
    from arflow_scale.cli import main

    assert main(["bench", "kernels", "--head-dim", "8"]) == 2
    assert "--head-dim 8 is not one of 16, 32, 64, 128" in capsys.readouterr().err
    assert main(["bench", "kernels", "--tokens", "0"]) == 2
    assert "--tokens 0 must be at least 1" in capsys.readouterr().err
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not set in this process (tests/conftest.py sets it without CUDA)")
    assert main(["bench", "kernels"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


@pytest.mark.skipif(not CUOBJDUMP.is_file(), reason=f"{CUOBJDUMP} is missing: this triton does not bundle it")
def test_exact_fp32_dots_are_3xtf32_and_spill_nowhere():
    """`train.tf32: false` gives the kernels' fp32 dots as 3xTF32; exact fp32 dots spilled the fused forward and
    backward (512 and 1,696 bytes per thread at head dim 64, Triton 3.9)."""
    from arflow_scale.model.attention_triton import _fp32_dot_precision

    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _fp32_dot_precision() == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert _fp32_dot_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)
    kernels, summary = _compiled("--tf32", "off")
    assert summary["shape"]["tf32"] == "off" and summary["spilling"] == [], kernels


@pytest.mark.skipif(not CUOBJDUMP.is_file(), reason=f"{CUOBJDUMP} is missing: this triton does not bundle it")
def test_kernels_of_the_sdpa_backend_compile_without_spilling():
    """`model.attention_backend=triton_sdpa` runs the same six kernels without their softmax parts (constexpr
    branches the interpreter tests cannot compile): they build for sm_90 and none spills."""
    kernels, summary = _compiled("--softmax", "sdpa")
    assert summary["shape"]["softmax"] == "sdpa" and summary["spilling"] == [], kernels
    by_name = {k["kernel"]: k for k in kernels}
    assert set(by_name) == {"chunk_kv_kernel", "state_scan_kernel", "hybrid_fwd_kernel", "prep_bwd_kernel",
                            "state_grad_scan_kernel", "hybrid_bwd_kernel"}
    # without the softmax loop the forward holds one (128, 64) tile and the (64, 64) state: more programs fit
    assert by_name["hybrid_fwd_kernel"]["registers"] < 128 and by_name["hybrid_fwd_kernel"]["programs_per_sm"] >= 2
