"""Triton forward kernels of the hybrid chunked attention (ARFLOW.md, "The hybrid linear attention").

Three launches (two for one chunk without incoming state): `chunk_kv_kernel` computes every chunk's
K_j^T V_j in parallel and the within-chunk cumulative log-decay; `state_scan_kernel` walks the
chunks of one (b, h) over (D, D) tiles only, leaving the fp32 state S_j seen by every chunk;
`hybrid_fwd_kernel` then does, per (query block, chunk, b*h), the intra-chunk softmax flash-style
and adds the inter-chunk read (q_p * exp(gcum_p)) @ S_j in the same pass. Layouts of the fp32 work
buffers (all contiguous): states (B*H, chunks + 1, D, D) with slot j = S_j (the last, S_chunks, is
spare: backward reuses it), gcum (B*H, L), lse (B*H, L) in log2 units of the scaled scores.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def mm(a, b, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32; the interpreter's bf16 dot is wrong, so it multiplies in fp32 there.

    PRECISION ("tf32" or "tf32x3") applies to fp32 operands only.
    """
    if INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision=PRECISION)
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def load_rows(base, tok, valid, cols, stride_l, stride_d):
    """Rows `tok` (zeros where not `valid`) and columns `cols` of a strided (L, D) matrix -> (len(tok), len(cols))."""
    return tl.load(base + tok[:, None] * stride_l + cols[None, :] * stride_d, mask=valid[:, None], other=0.0)


@triton.jit
def load_rows_t(base, tok, valid, cols, stride_l, stride_d):
    """The same tile transposed, read in place -> (len(cols), len(tok))."""
    return tl.load(base + tok[None, :] * stride_l + cols[:, None] * stride_d, mask=valid[None, :], other=0.0)


