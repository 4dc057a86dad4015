"""Triton kernels for paged attention: store the step's K/V into their slots, and one
flash-attention kernel over a flat batch of decode rows and prefill chunks of any length.

The attention kernel follows the published design of vLLM's unified Triton attention:
- a program takes BLOCK_Q query tokens of one sequence and the QPK query heads that share one
  KV head, packed into BLOCK_M = BLOCK_Q * QPK rows of one tile, so that a decode step still
  feeds tensor cores (GQA packing);
- it finds its sequence by binary search over `query_start_loc`, so the grid depends only on
  the number of tokens and sequences (fixed shapes for CUDA graphs);
- it reads K/V in place through the block table, TILE keys at a time, with an online softmax;
- causal masking, sliding windows and logit soft-capping are computed in the kernel;
- products take the model's dtype (float32 at IEEE precision), accumulate in float32;
- with NUM_SEGMENTS > 1 (few sequences with long contexts) each program takes one segment of
  the context and writes a partial result that `_reduce_segments` combines (split-KV).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _store_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
              stride_k_t, stride_v_t, stride_kc_b, stride_kc_s, stride_vc_b, stride_vc_s,
              BLOCK_SIZE: tl.constexpr, ROW: tl.constexpr, ROW_P: tl.constexpr):
    """One token's K and V rows ([KVH * D], contiguous) into its slot; slot -1 is padding."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, ROW_P)
    ok = offs < ROW
    block = slot // BLOCK_SIZE
    within = slot % BLOCK_SIZE
    k = tl.load(k_ptr + t * stride_k_t + offs, mask=ok)
    v = tl.load(v_ptr + t * stride_v_t + offs, mask=ok)
    tl.store(k_cache_ptr + block * stride_kc_b + within * stride_kc_s + offs,
             k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + block * stride_vc_b + within * stride_vc_s + offs,
             v.to(v_cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks include global block `q_block`: sequence s owns blocks
    from query_start_loc[s] // BLOCK_Q + s on (each sequence starts a fresh block)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                     query_start_loc_ptr, part_acc_ptr, part_ml_ptr,
                     scale, softcap, window, num_seqs,
                     stride_q_t, stride_q_h, stride_o_t, stride_o_h,
                     stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
                     stride_bt,
                     NUM_HEADS: tl.constexpr, QPK: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
                     BLOCK_M: tl.constexpr, TILE: tl.constexpr, USE_WINDOW: tl.constexpr,
                     USE_SOFTCAP: tl.constexpr, NUM_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local = q_block - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    q_rel = local * BLOCK_Q + offs_m // QPK                           # [BLOCK_M] query within the chunk
    head = kv_head * QPK + offs_m % QPK                               # [BLOCK_M] query head
    row_ok = (offs_m < BLOCK_Q * QPK) & (q_rel < q_len)
    d_ok = offs_d < HEAD_DIM
    token = (q_start + q_rel).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)      # [BLOCK_M, HEAD_DIM_P]
    if DOT_FP32:            # Triton's CPU interpreter multiplies bfloat16 wrongly; exact in float32
        q = q.to(tl.float32)

    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len                                         # tokens before this chunk
    q_pos = context + q_rel                                           # [BLOCK_M] absolute positions
    key_end = tl.minimum(context + (local + 1) * BLOCK_Q, seq_len)    # keys any row here may see
    key_start = 0
    if USE_WINDOW:
        key_start = tl.maximum(context + local * BLOCK_Q - window + 1, 0)
    first_tile = key_start // TILE
    last_tile = tl.cdiv(key_end, TILE)
    if NUM_SEGMENTS > 1:
        per_segment = tl.cdiv(last_tile - first_tile, NUM_SEGMENTS)
        first_tile = first_tile + segment * per_segment
        last_tile = tl.minimum(first_tile + per_segment, last_tile)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    offs_t = tl.arange(0, TILE)
    for tile in range(first_tile, last_tile):
        k_pos = tile * TILE + offs_t                                  # [TILE]
        k_ok = k_pos < key_end
        block = tl.load(block_tables_ptr + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        within = k_pos % BLOCK_SIZE
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_kc_b + within[:, None] * stride_kc_s
                    + kv_head * stride_kc_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vc_b + within[:, None] * stride_vc_s
                    + kv_head * stride_vc_h + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale   # [BLOCK_M, TILE]
        if USE_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if USE_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)          # a row that sees nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partials: acc [T, NUM_HEADS, NUM_SEGMENTS, HEAD_DIM_P], (m, l) [T, NUM_HEADS, NUM_SEGMENTS, 2]
        part = (token * NUM_HEADS + head) * NUM_SEGMENTS + segment
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_P + offs_d[None, :], acc, mask=out_mask)
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _reduce_segments(out_ptr, part_acc_ptr, part_ml_ptr, stride_o_t, stride_o_h,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                     NUM_SEGMENTS: tl.constexpr):
    """Combine one (token, head)'s segment partials: a softmax over the segments' maxima."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_DIM_P)
    part = (token * NUM_HEADS + head) * NUM_SEGMENTS + offs_s
    m = tl.load(part_ml_ptr + part * 2)
    l = tl.load(part_ml_ptr + part * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)          # empty segments weigh 0
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_P + offs_d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def interpreted() -> bool:
    """True where these kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_paged_attention, InterpretedFunction)
