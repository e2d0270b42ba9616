"""Fused Triton kernels for `hybrid_attention` (same semantics, shapes and dtypes), forward and backward.

Forward, 3 launches (2 for one chunk without state): K_j^T V_j of every chunk in parallel, a per-(b, h)
scan over (D, D) tiles that leaves the fp32 states S_j before every chunk, then one fused kernel
per (query block, chunk, b*h) does the intra-chunk softmax flash-style and adds the
inter-chunk read (q_p * exp(cumsum of log_decay within the chunk)) @ S_j. Backward, 3 launches: a
pass per block of rows (softmax row terms, the inter part's dq and its per-row log-decay gradient),
a reverse scan over the chunks (dS_j, d(K_j^T V_j) and the chunk-decay gradients), and a flash-style
backward of the intra part that adds the inter part's dk, dv and the log-decay gradient. Backward
reads the forward's out (saved, as flash attention does), not a separate intra part; nothing of
size (L x L) or (chunk x chunk) is stored.

`hybrid_attention_sdpa_triton` runs the same launches with the softmax parts compiled out (HAS_INTRA=False):
SDPA computes the intra-chunk softmax and its backward, the kernels add the inter part to its output and
compute only the inter part's gradients.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported); its bf16 `tl.dot` is wrong, so the kernels multiply in fp32 there and in bf16 on a GPU.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch
import triton

from .attention import FUSED_DTYPES as DTYPES, FUSED_HEAD_DIMS as HEAD_DIMS, intra_chunk_softmax, \
    single_chunk_attention
from .hybrid_triton_bwd import hybrid_bwd_kernel, prep_bwd_kernel, state_grad_scan_kernel
from .hybrid_triton_fwd import LOG2E, chunk_kv_kernel, hybrid_fwd_kernel, state_scan_kernel


@dataclasses.dataclass(frozen=True)
class HybridBlocks:
    """Tile sizes (powers of two >= 16) and warps per kernel; tune on the GPU with the bench.

    fwd_m/fwd_n: query/key block of the fused forward; bwd/bwd_sub: own block and inner-loop block of
    the fused backward; prep: rows per program of the backward prep pass; scan: tokens per step of
    the chunk K^T V pass and of the backward scan's dS_j, scan_dv: state columns per program of that
    pass and of both scans (scan_warps runs both scans); fwd_maxnreg: a register cap per thread for the
    fused forward (0: the compiler's choice; 128 fits two of its 8-warp programs on an SM instead of one,
    at the price of a small spill: see `arflow bench kernels`). The defaults (`for_head_dim`) were chosen
    from sm_90 compiles (`arflow bench kernels`), not from timings: with TF32 fp32 dots (`train.tf32`, the
    default) no kernel spills registers at head dims 16-128 (Triton 3.6 and 3.9); with tf32 off the dots
    are 3xTF32, which spill nowhere at head dim 64 either (exact fp32 dots, without tensor cores, did).
    """
    fwd_m: int = 128
    fwd_n: int = 64
    fwd_warps: int = 8
    bwd: int = 64
    bwd_sub: int = 32
    bwd_warps: int = 4
    prep: int = 64
    prep_warps: int = 8
    scan: int = 64
    scan_dv: int = 32
    scan_warps: int = 4
    num_stages: int = 2
    fwd_maxnreg: int = 0

    @property
    def fwd_options(self) -> dict[str, int]:
        """Launch options of the fused forward beyond warps and stages."""
        return {"maxnreg": self.fwd_maxnreg} if self.fwd_maxnreg else {}

    @classmethod
    def parse(cls, text: str) -> "HybridBlocks":
        """'fwd_m=64,bwd=32,bwd_warps=8' -> HybridBlocks (unnamed fields keep their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            if name not in names or not value.strip().isdigit():
                raise ValueError(f"triton blocks: {item!r} is not NAME=INT with NAME in {', '.join(sorted(names))}")
            values[name] = int(value)
        return cls(**values)

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "HybridBlocks":
        """The defaults; head_dim 128 gets smaller query blocks and more warps (its fp32 tiles need the registers)."""
        return cls(fwd_m=64, prep=16, bwd_warps=8, scan_warps=8) if head_dim >= 128 else cls()

    def fitted(self, chunk_size: int) -> "HybridBlocks":
        """Blocks no larger than the chunk needs and at least 16 (tl.dot's minimum); all powers of two."""
        cap = max(16, triton.next_power_of_2(chunk_size))
        sizes = {}
        for name in ("fwd_m", "fwd_n", "bwd", "bwd_sub", "prep", "scan", "scan_dv"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"triton blocks: {name}={size} is not a power of two >= 16")
            sizes[name] = min(size, cap)
        if self.fwd_maxnreg and not 24 <= self.fwd_maxnreg <= 255:
            raise ValueError(f"triton blocks: fwd_maxnreg={self.fwd_maxnreg} is not 0 or 24-255 registers")
        return dataclasses.replace(self, **sizes)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fp32_dot_precision() -> str:
    """fp32 tl.dot follows torch's matmul setting: TF32, or 3xTF32 (about fp32's accuracy, still on tensor
    cores) when float32_matmul_precision is 'highest' (`train.tf32: false`)."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _check_inputs(q, k, v, log_decay, chunk_size, state) -> None:
    """Shapes, dtypes and devices the kernels support; errors name the offending argument."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"hybrid_attention_triton: q, k, v must share a (B, H, L, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, length, dim = q.shape
    if chunk_size <= 0 or length % chunk_size != 0 or length == 0:
        raise ValueError(f"hybrid_attention_triton: sequence length {length} is not a positive multiple of "
                         f"chunk_size={chunk_size}")
    if dim not in HEAD_DIMS:
        raise ValueError(f"hybrid_attention_triton: head_dim {dim} is not one of {HEAD_DIMS}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"hybrid_attention_triton: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}; "
                         f"need one of {', '.join(str(d) for d in DTYPES)}, the same for all three")
    if log_decay.shape != q.shape[:3]:
        raise ValueError(f"hybrid_attention_triton: log_decay must be (B, H, L) = {tuple(q.shape[:3])}, "
                         f"got {tuple(log_decay.shape)}")
    if state is not None and state.shape != (batch, heads, dim, dim):
        raise ValueError(f"hybrid_attention_triton: state must be (B, H, D, D), got {tuple(state.shape)}")
    for name, tensor in (("k", k), ("v", v), ("log_decay", log_decay), ("state", state)):
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"hybrid_attention_triton: {name} is on {tensor.device}, q on {q.device}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"hybrid_attention_triton: tensors on {q.device}; the kernels need CUDA "
                         f"(or TRITON_INTERPRET=1 set before triton is imported, for tests on CPU)")
    if q.numel() >= 2**31:
        raise ValueError(f"hybrid_attention_triton: {q.numel()} elements per tensor overflow int32 offsets")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch, `kernel[grid](*args, **meta)`, kept as data: tools compile it for a GPU
    architecture without one (`arflow bench kernels`)."""
    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    args: tuple
    meta: dict[str, Any]

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


def forward_launches(q, k, v, log_decay, chunk_size, state, blocks, intra=None):
    """The chunk K^T V pass, the scan and the fused kernel, with their buffers allocated ->
    (launches, out, new_state, what backward keeps); out and new_state hold results once the launches ran.
    `intra` (B, H, L, D): the softmax part computed elsewhere; the fused kernel then only adds the inter part."""
    batch, heads, length, dim = q.shape
    chunks, rows = length // chunk_size, batch * heads
    has_inter = chunks > 1 or state is not None
    flags = dict(INTERPRET=interpreting(), PRECISION=_fp32_dot_precision())
    f32 = dict(device=q.device, dtype=torch.float32)
    final = torch.empty(batch, heads, dim, dim, **f32)
    states = torch.empty(rows, chunks + 1, dim, dim, **f32) if has_inter else None
    gcum = torch.empty(rows, length, **f32) if has_inter else None
    block_dv = min(dim, blocks.scan_dv)
    # K_j^T V_j lands in states slot j + 1 (the scan turns it into S_{j+1}), or straight in final
    kv, kv_stride = (states[:, 1:], (chunks + 1) * dim * dim) if has_inter else (final, dim * dim)
    launches = [Launch(chunk_kv_kernel, (chunks, rows, dim // block_dv), (
        k, v, log_decay, kv, gcum, *k.stride(), *v.stride(), *log_decay.stride(), kv_stride,
        heads, length, chunk_size, dim ** -0.5), dict(
        D=dim, BLOCK_DV=block_dv, BLOCK_C=blocks.scan, STORE_GCUM=has_inter, num_warps=blocks.scan_warps, **flags))]
    if has_inter:
        state_in = state.to(torch.float32).contiguous() if state is not None else None
        launches.append(Launch(state_scan_kernel, (rows, dim // block_dv), (
            states, gcum, state_in, final, length, chunk_size, chunks), dict(
            D=dim, BLOCK_DV=block_dv, HAS_STATE_IN=state is not None, num_warps=blocks.scan_warps)))
    # laid out (B, L, H, D): the model's "b h l d -> b l (h d)" is then a view, and the output projection
    # saves the very tensor backward keeps here, not a copy
    out = torch.empty(batch, length, heads, dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(rows, length, **f32) if intra is None else None
    base = out if intra is None else intra  # what the kernel adds the inter part to (itself: not read)
    launches.append(Launch(hybrid_fwd_kernel, (triton.cdiv(chunk_size, blocks.fwd_m), chunks, rows), (
        q, k, v, gcum, states, out, lse if intra is None else out, base, *q.stride(), *k.stride(), *v.stride(),
        *out.stride(), *base.stride(), heads, length, chunk_size, chunks, dim ** -0.5 * LOG2E), dict(
        D=dim, BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n, HAS_INTER=has_inter, HAS_INTRA=intra is None,
        EVEN_N=chunk_size % blocks.fwd_n == 0, num_warps=blocks.fwd_warps, num_stages=blocks.num_stages,
        **blocks.fwd_options, **flags)))
    return launches, out, final, _Saved(lse, gcum, states)


@dataclasses.dataclass
class _Saved:
    """Forward intermediates backward needs besides q, k, v and out: lse (B*H, L), gcum (B*H, L) and
    states (B*H, chunks + 1, D, D), the last two None without inter-chunk work, lse None when the softmax
    part was computed elsewhere (`hybrid_attention_sdpa_triton`)."""
    lse: Optional[torch.Tensor]
    gcum: Optional[torch.Tensor]
    states: Optional[torch.Tensor]


def _autocast_inputs(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in the autocast dtype when autocast is on (as SDPA would take them), else as they are."""
    if not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    low = torch.get_autocast_dtype(q.device.type)
    return q.to(low), k.to(low), v.to(low)


