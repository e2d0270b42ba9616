"""Chunk-wise attention against naive references written here from docs/arflow.md §3.2-§3.5."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from arflow_scale.model.attention import (chunk_attention, full_attention, hybrid_attention,
                                          inter_chunk_linear, intra_attention, intra_chunk_softmax)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_inputs(batch=2, heads=3, chunks=4, chunk=5, dim=4, dtype=torch.float64, seed=0):
    """q, k, v (B, H, L, D) and log_decay (B, H, L) <= 0, like the model produces (but stronger decay)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, chunks * chunk, dim)
    q, k, v = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    log_decay = torch.nn.functional.logsigmoid(torch.randn(shape[:3], generator=g, dtype=dtype) * 2)
    return q, k, v, log_decay


def naive_hybrid(q, k, v, log_decay, chunk, state=None):
    """Token by token: softmax over the own chunk + q_p exp(cumsum g) times the decayed state."""
    batch, heads, length, dim = q.shape
    out = torch.zeros_like(q)
    k_scaled = k / math.sqrt(dim)
    final = torch.zeros(batch, heads, dim, dim, dtype=q.dtype)
    for b in range(batch):
        for h in range(heads):
            s = torch.zeros(dim, dim, dtype=q.dtype) if state is None else state[b, h].clone()
            for start in range(0, length, chunk):
                idx = range(start, start + chunk)
                query_decay = 0.0
                for p in idx:
                    query_decay = query_decay + log_decay[b, h, p]
                    scores = torch.stack([q[b, h, p] @ k_scaled[b, h, m] for m in idx])
                    weights = torch.softmax(scores, dim=0)
                    intra = sum(weights[i] * v[b, h, m] for i, m in enumerate(idx))
                    inter = (q[b, h, p] * torch.exp(query_decay)) @ s
                    out[b, h, p] = intra + inter
                chunk_decay = torch.exp(sum(log_decay[b, h, m] for m in idx) / chunk)
                s = s * chunk_decay
                for m in idx:
                    s = s + torch.outer(k_scaled[b, h, m], v[b, h, m])
            final[b, h] = s
    return out, final


def masked_softmax_block_causal(q, k, v, chunk):
    """Explicit (L, L) mask: token i sees token j iff chunk(j) <= chunk(i)."""
    length, dim = q.shape[2], q.shape[3]
    pos = torch.arange(length) // chunk
    allowed = pos[None, :] <= pos[:, None]
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_hybrid_equals_naive_token_by_token():
    q, k, v, g = random_inputs()
    out, state = hybrid_attention(q, k, v, g, chunk_size=5)
    ref_out, ref_state = naive_hybrid(q, k, v, g, chunk=5)
    assert torch.allclose(out, ref_out, atol=1e-10, rtol=0)
    assert torch.allclose(state, ref_state, atol=1e-10, rtol=0)


def test_hybrid_with_initial_state_equals_naive():
    q, k, v, g = random_inputs(chunks=3, seed=1)
    init = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out, state = hybrid_attention(q, k, v, g, chunk_size=5, state=init)
    ref_out, ref_state = naive_hybrid(q, k, v, g, chunk=5, state=init)
    assert torch.allclose(out, ref_out, atol=1e-10, rtol=0)
    assert torch.allclose(state, ref_state, atol=1e-10, rtol=0)


def test_hybrid_history_matters():
    """The inter part is not vacuous: changing chunk 0 changes chunk 2's output."""
    q, k, v, g = random_inputs()
    out, _ = hybrid_attention(q, k, v, g, chunk_size=5)
    v2 = v.clone()
    v2[:, :, :5] += 1.0
    out2, _ = hybrid_attention(q, k, v2, g, chunk_size=5)
    assert (out2[:, :, 10:15] - out[:, :, 10:15]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["hybrid", "full", "intra"])
@pytest.mark.parametrize("split", [[1, 1, 1, 1], [2, 2], [1, 3]])
def test_chunk_by_chunk_with_state_equals_whole(mode, split):
    q, k, v, g = random_inputs()
    whole, _ = chunk_attention(mode, q, k, v, g, 5, None)
    parts, state, start = [], None, 0
    for n in split:
        sl = slice(start * 5, (start + n) * 5)
        out, state = chunk_attention(mode, q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], 5, state)
        parts.append(out)
        start += n
    assert torch.allclose(torch.cat(parts, dim=2), whole, atol=1e-12, rtol=0)


