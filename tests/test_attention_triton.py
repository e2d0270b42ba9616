"""The fused Triton hybrid attention against the plain-PyTorch reference `hybrid_attention` (fp64), both as one
set of kernels (`hybrid_attention_triton`) and with the softmax inside each chunk left to SDPA
(`hybrid_attention_sdpa_triton`); each test runs both.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
shapes are tiny and the block sizes small so that every chunk spans several blocks.
Tolerances, as max |triton - reference| / max |reference| per tensor: fp32 inputs 2e-6 (outputs,
states, all gradients; measured up to 5e-7); fp16 inputs 2e-3 (measured 5e-4); bf16 inputs 1e-2 for
the output and 2e-2 for gradients (measured 5e-3 and 8e-3; the torch reference in bf16 itself is off
by up to 5e-3); the fp32 states and their gradients 2e-6 whatever the input dtype.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from arflow_scale.model.attention import chunk_attention, hybrid_attention, intra_chunk_softmax

triton = pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot run")

from arflow_scale.model.attention_triton import (HybridBlocks, forward_launches,  # noqa: E402
                                                 hybrid_attention_sdpa_triton, hybrid_attention_triton,
                                                 interpreting)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not CUDA and not interpreting(),
                       reason="no CUDA, and TRITON_INTERPRET=1 was not set before triton was imported"),
]
SMALL = HybridBlocks(fwd_m=16, fwd_n=16, bwd=16, bwd_sub=16, scan=16, prep=16)
FP32_TOL = 2e-6
FUSED = pytest.mark.parametrize("fused", [hybrid_attention_triton, hybrid_attention_sdpa_triton],
                                ids=["triton", "triton_sdpa"])


def model_like_inputs(chunks, chunk, dim, dtype=torch.float32, batch=1, heads=2, seed=0):
    """RMS-normed q, k, v (B, H, L, D) and log_decay (B, H, L) <= 0, as the model's strided views."""
    g = torch.Generator().manual_seed(seed)
    length = chunks * chunk
    qkv = F.rms_norm(torch.randn(batch, length, 3, heads, dim, generator=g), (dim,))
    q, k, v = (rearrange(t, "b l h d -> b h l d") for t in qkv.to(DEVICE, dtype).unbind(2))
    log_decay = F.logsigmoid(2 * torch.randn(batch, length, heads, generator=g)) / 4
    return q, k, v, rearrange(log_decay.to(DEVICE, dtype), "b l h -> b h l")


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