@torch.compiler.disable  # inside compiled code the kernels run as they are, one graph break around them
def hybrid_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                            chunk_size: int, state: Optional[torch.Tensor] = None,
                            blocks: Optional[HybridBlocks] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`hybrid_attention` on fused Triton kernels: q, k, v (B, H, L, D), log_decay (B, H, L) <= 0,
    state (B, H, D, D) or None -> out (B, H, L, D) in q's dtype, fp32 state after the last chunk.

    Under autocast q, k, v are cast to the autocast dtype (as SDPA would); log_decay and the state
    keep theirs. `blocks` overrides the tile sizes (default `HybridBlocks.for_head_dim`).
    """
    _check_inputs(q, k, v, log_decay, chunk_size, state)
    q, k, v = _autocast_inputs(q, k, v)
    blocks = (blocks or HybridBlocks.for_head_dim(q.shape[-1])).fitted(chunk_size)
    with torch.autocast(q.device.type, enabled=False):
        return _HybridAttention.apply(q, k, v, log_decay, state, None, chunk_size, blocks)


@torch.compiler.disable
def hybrid_attention_sdpa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                                 chunk_size: int, state: Optional[torch.Tensor] = None,
                                 blocks: Optional[HybridBlocks] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`hybrid_attention_triton` with the softmax inside each chunk done by SDPA (cuDNN or flash kernels on a GPU,
    `intra_chunk_softmax`) and only the inter-chunk read, its state and their gradients by the Triton kernels.
    Same arguments, results and gradients; one chunk without state is `single_chunk_attention`."""
    _check_inputs(q, k, v, log_decay, chunk_size, state)
    q, k, v = _autocast_inputs(q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        if state is None and q.shape[2] == chunk_size:
            return single_chunk_attention(q, k, v, log_decay)
        blocks = (blocks or HybridBlocks.for_head_dim(q.shape[-1])).fitted(chunk_size)
        intra = intra_chunk_softmax(q, k, v, chunk_size)
        return _HybridAttention.apply(q, k, v, log_decay, state, intra, chunk_size, blocks)


FUSED_HYBRID = {"triton": hybrid_attention_triton, "triton_sdpa": hybrid_attention_sdpa_triton}  # by backend


class _HybridAttention(torch.autograd.Function):
    """Autograd of the fused kernels; gradients of q, k, v, log_decay and the incoming state. Given `intra` (the
    softmax part, computed by the caller) the kernels add the inter part to it, and its gradient is d_out."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, state, intra, chunk_size, blocks):
        launches, out, final, saved = forward_launches(q, k, v, log_decay, chunk_size, state, blocks, intra)
        for launch in launches:
            launch()
        ctx.save_for_backward(q, k, v, out)
        ctx.saved = saved  # intermediates (not inputs/outputs): dropped as soon as backward is done with them
        ctx.meta = (chunk_size, blocks, log_decay.dtype, state is not None,
                    None if state is None else state.dtype)
        ctx.set_materialize_grads(False)
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, out = ctx.saved_tensors
        chunk_size, blocks, decay_dtype, has_state, state_dtype = ctx.meta
        saved, ctx.saved = ctx.saved, None
        if saved is None:
            raise RuntimeError("hybrid_attention_triton: a second backward through the same graph "
                               "(retain_graph=True) is not supported; the first one freed the intermediates")
        d_intra = d_out if saved.lse is None else None  # out = intra + inter
        if d_out is None:
            d_out = torch.zeros_like(q)
        launches, grads = backward_launches(q, k, v, out, d_out, d_final, saved, chunk_size, blocks, has_state,
                                            ctx.needs_input_grad[4])
        for launch in launches:
            launch()
        dq, dk, dv, dlog_decay, dstate = grads
        dlog_decay = dlog_decay.to(decay_dtype)
        dstate = dstate.to(state_dtype) if dstate is not None else None
        return dq, dk, dv, dlog_decay, dstate, d_intra, None, None


def backward_launches(q, k, v, out, d_out, d_final, saved, chunk_size, blocks, has_state, want_dstate):
    """The prep pass, the reverse state scan and the fused backward, with their buffers allocated ->
    (launches, (dq, dk, dv, dlog_decay, dstate)); the gradients hold results once the launches ran.
    Without the softmax part (`saved.lse` None; out may be None) the gradients are the inter part's alone."""
    batch, heads, length, dim = q.shape
    chunks, rows = length // chunk_size, batch * heads
    has_inter, has_intra = saved.states is not None, saved.lse is not None
    flags = dict(INTERPRET=interpreting(), PRECISION=_fp32_dot_precision())
    f32 = dict(device=q.device, dtype=torch.float32)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dgcum = torch.empty(rows, length, **f32) if has_inter else None
    delta = torch.empty(rows, length, **f32) if has_intra else dgcum  # (not touched without the softmax)
    out = out if has_intra else d_out  # (not read without the softmax)
    launches = [Launch(prep_bwd_kernel, (triton.cdiv(chunk_size, blocks.prep), chunks, rows), (
        q, d_out, out, saved.gcum, saved.states, delta, dgcum, dq, *q.stride(), *d_out.stride(), *out.stride(),
        heads, length, chunk_size, chunks), dict(
        D=dim, BLOCK_M=blocks.prep, HAS_INTER=has_inter, HAS_INTRA=has_intra, num_warps=blocks.prep_warps,
        **flags))]
    dfinal = d_final.to(torch.float32).contiguous() if d_final is not None else None
    col_blocks = dim // min(dim, blocks.scan_dv)
    dlogd = dstate_in = None
    dkv, dkv_stride = dfinal, dim * dim  # a single chunk without incoming state: d(K^T V) = d(final)
    if has_inter:
        dlogd = torch.empty(rows, chunks, col_blocks, **f32)
        dstate_in = torch.empty(batch, heads, dim, dim, **f32) if want_dstate else None
        launches.append(Launch(state_grad_scan_kernel, (rows, col_blocks), (
            q, d_out, saved.states, saved.gcum, dfinal, dlogd, dstate_in, *q.stride(), *d_out.stride(),
            heads, length, chunk_size, chunks), dict(
            D=dim, BLOCK_DV=dim // col_blocks, BLOCK_C=blocks.scan, HAS_DFINAL=dfinal is not None,
            STORE_DSTATE_IN=want_dstate, num_warps=blocks.scan_warps, **flags)))
        dkv, dkv_stride = saved.states[:, 1:], (chunks + 1) * dim * dim  # slot j + 1 holds dKV_j now
    dk = torch.empty(k.shape, device=q.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=v.dtype)
    dg = torch.empty(rows, length, **f32) if has_inter else None
    launches.append(Launch(hybrid_bwd_kernel, (triton.cdiv(chunk_size, blocks.bwd), chunks, rows), (
        q, k, v, d_out, saved.lse if has_intra else delta, delta, dkv, dgcum, dlogd, dq, dk, dv, dg,
        *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), dkv_stride,
        heads, length, chunk_size, chunks, dim ** -0.5, dim ** -0.5 * LOG2E), dict(
        D=dim, BLOCK=blocks.bwd, BLOCK_SUB=blocks.bwd_sub, COL_BLOCKS=col_blocks, HAS_INTER=has_inter,
        HAS_DKV=dkv is not None, HAS_INTRA=has_intra, EVEN_SUB=chunk_size % blocks.bwd_sub == 0,
        num_warps=blocks.bwd_warps, num_stages=blocks.num_stages, **flags)))
    dlog_decay = dg.view(batch, heads, length) if has_inter else torch.zeros(batch, heads, length, **f32)
    dstate = dstate_in if has_state and want_dstate else None
    return launches, (dq, dk, dv, dlog_decay, dstate)