def test_full_equals_explicitly_masked_softmax():
    q, k, v, _ = random_inputs()
    out, (keys, values) = full_attention(q, k, v, chunk_size=5)
    assert torch.allclose(out, masked_softmax_block_causal(q, k, v, 5), atol=1e-12, rtol=0)
    assert keys.shape == k.shape and values.shape == v.shape


def test_intra_equals_per_chunk_softmax_and_sit_at_one_chunk():
    q, k, v, _ = random_inputs(chunks=1)
    out, state = intra_attention(q, k, v, chunk_size=5)
    assert state is None
    assert torch.allclose(out, masked_softmax_block_causal(q, k, v, 5), atol=1e-12, rtol=0)
    q, k, v, _ = random_inputs(chunks=3)
    out, _ = intra_attention(q, k, v, chunk_size=5)
    for c in range(3):
        sl = slice(5 * c, 5 * c + 5)
        ref = masked_softmax_block_causal(q[:, :, sl], k[:, :, sl], v[:, :, sl], 5)
        assert torch.allclose(out[:, :, sl], ref, atol=1e-12, rtol=0)


def test_hybrid_gradcheck():
    q, k, v, g = random_inputs(batch=1, heads=2, chunks=3, chunk=2, dim=3)
    init = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, g, init)]

    def fn(q, k, v, g, s):
        out, state = hybrid_attention(q, k, v, g, chunk_size=2, state=s)
        return out, state

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_full_gradcheck():
    q, k, v, _ = random_inputs(batch=1, heads=1, chunks=3, chunk=2, dim=3)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: full_attention(q, k, v, 2)[0], inputs, eps=1e-6, atol=1e-7)


def test_bf16_autocast_accumulates_inter_part_in_fp32():
    q, k, v, g = random_inputs(dtype=torch.float32)
    ref, ref_state = hybrid_attention(q, k, v, g, chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = hybrid_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16(), chunk_size=5)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert (out.float() - ref).abs().max() < 0.1
    assert (state - ref_state).abs().max() < 0.05


@pytest.mark.parametrize("dtype, autocast", [(torch.float64, False), (torch.float32, False), (torch.float32, True)])
def test_single_chunk_fast_path_is_identical_to_the_general_path(dtype, autocast):
    """One chunk, no state: outputs, state and gradients bit-equal to intra + inter (log_decay's grad = 0)."""
    inputs = random_inputs(chunks=1, dtype=dtype)
    upstream = torch.randn(inputs[0].shape, dtype=dtype, generator=torch.Generator().manual_seed(1))

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, state = fn(*leaves)
        (out * upstream).sum().backward()
        return out, state, [t.grad for t in leaves]

    def general(q, k, v, g):
        inter, state = inter_chunk_linear(q, k, v, g, 5)
        return intra_chunk_softmax(q, k, v, 5) + inter, state

    fast, fast_state, fast_grads = run(lambda q, k, v, g: hybrid_attention(q, k, v, g, 5))
    ref, ref_state, ref_grads = run(general)
    assert fast.dtype == ref.dtype and torch.equal(fast, ref) and torch.equal(fast_state, ref_state)
    for a, b in zip(fast_grads, ref_grads):
        assert torch.equal(a, b)
    assert torch.equal(fast_grads[3], torch.zeros_like(inputs[3]))


def test_full_attention_flex_forward_equals_reference():
    from arflow_scale.model.attention_flex import full_attention_flex

    q, k, v, _ = (t.float() for t in random_inputs(chunks=4, chunk=5, dim=16))
    out, (keys, values) = full_attention_flex(q, k, v, 5)
    ref, _ = full_attention(q, k, v, 5)
    assert (out - ref).abs().max() < 1e-5 and keys is k and values is v
    state = (k[:, :, :10], v[:, :, :10])
    out, (keys, _) = full_attention_flex(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], 5, state)
    assert torch.equal(out, full_attention(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], 5, state)[0])
    assert keys.shape == k.shape


def test_full_attention_flex_gradients_equal_reference():
    from arflow_scale.model.attention_flex import full_attention_flex

    if not torch.cuda.is_available():
        pytest.skip("flex_attention has no backward on CPU (torch 2.13); this check needs CUDA")
    q, k, v, _ = (t.float().cuda() for t in random_inputs(chunks=4, chunk=5, dim=16))
    grads = []
    for fn in (full_attention_flex, full_attention):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*leaves, 5)[0].square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-4


