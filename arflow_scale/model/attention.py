"""Chunk-wise attention of ARFlow (docs/arflow.md §3) and two ablations.

All functions take q, k, v of shape (B, H, L, D) (after their RMS norms), L = chunks * chunk_size,
one chunk = one image, and return `(out (B, H, L, D), state)` so that a sequence fed chunk by chunk
with the returned state gives the same output as the whole sequence fed at once.

- `hybrid_attention`: bidirectional softmax inside a chunk + gated linear attention over earlier
  chunks through a (B, H, D, D) state. Cost O(L * chunk * D + L * D^2).
- `full_attention`: block-causal softmax over the own and all earlier chunks (state = their k, v).
- `intra_attention`: softmax over the own chunk only (state passes through unchanged; K=1 is SiT).

`chunk_attention` dispatches on the mode and a backend: these functions are the "torch" reference;
"triton" selects `attention_triton.hybrid_attention_triton` and `attention_flex.full_attention_flex`;
"triton_sdpa" the same, with the hybrid's softmax inside each chunk left to SDPA
(`attention_triton.hybrid_attention_sdpa_triton`); `resolve_backend` turns the config's "auto" into one of
them for the tensors at hand.
"""
from __future__ import annotations

import importlib.util
import typing
from typing import Optional

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from .config import ModelConfig