def forward_backward(fn, inputs, chunk, state, grads):
    """fn's out, state and the gradients of its inputs (q, k, v, log_decay[, state]) for given upstream grads."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    init = state.detach().clone().requires_grad_(True) if state is not None else None
    out, final = fn(*leaves, chunk, init)
    torch.autograd.backward([out, final], list(grads))
    return out.detach(), final.detach(), [t.grad for t in leaves + ([init] if init is not None else [])]


def compare_to_reference(fused, chunks, chunk, dim, dtype, with_state, blocks, seed=0):
    """Relative errors of out, state and every gradient against the fp64 reference, same upstream grads."""
    inputs = model_like_inputs(chunks, chunk, dim, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    state = torch.randn(1, 2, dim, dim, generator=g).to(DEVICE) if with_state else None
    grads = (torch.randn(inputs[0].shape, generator=g).to(DEVICE, dtype),
             torch.randn(1, 2, dim, dim, generator=g).to(DEVICE))
    out, final, dx = forward_backward(lambda *a: fused(*a, blocks=blocks), inputs, chunk,
                                      state, grads)
    ref_out, ref_final, ref_dx = forward_backward(
        hybrid_attention, [t.double() for t in inputs], chunk, None if state is None else state.double(),
        [t.double() for t in grads])
    assert out.dtype == dtype and final.dtype == torch.float32
    assert [t.dtype for t in dx] == [t.dtype for t in inputs] + ([torch.float32] if with_state else [])
    return (relative_error(out, ref_out), relative_error(final, ref_final),
            [relative_error(a, b) for a, b in zip(dx, ref_dx)])


@pytest.mark.parametrize("chunks, chunk, dim, with_state, blocks", [
    pytest.param(3, 32, 16, False, SMALL, id="chunk-multiple-of-block"),
    pytest.param(3, 20, 16, True, SMALL, id="chunk-not-multiple-of-block-with-state"),
    pytest.param(4, 4, 16, False, None, id="chunk-smaller-than-block"),
    pytest.param(2, 20, 64, True, None, id="head-dim-64"),
    pytest.param(1, 20, 16, True, SMALL, id="one-chunk-with-state"),
    pytest.param(2, 16, 32, False, None, id="head-dim-32"),
    pytest.param(2, 16, 128, True, None, id="head-dim-128"),
])
@FUSED
def test_fp32_forward_and_gradients_match_reference(fused, chunks, chunk, dim, with_state, blocks):
    out_err, state_err, grad_errs = compare_to_reference(fused, chunks, chunk, dim, torch.float32, with_state, blocks)
    assert out_err < FP32_TOL and state_err < FP32_TOL
    assert max(grad_errs) < FP32_TOL, grad_errs


@pytest.mark.parametrize("dtype, chunks, chunk, dim, with_state, blocks, out_tol, grad_tol", [
    pytest.param(torch.bfloat16, 3, 20, 64, True, SMALL, 1e-2, 2e-2, id="bf16-d64-with-state"),
    pytest.param(torch.bfloat16, 2, 48, 16, False,
                 HybridBlocks(fwd_m=32, fwd_n=32, bwd=32, bwd_sub=16, scan=32, prep=32), 1e-2, 2e-2,
                 id="bf16-d16-blocks-32"),
    pytest.param(torch.float16, 2, 24, 32, True, SMALL, 2e-3, 2e-3, id="fp16-d32-with-state"),
])
@FUSED
def test_half_precision_forward_and_gradients_match_reference(fused, dtype, chunks, chunk, dim, with_state, blocks,
                                                              out_tol, grad_tol):
    out_err, state_err, grad_errs = compare_to_reference(fused, chunks, chunk, dim, dtype, with_state, blocks)
    assert out_err < out_tol and state_err < FP32_TOL
    assert max(grad_errs[:4]) < grad_tol, grad_errs
    assert all(err < FP32_TOL for err in grad_errs[4:]), grad_errs


@FUSED
def test_single_chunk_has_no_inter_part_and_zero_decay_gradient(fused):
    """K=1 without state (SiT): out is the softmax within the chunk, the state K^T V / sqrt(D)."""
    q, k, v, log_decay = (t.requires_grad_(True) for t in model_like_inputs(1, 20, 16))
    out, final = fused(q, k, v, log_decay, 20, blocks=SMALL)
    assert relative_error(out, intra_chunk_softmax(q, k, v, 20).double()) < FP32_TOL
    expected_state = torch.einsum("bhcx,bhcy->bhxy", k.double(), v.double()) / 4
    assert relative_error(final, expected_state) < FP32_TOL
    out.sum().backward()
    assert torch.equal(log_decay.grad, torch.zeros_like(log_decay))


@FUSED
def test_chunk_by_chunk_with_state_equals_whole_sequence(fused):
    """Outputs and gradients agree when 3 chunks are fed as 1 + 2 with the state carried between calls."""
    chunk, inputs = 20, model_like_inputs(3, 20, 16, seed=3)
    upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def run(split):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        outs, state, start = [], None, 0
        for n in split:
            part = slice(start * chunk, (start + n) * chunk)
            out, state = fused(*(t[:, :, part] for t in leaves), chunk, state, blocks=SMALL)
            outs.append(out)
            start += n
        out = torch.cat(outs, dim=2)
        (out * upstream).sum().backward()
        return out.detach(), state.detach(), [t.grad for t in leaves]

    whole, whole_state, whole_grads = run([3])
    parts, parts_state, parts_grads = run([1, 2])
    assert relative_error(parts, whole.double()) < FP32_TOL
    assert relative_error(parts_state, whole_state.double()) < FP32_TOL
    for a, b in zip(parts_grads, whole_grads):
        assert relative_error(a, b.double()) < FP32_TOL


@FUSED
def test_inference_forward_equals_training_forward_and_backward_runs_once(fused):
    """Without autograd the intra part is not kept; the outputs are the same. A second backward is refused."""
    inputs = model_like_inputs(2, 20, 16, seed=6)
    with torch.no_grad():
        plain, plain_state = fused(*inputs, 20, blocks=SMALL)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out, state = fused(*leaves, 20, blocks=SMALL)
    assert torch.equal(out.detach(), plain) and torch.equal(state.detach(), plain_state)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.sum().backward()


@pytest.mark.parametrize("backend", ["triton", "triton_sdpa"])
def test_backend_switch_selects_the_kernels(backend):
    q, k, v, log_decay = (t.requires_grad_(True) for t in model_like_inputs(2, 16, 16, seed=5))
    fused, fused_state = chunk_attention("hybrid", q, k, v, log_decay, 16, None, backend=backend)
    ref, ref_state = chunk_attention("hybrid", q, k, v, log_decay, 16, None, backend="torch")
    assert relative_error(fused, ref.double()) < FP32_TOL
    assert relative_error(fused_state, ref_state.double()) < FP32_TOL
    assert "HybridAttention" in type(fused.grad_fn).__name__  # the kernels' autograd, not the reference's sum


@pytest.mark.parametrize("backend", ["triton", "triton_sdpa"])
def test_compiled_code_runs_the_kernels_as_they_are(backend):
    """Under torch.compile the fused kernels are not traced (one graph break around them); same outputs."""
    import torch._dynamo

    q, k, v, log_decay = model_like_inputs(2, 16, 16, seed=7)

    def attend(q, k, v, log_decay):
        out, state = chunk_attention("hybrid", q * 2, k, v, log_decay, 16, None, backend=backend)
        return out + 1, state

    explained = torch._dynamo.explain(attend)(q, k, v, log_decay)
    assert explained.graph_break_count == 1, explained.break_reasons
    compiled_out, compiled_state = torch.compile(attend, backend="eager")(q, k, v, log_decay)
    out, state = attend(q, k, v, log_decay)
    assert torch.equal(compiled_out, out) and torch.equal(compiled_state, state)


def test_bad_inputs_are_named(monkeypatch):
    q, k, v, log_decay = model_like_inputs(2, 16, 16)
    with pytest.raises(ValueError, match="head_dim 8"):
        hybrid_attention_triton(q[..., :8], k[..., :8], v[..., :8], log_decay, 16)
    with pytest.raises(ValueError, match="float64"):
        hybrid_attention_triton(q.double(), k.double(), v.double(), log_decay, 16)
    with pytest.raises(ValueError, match="chunk_size=12"):
        hybrid_attention_triton(q, k, v, log_decay, 12)
    with pytest.raises(ValueError, match="log_decay"):
        hybrid_attention_triton(q, k, v, log_decay[:, :, :16], 16)
    with pytest.raises(ValueError, match="state"):
        hybrid_attention_triton(q, k, v, log_decay, 16, torch.zeros(1, 2, 16, 8, device=DEVICE))
    with pytest.raises(ValueError, match="fwd_m=24"):
        hybrid_attention_triton(q, k, v, log_decay, 16, blocks=HybridBlocks(fwd_m=24))
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA"):
            hybrid_attention_triton(q, k, v, log_decay, 16)


def test_blocks_parse_and_fit():
    blocks = HybridBlocks.parse("fwd_m=32, bwd_warps=8")
    assert blocks == HybridBlocks(fwd_m=32, bwd_warps=8)
    assert blocks.fitted(4).fwd_m == 16 and blocks.fitted(256).fwd_m == 32
    assert HybridBlocks.for_head_dim(128).bwd_warps == 8 and HybridBlocks.for_head_dim(64) == HybridBlocks()
    with pytest.raises(ValueError, match="'fwd_x=2'"):
        HybridBlocks.parse("fwd_x=2")
    capped = HybridBlocks.parse("fwd_maxnreg=128").fitted(256)
    assert capped.fwd_options == {"maxnreg": 128} and HybridBlocks().fwd_options == {}
    with pytest.raises(ValueError, match="fwd_maxnreg=300"):
        HybridBlocks(fwd_maxnreg=300).fitted(256)
    q, k, v, log_decay = model_like_inputs(2, 16, 16, seed=9)
    fused_forward = forward_launches(q, k, v, log_decay, 16, None, HybridBlocks(fwd_maxnreg=128).fitted(16))[0][-1]
    assert fused_forward.meta["maxnreg"] == 128  # the cap reaches the fused forward's launch
    assert "maxnreg" not in forward_launches(q, k, v, log_decay, 16, None, HybridBlocks().fitted(16))[0][-1].meta
    # and the launch runs with it (the interpreter ignores the cap: the same output)
    capped_out, _ = hybrid_attention_triton(q, k, v, log_decay, 16, blocks=HybridBlocks(fwd_maxnreg=128))
    assert torch.equal(capped_out, hybrid_attention_triton(q, k, v, log_decay, 16)[0])


@FUSED
def test_output_is_laid_out_for_the_projection_and_kept_without_a_copy(fused):
    """out (B, H, L, D) lives in (B, L, H, D) memory: the model's "b h l d -> b l (h d)" is a view, so the output
    projection saves the same storage that backward keeps (one tensor per layer, as flash attention)."""
    q, k, v, log_decay = (t.requires_grad_(True) for t in model_like_inputs(2, 16, 16, seed=8))
    out, _ = fused(q, k, v, log_decay, 16, blocks=SMALL)
    merged = rearrange(out, "b h l d -> b l (h d)")
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()
    saved = {t.untyped_storage().data_ptr() for t in out.grad_fn.saved_tensors}
    assert out.untyped_storage().data_ptr() in saved


@FUSED
def test_autocast_runs_the_kernels_in_its_dtype(fused):
    """Under bf16 autocast fp32 q, k, v go in as bf16 (as SDPA takes them): the same output and gradients as bf16
    inputs given directly; log_decay and the state keep fp32."""
    inputs = model_like_inputs(2, 16, 16, seed=11)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)

    def run(cast, autocast):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        qkv = [t.to(torch.bfloat16) if cast else t for t in leaves[:3]]
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            out, state = fused(*qkv, leaves[3], 16, blocks=SMALL)
        (out.float() * grad).sum().backward()
        return out, state, [t.grad for t in leaves]

    out, state, grads = run(cast=False, autocast=True)
    direct, direct_state, direct_grads = run(cast=True, autocast=False)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert torch.equal(out, direct) and torch.equal(state, direct_state)
    assert all(torch.equal(a, b) for a, b in zip(grads, direct_grads))


def test_full_key_blocks_skip_the_softmax_mask():
    """When the blocks divide the chunk the kernels compile without the per-score mask (32 selects per thread
    and iteration fewer in the sm_90 forward); otherwise they keep it. Both forms are held to the reference by
    the tests above (chunks of 32 and 16 with 16-token blocks; chunks of 20 and 4)."""
    from arflow_scale.model.attention_triton import backward_launches

    def flags(chunk):
        inputs = model_like_inputs(2, chunk, 16)
        blocks = SMALL.fitted(chunk)
        forward, out, _, saved = forward_launches(*inputs, chunk, None, blocks)
        backward, _ = backward_launches(*inputs[:3], out, torch.zeros_like(out), None, saved, chunk, blocks,
                                        False, False)
        return forward[-1].meta["EVEN_N"], backward[-1].meta["EVEN_SUB"]

    assert flags(32) == (True, True) and flags(20) == (False, False)