def test_bad_inputs_are_named():
    q, k, v, g = random_inputs()
    with pytest.raises(ValueError, match="chunk_size=6"):
        hybrid_attention(q, k, v, g, chunk_size=6)
    with pytest.raises(ValueError, match="log_decay"):
        hybrid_attention(q, k, v, g[:, :, :5], chunk_size=5)
    with pytest.raises(ValueError, match="state"):
        hybrid_attention(q, k, v, g, chunk_size=5, state=torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        hybrid_attention(q, k[:, :1], v, g, chunk_size=5)
    with pytest.raises(ValueError, match="'sparse'"):
        chunk_attention("sparse", q, k, v, g, 5)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        chunk_attention("hybrid", q, k, v, g, 5, backend="cuda")


def test_peak_tracker_sees_temporaries():
    from arflow_scale.bench.attention import _peak_tracker

    x = torch.randn(500, 500)
    with _peak_tracker() as tracker:
        y = x @ x  # 1 MB, kept
        del y
        z = (x + 1) * 2  # 1 MB temporary + 1 MB result at the peak
    assert tracker.peak >= 2 * 500 * 500 * 4
    assert tracker.current == 500 * 500 * 4  # only z is alive
    del z


def test_attention_benchmark_prints_ratios(capsys):
    import json

    from arflow_scale.cli import main

    code = main(["bench", "attention", "--k", "1,3", "--tokens", "16", "--heads", "2", "--head-dim", "8",
                 "--repeats", "1", "--device", "cpu", "--variants", "intra,full,hybrid,hybrid_triton"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")]
    per_variant = [line for line in lines if "variant" in line]
    assert [(line["variant"], line["k"]) for line in per_variant] == [
        (name, k) for k in (1, 3) for name in ("intra", "full", "hybrid")]
    assert all(line["ms"] > 0 and line["peak_mib"] > 0 for line in per_variant)
    assert not any("device_ms" in line for line in per_variant)  # GPU busy time: CUDA only
    summary = lines[-1]
    assert any(why in summary["skipped"]["hybrid_triton"] for why in ("head_dim 8", "not installed"))
    assert [row["k"] for row in summary["results"]] == [1, 3]
    for row in summary["results"]:
        assert row["time_ratios"]["hybrid/intra"] == pytest.approx(row["hybrid_ms"] / row["intra_ms"], rel=0.05)
        assert row["memory_ratios"]["full/hybrid"] == pytest.approx(
            row["full_peak_mib"] / row["hybrid_peak_mib"], rel=0.05)
    assert main(["bench", "attention", "--k", "0"]) == 2
    assert main(["bench", "attention", "--variants", "hybrid,sparse"]) == 2


def test_attention_benchmark_ratios_pair_the_variants_measured():
    from arflow_scale.bench.attention import Measured, _ratios

    measured = {"intra": Measured(0.002, 100, 0.0005), "hybrid_triton": Measured(0.003, 80, 0.001),
                "hybrid": Measured(0.006, 300, 0.004)}
    ratios = _ratios(measured)
    assert ratios["time_ratios"] == {"hybrid/intra": 3.0, "hybrid_triton/intra": 1.5, "hybrid_triton/hybrid": 0.5}
    assert ratios["memory_ratios"]["hybrid_triton/intra"] == 0.8
    assert ratios["device_time_ratios"] == {"hybrid/intra": 8.0, "hybrid_triton/intra": 2.0,
                                            "hybrid_triton/hybrid": 0.25}
    without_device = {name: Measured(m.seconds, m.peak_bytes) for name, m in measured.items()}
    assert "device_time_ratios" not in _ratios(without_device)


def test_attention_benchmark_smoke_runs_every_variant_without_cluster_packages():
    """The form tools run on bare GPU machines: no Ray, MLflow or webdataset gets imported."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import argparse, sys\n"
        "from arflow_scale.bench import attention\n"
        "parser = argparse.ArgumentParser(); attention.add_arguments(parser)\n"
        "attention.run(parser.parse_args(['--smoke', '--device', 'cpu']))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'webdataset'}))\n")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *lines, imported = proc.stdout.strip().splitlines()
    assert imported == "[]"
    summary = json.loads(lines[-1])
    expected = ["intra", "full", "hybrid"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        expected += ["hybrid_triton", "hybrid_triton_sdpa"]
    assert summary["variants"] == expected and "full_flex" in summary["skipped"]
    for row in summary["results"]:
        assert all(row[f"{name}_ms"] > 0 for name in expected)
        assert "hybrid/intra" in row["time_ratios"]