_FIELDS = typing.get_type_hints(ModelConfig)
MODES = typing.get_args(_FIELDS["attention"])  # ("hybrid", "full", "intra"): the config's list
BACKENDS = tuple(b for b in typing.get_args(_FIELDS["attention_backend"]) if b != "auto")
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
FUSED_HEAD_DIMS = (16, 32, 64, 128)  # head dims the fused kernels are built for (attention_triton)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> int:
    """Validate (B, H, L, D) inputs; return the number of chunks."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention: q, k, v must share a (B, H, L, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if chunk_size <= 0 or q.shape[2] % chunk_size != 0:
        raise ValueError(f"attention: sequence length {q.shape[2]} is not a multiple of chunk_size={chunk_size}")
    return q.shape[2] // chunk_size


def intra_chunk_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Bidirectional softmax within each chunk: one SDPA call batched over chunks; scale D^-1/2.

    (B, H, L, D) -> (B, H*chunks, chunk, D) is a view (no copy), so flash kernels run on GPU.
    """
    heads = q.shape[1]
    q, k, v = (rearrange(t, "b h (n c) d -> b (h n) c d", c=chunk_size) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b (h n) c d -> b h (n c) d", h=heads)


def chunk_key_values(kc: torch.Tensor, vc: torch.Tensor, scale: float) -> torch.Tensor:
    """K_i^T V_i * scale per chunk: (B, H, n, c, D) twice -> (B, H, n, D, D)."""
    return einsum(kc, vc, "b h n c x, b h n c y -> b h n x y") * scale


class _ZeroDecayGrad(torch.autograd.Function):
    """Identity on q that gives log_decay the exact zero gradient the general path gives it.

    With one chunk and no state the inter part vanishes; log_decay then still gets a (zero)
    gradient rather than none, so its parameters stay in every optimizer's and ZeRO's bookkeeping.
    """

    @staticmethod
    def forward(ctx, q, log_decay):
        ctx.decay = (log_decay.shape, log_decay.dtype, log_decay.device)
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.decay
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def single_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """`hybrid_attention` of one chunk without incoming state (SiT at K=1): no inter-chunk read at all.

    Same outputs and gradients as the general path: its inter part is exactly zero there, and the
    state after the chunk is K^T V * D^-1/2 (fp32 or wider).
    """
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    if log_decay.requires_grad:
        q = _ZeroDecayGrad.apply(q, log_decay)
    out = intra_chunk_softmax(q, k, v, q.shape[2])
    with torch.autocast(device_type=q.device.type, enabled=False):
        kc, vc = (rearrange(t.to(acc_dtype), "b h c d -> b h 1 c d") for t in (k, v))
        state = chunk_key_values(kc, vc, q.shape[-1] ** -0.5)[:, :, 0]
    return out.to(torch.promote_types(out.dtype, q.dtype)), state


def inter_chunk_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                       chunk_size: int, state: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention over earlier chunks, in fp32 or wider (autocast off). -> (B, H, L, D), (B, H, D, D).

    State before chunk j: S_j = S_in * prod_{l<j} d_l + sum_{i<j} (K_i^T V_i) prod_{i<l<j} d_l, with
    d_l = exp(mean of chunk l's log_decay). Token p of chunk j reads (q_p * exp(cumsum_{m<=p} g_m)) S_j.
    All states come from one masked matmul over chunks with the cumulative chunk decay (no loop).
    """
    out_dtype = q.dtype
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 under bf16/fp16, fp64 stays
    scale = q.shape[-1] ** -0.5
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, log_decay = (t.to(acc_dtype) for t in (q, k, v, log_decay))
        qc, kc, vc = (rearrange(t, "b h (n c) d -> b h n c d", c=chunk_size) for t in (q, k, v))
        gc = rearrange(log_decay, "b h (n c) -> b h n c", c=chunk_size)
        num_chunks = gc.shape[2]
        kv = chunk_key_values(kc, vc, scale)
        chunk_log = gc.mean(dim=-1)  # (B, H, n): log d_i
        cum = chunk_log.cumsum(dim=-1)  # sum_{l<=i} log d_l
        cum_before = F.pad(cum, (1, 0))  # (B, H, n+1): sum_{l<j} log d_l, j = 0..n
        # weights[j, i] = prod_{i<l<j} d_l = exp(cum_before[j] - cum[i]) for i < j (always <= 1).
        earlier = torch.ones(num_chunks + 1, num_chunks, dtype=torch.bool, device=q.device).tril(-1)
        log_w = rearrange(cum_before, "b h j -> b h j 1") - rearrange(cum, "b h i -> b h 1 i")
        weights = log_w.masked_fill(~earlier, float("-inf")).exp()
        states = einsum(weights, kv, "b h j i, b h i x y -> b h j x y")  # (B, H, n+1, D, D)
        if state is not None:
            carry = rearrange(cum_before.exp(), "b h j -> b h j 1 1")
            states = states + carry * rearrange(state.to(acc_dtype), "b h x y -> b h 1 x y")
        q_decayed = qc * rearrange(gc.cumsum(dim=-1).exp(), "b h n c -> b h n c 1")
        out = einsum(q_decayed, states[:, :, :-1], "b h n c x, b h n x y -> b h n c y")
        out = rearrange(out, "b h n c d -> b h (n c) d")
    return out.to(out_dtype), states[:, :, -1]


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                     chunk_size: int, state: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """ARFlow attention: intra-chunk softmax + decayed linear attention over earlier chunks.

    q, k, v (B, H, L, D); log_decay (B, H, L) <= 0; state (B, H, D, D) fp32 or None (= zeros).
    Returns out (B, H, L, D) in q's dtype and the fp32 state after the last chunk. One chunk
    without state (K=1) skips the inter part, which is exactly zero there (`single_chunk_attention`).
    """
    _check_shapes(q, k, v, chunk_size)
    if log_decay.shape != q.shape[:3]:
        raise ValueError(f"hybrid_attention: log_decay must be (B, H, L) = {tuple(q.shape[:3])}, "
                         f"got {tuple(log_decay.shape)}")
    if state is not None and state.shape != (*q.shape[:2], q.shape[3], q.shape[3]):
        raise ValueError(f"hybrid_attention: state must be (B, H, D, D), got {tuple(state.shape)}")
    if state is None and q.shape[2] == chunk_size:
        return single_chunk_attention(q, k, v, log_decay)
    intra = intra_chunk_softmax(q, k, v, chunk_size)
    inter, new_state = inter_chunk_linear(q, k, v, log_decay, chunk_size, state)
    return intra + inter, new_state


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                   state: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Block-causal softmax: each chunk sees itself and all earlier chunks (dense masked SDPA).

    state = (k, v) of the earlier chunks, each (B, H, L_prev, D), or None. Returns out and the
    (k, v) of everything seen so far (a KV cache: memory grows with the sequence).
    """
    num_chunks = _check_shapes(q, k, v, chunk_size)
    if state is not None:
        k = torch.cat([state[0], k], dim=2)
        v = torch.cat([state[1], v], dim=2)
    chunks_before = k.shape[2] // chunk_size - num_chunks
    query_chunk = torch.arange(q.shape[2], device=q.device) // chunk_size + chunks_before
    key_chunk = torch.arange(k.shape[2], device=q.device) // chunk_size
    mask = rearrange(key_chunk, "j -> 1 j") <= rearrange(query_chunk, "i -> i 1")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out, (k, v)


def intra_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                    state: object = None) -> tuple[torch.Tensor, object]:
    """Softmax within each chunk only (no history); the state passes through unchanged."""
    _check_shapes(q, k, v, chunk_size)
    return intra_chunk_softmax(q, k, v, chunk_size), state


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """`model.attention_backend` for q (B, H, L, D): "auto" is "triton" on CUDA when triton is installed and
    the kernels take q's head dim and dtype, else "torch"; the others pass through."""
    if backend != "auto":
        return backend
    fused = (q.device.type == "cuda" and TRITON_INSTALLED and q.shape[-1] in FUSED_HEAD_DIMS
             and q.dtype in FUSED_DTYPES)
    return "triton" if fused else "torch"


def chunk_attention(mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    log_decay: Optional[torch.Tensor], chunk_size: int, state: object = None,
                    backend: str = "torch") -> tuple[torch.Tensor, object]:
    """Dispatch on `mode` in MODES; log_decay is used by `hybrid` only.

    backend in BACKENDS: "torch" (the plain-PyTorch reference, default), "triton": the fused
    kernels of `attention_triton` for hybrid, compiled block-masked flex_attention for full (CUDA), or
    "triton_sdpa": as "triton", the hybrid's softmax part by SDPA; intra is one SDPA call in every case.
    Callers resolve "auto" first (`resolve_backend`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if mode == "hybrid":
        if backend != "torch":
            from .attention_triton import FUSED_HYBRID  # imports triton: on the fused paths only

            return FUSED_HYBRID[backend](q, k, v, log_decay, chunk_size, state)
        return hybrid_attention(q, k, v, log_decay, chunk_size, state)
    if mode == "full":
        if backend != "torch":
            from .attention_flex import full_attention_flex

            return full_attention_flex(q, k, v, chunk_size, state)
        return full_attention(q, k, v, chunk_size, state)
    if mode == "intra":
        return intra_attention(q, k, v, chunk_size, state)
    raise ValueError(f"attention mode {mode!r} is not one of {', '.join(MODES)}")
