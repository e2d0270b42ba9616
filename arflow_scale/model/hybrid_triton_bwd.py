"""Triton backward kernels of the hybrid chunked attention; buffers as in `hybrid_triton_fwd`.

Three launches. `prep_bwd_kernel` (per block of rows, parallel like the forward): the softmax row
term delta = dO . O_intra = dO . O - dO . O_inter, and the inter read's row gradients:
dq_inter = (dO S_j^T) * exp(gcum) and d_gcum = dO . O_inter. `state_grad_scan_kernel` (per b*h and
column block, last chunk first): dS_j = (q * exp(gcum))^T dO over the chunk, dKV_j = grad of S_{j+1},
grad S_j = dS_j + d_j grad S_{j+1}, and the chunk decay's gradient d_j <grad S_{j+1}, S_j>.
`hybrid_bwd_kernel` (per block, chunk, b*h): the flash-style intra backward for one key block (dk, dv)
and one query block (dq), plus dk += scale V dKV_j^T, dv += scale K dKV_j and the log-decay gradient
(the suffix sum of d_gcum over the chunk plus the chunk decay's share). Each prep program owns a few
rows and nothing is reduced across programs except in the scan, so the results are deterministic.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .hybrid_triton_fwd import load_rows, load_rows_t, mm


@triton.jit
def prep_bwd_kernel(q_ptr, do_ptr, out_ptr, gcum_ptr, states_ptr, delta_ptr, dgcum_ptr, dq_ptr,
                    stride_qb, stride_qh, stride_ql, stride_qd,
                    stride_ob, stride_oh, stride_ol, stride_od,
                    stride_outb, stride_outh, stride_outl, stride_outd,
                    H, L, C, NUM_CHUNKS,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_INTER: tl.constexpr, HAS_INTRA: tl.constexpr,
                    INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(C, BLOCK_M), chunks, B*H): delta; with HAS_INTER also dq_inter (into dq) and d_gcum.

    out is the forward's output (its strides: stride_out*), do its gradient (stride_o*); delta and d_gcum
    are (B*H, L) fp32. Without HAS_INTRA (the softmax's backward is done elsewhere) neither out nor delta
    is touched.
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
    row = bh * L + tok
    do = load_rows(do_ptr + b * stride_ob + h * stride_oh, tok, valid, dims, stride_ol, stride_od).to(tl.float32)
    if HAS_INTRA:
        out = load_rows(out_ptr + b * stride_outb + h * stride_outh, tok, valid, dims, stride_outl, stride_outd)
        delta = tl.sum(do * out.to(tl.float32), 1)
    if HAS_INTER:
        state = tl.load(states_ptr + (bh * (NUM_CHUNKS + 1) + chunk) * D * D + dims[:, None] * D + dims[None, :])
        q = load_rows(q_ptr + b * stride_qb + h * stride_qh, tok, valid, dims, stride_ql, stride_qd).to(tl.float32)
        decay = tl.exp(tl.load(gcum_ptr + row, mask=valid, other=0.0))
        d_gcum = tl.sum(do * mm(q * decay[:, None], state, INTERPRET, PRECISION), 1)
        tl.store(dgcum_ptr + row, d_gcum, mask=valid)
        if HAS_INTRA:
            delta -= d_gcum
        dq_inter = mm(do, tl.trans(state), INTERPRET, PRECISION) * decay[:, None]
        tl.store(dq_ptr + row[:, None] * D + dims[None, :], dq_inter.to(dq_ptr.dtype.element_ty),
                 mask=valid[:, None])
    if HAS_INTRA:
        tl.store(delta_ptr + row, delta, mask=valid)


@triton.jit
def chunk_state_grad(q_base, do_base, gcum_row, chunk_start, C, cols, stride_ql, stride_qd, stride_ol, stride_od,
                     D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr,
                     INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """dS_j[:, cols] = sum over the chunk's tokens p of (q_p exp(gcum_p))^T dO_p[cols] -> (D, BLOCK_DV) fp32."""
    dims = tl.arange(0, D)
    grad = tl.zeros([D, BLOCK_DV], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        pos = start + tl.arange(0, BLOCK_C)
        valid = pos < C
        tok = chunk_start + pos
        q_t = load_rows_t(q_base, tok, valid, dims, stride_ql, stride_qd).to(tl.float32)  # (D, BLOCK_C)
        decay = tl.exp(tl.load(gcum_row + tok, mask=valid, other=0.0))
        do = load_rows(do_base, tok, valid, cols, stride_ol, stride_od).to(tl.float32)  # (BLOCK_C, BLOCK_DV)
        grad += mm(q_t * decay[None, :], do, INTERPRET, PRECISION)
    return grad


@triton.jit
def state_grad_scan_kernel(q_ptr, do_ptr, states_ptr, gcum_ptr, dfinal_ptr, dlogd_ptr, dstate_in_ptr,
                           stride_qb, stride_qh, stride_ql, stride_qd,
                           stride_ob, stride_oh, stride_ol, stride_od,
                           H, L, C, NUM_CHUNKS, D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr,
                           HAS_DFINAL: tl.constexpr, STORE_DSTATE_IN: tl.constexpr,
                           INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (B*H, D / BLOCK_DV): reverse scan over BLOCK_DV state columns; dKV_j goes over states slot j + 1.

    dlogd (B*H, chunks, D / BLOCK_DV) gets each column block's share of the chunk decay's gradient.
    Slot j + 1 (these columns) was last read one iteration earlier, before that iteration's full
    reduction, whose barrier orders every warp's read before this write.
    """
    bh = tl.program_id(0)
    col_block = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = col_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    tile = tl.arange(0, D)[:, None] * D + cols[None, :]
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_ob + h * stride_oh
    if HAS_DFINAL:
        carry = tl.load(dfinal_ptr + bh * D * D + tile)
    else:
        carry = tl.zeros([D, BLOCK_DV], dtype=tl.float32)
    for i in range(NUM_CHUNKS):
        chunk = NUM_CHUNKS - 1 - i
        decay = tl.exp(tl.load(gcum_ptr + bh * L + chunk * C + C - 1) / C)
        slots = states_ptr + (bh * (NUM_CHUNKS + 1) + chunk) * D * D
        state = tl.load(slots + tile)
        tl.store(dlogd_ptr + (bh * NUM_CHUNKS + chunk) * tl.num_programs(1) + col_block,
                 decay * tl.sum(tl.sum(carry * state, 1), 0))
        tl.store(slots + D * D + tile, carry)
        carry = decay * carry + chunk_state_grad(q_base, do_base, gcum_ptr + bh * L, chunk * C, C, cols,
                                                 stride_ql, stride_qd, stride_ol, stride_od,
                                                 D, BLOCK_DV, BLOCK_C, INTERPRET, PRECISION)
    if STORE_DSTATE_IN:
        tl.store(dstate_in_ptr + bh * D * D + tile, carry)


@triton.jit
def intra_dkdv(k, v, dk, dv, q_base, do_base, lse_ptr, delta_ptr, chunk_start, C,
               stride_ql, stride_qd, stride_ol, stride_od, qk_scale,
               D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SUB: tl.constexpr, EVEN_SUB: tl.constexpr,
               INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax backward for a (BLOCK, D) key block over its chunk's queries, added to dk / scale, dv (fp32).
    EVEN_SUB (BLOCK_SUB divides C): every query block is full, no mask."""
    dims = tl.arange(0, D)
    for start in range(0, C, BLOCK_SUB):
        pos = start + tl.arange(0, BLOCK_SUB)
        valid = pos < C
        tok = chunk_start + pos
        q_t = load_rows_t(q_base, tok, valid, dims, stride_ql, stride_qd)  # (D, BLOCK_SUB)
        do = load_rows(do_base, tok, valid, dims, stride_ol, stride_od)  # (BLOCK_SUB, D)
        lse = tl.load(lse_ptr + tok, mask=valid, other=0.0)
        delta = tl.load(delta_ptr + tok, mask=valid, other=0.0)
        p_t = tl.exp2(mm(k, q_t, INTERPRET, PRECISION) * qk_scale - lse[None, :])
        if not EVEN_SUB:
            p_t = tl.where(valid[None, :], p_t, 0.0)
        dv += mm(p_t.to(do.dtype), do, INTERPRET, PRECISION)
        ds_t = p_t * (mm(v, tl.trans(do), INTERPRET, PRECISION) - delta[None, :])
        dk += mm(ds_t.to(q_t.dtype), tl.trans(q_t), INTERPRET, PRECISION)
    return dk, dv


@triton.jit
def intra_dq(q, do, lse, delta, k_base, v_base, chunk_start, C,
             stride_kl, stride_kd, stride_vl, stride_vd, qk_scale,
             D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SUB: tl.constexpr, EVEN_SUB: tl.constexpr,
             INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax backward for a (BLOCK, D) query block over its chunk's keys -> dq / scale (fp32); EVEN_SUB as in
    `intra_dkdv`."""
    dims = tl.arange(0, D)
    dq = tl.zeros([BLOCK, D], dtype=tl.float32)
    for start in range(0, C, BLOCK_SUB):
        pos = start + tl.arange(0, BLOCK_SUB)
        valid = pos < C
        tok = chunk_start + pos
        k_t = load_rows_t(k_base, tok, valid, dims, stride_kl, stride_kd)  # (D, BLOCK_SUB)
        v_t = load_rows_t(v_base, tok, valid, dims, stride_vl, stride_vd)
        p = tl.exp2(mm(q, k_t, INTERPRET, PRECISION) * qk_scale - lse[:, None])
        if not EVEN_SUB:
            p = tl.where(valid[None, :], p, 0.0)
        ds = p * (mm(do, v_t, INTERPRET, PRECISION) - delta[:, None])
        dq += mm(ds.to(k_t.dtype), tl.trans(k_t), INTERPRET, PRECISION)
    return dq


@triton.jit
def chunk_suffix_sum(values_ptr, block, C, BLOCK: tl.constexpr):
    """Inclusive suffix sums, within a chunk of C values, at the rows of block `block` -> (BLOCK,) fp32."""
    pos = block * BLOCK + tl.arange(0, BLOCK)
    own = tl.load(values_ptr + pos, mask=pos < C, other=0.0)
    later = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range((block + 1) * BLOCK, C, BLOCK):
        later += tl.load(values_ptr + start + tl.arange(0, BLOCK), mask=start + tl.arange(0, BLOCK) < C, other=0.0)
    return tl.sum(own, 0) - tl.cumsum(own, 0) + own + tl.sum(later, 0)


@triton.jit
def hybrid_bwd_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dkv_ptr, dgcum_ptr, dlogd_ptr,
                      dq_ptr, dk_ptr, dv_ptr, dg_ptr,
                      stride_qb, stride_qh, stride_ql, stride_qd,
                      stride_kb, stride_kh, stride_kl, stride_kd,
                      stride_vb, stride_vh, stride_vl, stride_vd,
                      stride_ob, stride_oh, stride_ol, stride_od, stride_dkv_bh,
                      H, L, C, NUM_CHUNKS, scale, qk_scale,
                      D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SUB: tl.constexpr, COL_BLOCKS: tl.constexpr,
                      HAS_INTER: tl.constexpr, HAS_DKV: tl.constexpr, HAS_INTRA: tl.constexpr,
                      EVEN_SUB: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(C, BLOCK), chunks, B*H): dk, dv of key block `block` and dq, dlog_decay of query block `block`.

    With HAS_INTER, dq already holds the inter part (prep pass), dgcum the gradient through each
    row's gcum, and dlogd (B*H, chunks, COL_BLOCKS) the chunk decays' gradient in parts; with
    HAS_DKV, dkv_ptr[bh * stride_dkv_bh + chunk * D * D] is d(K_j^T V_j). Without HAS_INTRA (the softmax's
    backward is done elsewhere) dk, dv get the inter part only and dq keeps the prep pass's.
    """
    block = tl.program_id(0)
    chunk = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    dims = tl.arange(0, D)
    pos = block * BLOCK + tl.arange(0, BLOCK)
    valid = pos < C
    tok = chunk * C + pos
    row = bh * L + tok
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    do_base = do_ptr + b * stride_ob + h * stride_oh
    out_offsets = row[:, None] * D + dims[None, :]
    if HAS_INTER:  # first, while few registers are live
        chunk_decay_grad = tl.sum(tl.load(dlogd_ptr + (bh * NUM_CHUNKS + chunk) * COL_BLOCKS
                                          + tl.arange(0, COL_BLOCKS)), 0)
        dg = chunk_suffix_sum(dgcum_ptr + bh * L + chunk * C, block, C, BLOCK) + chunk_decay_grad / C
        tl.store(dg_ptr + row, dg, mask=valid)

    k = load_rows(k_base, tok, valid, dims, stride_kl, stride_kd)
    v = load_rows(v_base, tok, valid, dims, stride_vl, stride_vd)
    if HAS_DKV:  # the inter part first: its (D, D) tile is dead before the softmax loop needs the registers
        dkv = tl.load(dkv_ptr + bh * stride_dkv_bh + chunk * D * D + dims[:, None] * D + dims[None, :])
        dk = mm(v.to(tl.float32), tl.trans(dkv), INTERPRET, PRECISION)
        dv = mm(k.to(tl.float32), dkv, INTERPRET, PRECISION) * scale
    else:
        dk = tl.zeros([BLOCK, D], dtype=tl.float32)
        dv = tl.zeros([BLOCK, D], dtype=tl.float32)
    if HAS_INTRA:
        dk, dv = intra_dkdv(k, v, dk, dv, q_base, do_base, lse_ptr + bh * L, delta_ptr + bh * L, chunk * C, C,
                            stride_ql, stride_qd, stride_ol, stride_od, qk_scale,
                            D, BLOCK, BLOCK_SUB, EVEN_SUB, INTERPRET, PRECISION)
    dk = dk * scale
    tl.store(dk_ptr + out_offsets, dk.to(dk_ptr.dtype.element_ty), mask=valid[:, None])
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=valid[:, None])
    if HAS_INTRA:  # the softmax's dq; without it dq holds the prep pass's inter part, complete
        q = load_rows(q_base, tok, valid, dims, stride_ql, stride_qd)
        do = load_rows(do_base, tok, valid, dims, stride_ol, stride_od)
        lse = tl.load(lse_ptr + row, mask=valid, other=0.0)
        delta = tl.load(delta_ptr + row, mask=valid, other=0.0)
        dq = intra_dq(q, do, lse, delta, k_base, v_base, chunk * C, C, stride_kl, stride_kd, stride_vl,
                      stride_vd, qk_scale, D, BLOCK, BLOCK_SUB, EVEN_SUB, INTERPRET, PRECISION) * scale
        if HAS_INTER:
            dq += tl.load(dq_ptr + out_offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        tl.store(dq_ptr + out_offsets, dq.to(dq_ptr.dtype.element_ty), mask=valid[:, None])