@triton.jit
def chunk_kv_kernel(k_ptr, v_ptr, g_ptr, kv_ptr, gcum_ptr,
                    stride_kb, stride_kh, stride_kl, stride_kd,
                    stride_vb, stride_vh, stride_vl, stride_vd,
                    stride_gb, stride_gh, stride_gl, stride_kv_bh,
                    H, L, C, scale,
                    D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr, STORE_GCUM: tl.constexpr,
                    INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (chunks, B*H, D / BLOCK_DV): KV_j = scale * K_j^T V_j, BLOCK_DV columns per program.

    Writes kv_ptr[bh * stride_kv_bh + j * D * D]; with STORE_GCUM, column block 0 also writes gcum.
    """
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    col_block = tl.program_id(2)
    b = bh // H
    h = bh % H
    rows_d = tl.arange(0, D)
    cols = col_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    g_base = g_ptr + b * stride_gb + h * stride_gh
    kv = tl.zeros([D, BLOCK_DV], dtype=tl.float32)
    g_total = 0.0
    for start in range(0, C, BLOCK_C):
        pos = start + tl.arange(0, BLOCK_C)
        valid = pos < C
        tok = chunk * C + pos
        k_t = load_rows_t(k_base, tok, valid, rows_d, stride_kl, stride_kd)  # (D, BLOCK_C)
        v_blk = load_rows(v_base, tok, valid, cols, stride_vl, stride_vd)  # (BLOCK_C, BLOCK_DV)
        kv += mm(k_t, v_blk, INTERPRET, PRECISION)
        if STORE_GCUM:
            if col_block == 0:
                g = tl.load(g_base + tok * stride_gl, mask=valid, other=0.0).to(tl.float32)
                tl.store(gcum_ptr + bh * L + tok, tl.cumsum(g, 0) + g_total, mask=valid)
                g_total += tl.sum(g, 0)
    tl.store(kv_ptr + bh * stride_kv_bh + chunk * D * D + rows_d[:, None] * D + cols[None, :], kv * scale)


@triton.jit
def state_scan_kernel(states_ptr, gcum_ptr, state_in_ptr, final_ptr, L, C, NUM_CHUNKS,
                      D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_STATE_IN: tl.constexpr):
    """Grid (B*H, D / BLOCK_DV): S_0 = state in; S_{j+1} = S_j * exp(mean_chunk g) + KV_j; final = S_chunks.

    Slot j + 1 holds KV_j on entry (`chunk_kv_kernel`) and S_{j+1} on exit; each element is read
    before it is overwritten by the same arithmetic that consumes it.
    """
    bh = tl.program_id(0)
    col_block = tl.program_id(1)
    rows_d = tl.arange(0, D)
    tile = rows_d[:, None] * D + col_block * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :]
    slots = states_ptr + bh * (NUM_CHUNKS + 1) * D * D
    if HAS_STATE_IN:
        state = tl.load(state_in_ptr + bh * D * D + tile)
    else:
        state = tl.zeros([D, BLOCK_DV], dtype=tl.float32)
    tl.store(slots + tile, state)
    for j in range(NUM_CHUNKS):
        decay = tl.exp(tl.load(gcum_ptr + bh * L + j * C + C - 1) / C)
        state = state * decay + tl.load(slots + (j + 1) * D * D + tile)
        tl.store(slots + (j + 1) * D * D + tile, state)
    tl.store(final_ptr + bh * D * D + tile, state)


@triton.jit
def intra_softmax_block(q, k_base, v_base, chunk_start, C, stride_kl, stride_kd, stride_vl, stride_vd,
                        qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        EVEN_N: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of a (BLOCK_M, D) query block over the C keys of its chunk.

    Returns the normalised output (BLOCK_M, D) fp32 and the row logsumexp in log2 units. EVEN_N (BLOCK_N divides
    C): every key block is full, so the scores need no mask.
    """
    dims = tl.arange(0, D)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, C, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < C
        tok = chunk_start + pos
        k_t = load_rows_t(k_base, tok, valid, dims, stride_kl, stride_kd)  # (D, BLOCK_N)
        scores = mm(q, k_t, INTERPRET, PRECISION)  # unscaled: the scale goes into the max and the exp's FMA
        if not EVEN_N:
            scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
        p = tl.exp2(scores * qk_scale - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v_blk = load_rows(v_base, tok, valid, dims, stride_vl, stride_vd)  # (BLOCK_N, D)
        acc = acc * rescale[:, None] + mm(p.to(v_blk.dtype), v_blk, INTERPRET, PRECISION)
        row_max = new_max
    return acc / row_sum[:, None], row_max + tl.log2(row_sum)


@triton.jit
def hybrid_fwd_kernel(q_ptr, k_ptr, v_ptr, gcum_ptr, states_ptr, out_ptr, lse_ptr, intra_ptr,
                      stride_qb, stride_qh, stride_ql, stride_qd,
                      stride_kb, stride_kh, stride_kl, stride_kd,
                      stride_vb, stride_vh, stride_vl, stride_vd,
                      stride_outb, stride_outh, stride_outl, stride_outd,
                      stride_ib, stride_ih, stride_il, stride_id,
                      H, L, C, NUM_CHUNKS, qk_scale,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_INTER: tl.constexpr, HAS_INTRA: tl.constexpr, EVEN_N: tl.constexpr,
                      INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(C, BLOCK_M), chunks, B*H): out = softmax within the chunk + (q * exp(gcum)) @ S_j, and lse.

    out (B, H, L, D) may be strided (the wrapper lays it out as (B, L, H, D)); backward gets the softmax's
    dO . O_intra from it and the inter part. Without HAS_INTRA the softmax part is read from intra_ptr
    (B, H, L, D), strides stride_i*, computed elsewhere (SDPA), and no lse is written.
    """
    block = tl.program_id(0)
    chunk = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    dims = tl.arange(0, D)
    pos = block * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = pos < C
    tok = chunk * C + pos
    q = load_rows(q_ptr + b * stride_qb + h * stride_qh, tok, valid, dims, stride_ql, stride_qd)
    row = bh * L + tok
    if HAS_INTRA:
        intra, lse = intra_softmax_block(q, k_ptr + b * stride_kb + h * stride_kh,
                                         v_ptr + b * stride_vb + h * stride_vh, chunk * C, C,
                                         stride_kl, stride_kd, stride_vl, stride_vd, qk_scale,
                                         D, BLOCK_M, BLOCK_N, EVEN_N, INTERPRET, PRECISION)
        tl.store(lse_ptr + row, lse, mask=valid)
    else:
        intra = load_rows(intra_ptr + b * stride_ib + h * stride_ih, tok, valid, dims, stride_il,
                          stride_id).to(tl.float32)
    if HAS_INTER:
        gcum = tl.load(gcum_ptr + row, mask=valid, other=0.0)
        q_decayed = q.to(tl.float32) * tl.exp(gcum)[:, None]
        state = tl.load(states_ptr + (bh * (NUM_CHUNKS + 1) + chunk) * D * D + dims[:, None] * D + dims[None, :])
        intra += mm(q_decayed, state, INTERPRET, PRECISION)
    out_ptrs = out_ptr + b * stride_outb + h * stride_outh + tok[:, None] * stride_outl + dims[None, :] * stride_outd
    tl.store(out_ptrs, intra.to(out_ptr.dtype.element_ty), mask=valid[:, None])
