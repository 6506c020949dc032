"""Paged attention (Triton): decode and (chunked) prefill over a block-paged KV cache.

Semantics are exactly kernels.reference.paged_attention_ref. For each sequence b:

  L  = query_start[b+1] - query_start[b]         its new queries (rows of q), L <= seq_lens[b]
  n  = seq_lens[b]                               its context length after this step
  query i (0 <= i < L) sits at position p_i = n - L + i; key j (0 <= j < n) lives in
      k_cache[block_tables[b, j // block_size], j % block_size, h // (H // KVH), :]
  o[query_start[b] + i, h, :] = sum_{j <= p_i} softmax_j(scale * q . k_j) * v_j

q [T, H, D], k_cache / v_cache [num_blocks, block_size, KVH, D], block_tables [B, max_blocks] int32,
seq_lens [B] int32, query_start [B+1] int32. bf16 / fp16 inputs, fp32 softmax and accumulation,
o in q's dtype. A sequence with L = 0 writes nothing; one with n = 0 (and L = 1) gets zeros.

Two code paths, picked on the host from `max_query_len` (no device sync):
- max_query_len == 1: decode kernel. One program per (sequence, KV head, context split); its rows are
  all query heads of that KV head (GQA), so each KV block is read from memory once. The context is
  split over programs (flash-decoding) and merged by a small reduction kernel: the number of splits
  comes from the block table's capacity (a shape, so graphs stay valid), and each program takes an
  equal share of the sequence's actual context, computed on the device. (Merging in the decode kernel
  itself, the last split to finish merging all of them, was measured three times, the last one vectorised
  over the splits: each time slower at batch 1 than this second launch, which PDL starts early.
  bench/NOTES-kernels.md, sessions 6 and 13.) With `rope_kv` it also does the decode step's RoPE and KV write
  (kernels/fused.py's rope_qk_ otherwise runs before it): every program rotates its q heads, and the split
  that owns the new position starts its softmax with the new key from registers and writes the new K/V row.
  Such a launch also loads each program's first KV tile before its PDL wait (DECODE_EARLY_KV): the tile holds
  only rows of earlier steps, so its reads overlap the q / k / v projection instead of following it.
- otherwise: prefill kernel, flash-attention style online softmax over the paged KV with the causal
  offset n - L; a program's rows are (query token, query head of one KV head) pairs.

Both are CUDA-graph capturable: grid sizes and scratch buffers depend only on shapes and on host
ints (max_query_len), never on tensor contents. Pass `out=` to write into a preallocated tensor.
CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (tests); otherwise the reference.

Tile sizes are fixed heuristics (below), not @triton.autotune: autotuning benchmarks on the first
call, which must not happen inside a CUDA-graph capture.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .device import num_sms
from .fused import rope_rows
from .pdl import launch_kwargs, wait_for_producer
from .reference import paged_attention_ref, rope_ref

LOG2E = 1.4426950408889634

# Decode: KV tokens per inner step, warps per program, and the smallest context slice worth its own
# program. bench/attention.py --sweep decode times the choices (bench/NOTES-kernels.md, session 13).
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4
DECODE_MIN_PARTITION = 256
# Warps of the split merge (a [splits, head dim] reduction per program; bench/decode_bounds.py times others: attn-mW)
DECODE_MERGE_WARPS = 4
# Decode steps of models without q/k norms: rotate q and the new key and write the new K/V row inside the
# decode kernel (paged_attention's rope_kv) instead of in kernels/fused.py's RoPE launch before it. H200, random
# Llama-2-7B g128, batch 1 (`bench/decode_profile.py --fused-rope off,on`, one call, bench/NOTES-kernels.md
# session 15): the RoPE launches' 75 µs a token go, the attention kernel takes 38 µs more (160 -> 198), the graph
# 2.380 -> 2.351 ms back to back, 413.7 -> 418.1 tok/s overlapped. sm_90a: 250 / 254 registers, no spills.
DECODE_FUSED_ROPE = True
# Fused-RoPE decode steps: each program loads its first KV tile before its PDL wait (_decode_kernel's EARLY), so
# the tile's dependent loads (query start, block table, then K / V) overlap the q / k / v projection's tail; the
# split merge reads its query starts before its wait too. H200, random Llama-2-7B g128, int4 head, batch 1, 144
# tokens of context (`bash bench/gpu_session.sh attn_configs`, one process, bench/results/attn-configs-s26-h200.json):
# the decode graph 2.522 -> 2.448 ms (-74 µs a token), with 32-token tiles too (BLOCK_N 64 spills 112 B with it).
# H100, the same bench (bench/results/attn-configs-early-s27-h100.json): 2.0975 -> 2.0112 ms (-86 µs).
DECODE_EARLY_KV = True
# Prefill: query rows (token x head pairs) and KV tokens per inner step; warps 0 = by tile size.
# H100 sweep (bf16, D 128 / 64, full and chunked prompts): 64 x 64, 4 warps, 2 stages was the best
# of 8 tile configs (128 x 64 / 128 x 128 / 8 warps / 3 stages all 5-20% slower).
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 0
PREFILL_NUM_STAGES = 2


@triton.jit
def _kv_tile_offsets(block_tables_row, tok, BLOCK_SIZE: tl.constexpr, stride_kb, stride_ks):
    """Element offset of token tok's row in a cache [num_blocks, block_size, KVH, D] (head 0, dim 0)."""
    page = tl.load(block_tables_row + tok // BLOCK_SIZE).to(tl.int64)  # tok: [BLOCK_N], all in the context
    return page * stride_kb + (tok % BLOCK_SIZE).to(tl.int64) * stride_ks


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    """a @ b with fp32 accumulation. The interpreter multiplies bf16's raw bits, so there the
    operands (already rounded to their storage dtype) are widened to fp32 first."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_kv_tile(
    k_ptr, v_ptr, bt_row, start, kv_end,
    stride_kb, stride_ks, stride_vb, stride_vs,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK: tl.constexpr,
    GUARD: tl.constexpr = False,  # live (a scalar) False: read the cache's first row instead (an empty split's tile)
    live=True,
):
    """-> (K^T [BLOCK_D, BLOCK_N], V [BLOCK_N, BLOCK_D]) of keys start .. start + BLOCK_N - 1 (see _attend_tile)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tok = start + offs_n  # [BLOCK_N]
    if MASK == 0:
        tok_ld = tok
    else:
        # keys past kv_end load key kv_end - 1 again (a real one) and are masked out of the scores: no
        # masks on the loads, which cost this loop ~60 registers (a 4-warp program spilled with them)
        tok_ld = tl.minimum(tok, kv_end - 1)
    row_k = _kv_tile_offsets(bt_row, tok_ld, BLOCK_SIZE, stride_kb, stride_ks)
    row_v = _kv_tile_offsets(bt_row, tok_ld, BLOCK_SIZE, stride_vb, stride_vs)
    if GUARD:  # (the block table entry read above is in its row; the page it names may be padding)
        row_k = tl.where(live, row_k, 0)
        row_v = tl.where(live, row_v, 0)
    if HEAD_DIM == BLOCK_D:
        kt = tl.load(k_ptr + row_k[None, :] + offs_d[:, None])  # [BLOCK_D, BLOCK_N]
        v = tl.load(v_ptr + row_v[:, None] + offs_d[None, :])  # [BLOCK_N, BLOCK_D]
    else:
        d_ok = offs_d < HEAD_DIM
        kt = tl.load(k_ptr + row_k[None, :] + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptr + row_v[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    return kt, v


@triton.jit
def _softmax_step(
    q, m_i, l_i, acc, kt, v, start, kv_end, q_pos, qk_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The online-softmax update of (m_i, l_i, acc) by one loaded tile (kt, v) of keys start .. start + BLOCK_N - 1."""
    tok = start + tl.arange(0, BLOCK_N)
    s = _dot(q, kt, INTERPRET) * qk_scale  # [M, BLOCK_N], base-2 logits
    if MASK == 1:
        s = tl.where(tok[None, :] < kv_end, s, float("-inf"))
    elif MASK == 2:
        s = tl.where((tok[None, :] <= q_pos[:, None]) & (tok[None, :] < kv_end), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, INTERPRET)
    return m_new, l_i, acc


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc,  # q: [M, BLOCK_D]; running max / sum: [M]; acc: [M, BLOCK_D] fp32
    k_ptr, v_ptr, bt_row, start, kv_end, q_pos, qk_scale,
    stride_kb, stride_ks, stride_vb, stride_vs,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK: tl.constexpr,  # 0: every key live and visible; 1: keys < kv_end; 2: also key <= q_pos (causal)
    INTERPRET: tl.constexpr,
):
    """One online-softmax step over keys start .. start + BLOCK_N - 1.
    k_ptr / v_ptr already point at this program's KV head. The caller guarantees every row sees at
    least one key in its first tile, so the running max is finite after it."""
    kt, v = _load_kv_tile(k_ptr, v_ptr, bt_row, start, kv_end, stride_kb, stride_ks, stride_vb, stride_vs,
                          BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, MASK)
    return _softmax_step(q, m_i, l_i, acc, kt, v, start, kv_end, q_pos, qk_scale, BLOCK_N, MASK, INTERPRET)


# ---------------------------------------------------------------------------------------------
# decode: one query per sequence
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rotate(x, x_partner, c, sn, offs_d, HEAD_DIM: tl.constexpr):
    """x * cos + rotate_half(x) * sin in fp32, rounded to x's dtype (kernels/fused.py's RoPE, element for
    element). x_partner[.., d] = x[.., (d + HEAD_DIM / 2) % HEAD_DIM]; c, sn: [1, BLOCK_D] fp32."""
    sign = tl.where(offs_d < HEAD_DIM // 2, -1.0, 1.0)[None, :]
    return (x.to(tl.float32) * c + sign * x_partner.to(tl.float32) * sn).to(x.dtype)


@triton.jit
def _rope_new_token(q, q_ptrs, gd_mask, kn_row, vn_row, c, sn, offs_d, d_mask, HEAD_DIM: tl.constexpr):
    """-> (rotated q [G_PAD, BLOCK_D], rotated new key [1, BLOCK_D], new value [1, BLOCK_D]) of this KV head."""
    partner = (offs_d + HEAD_DIM // 2) % HEAD_DIM
    q = _rotate(q, tl.load(q_ptrs + partner[None, :], mask=gd_mask, other=0.0), c, sn, offs_d, HEAD_DIM)
    k = tl.load(kn_row + offs_d, mask=d_mask, other=0.0)[None, :]
    k_partner = tl.load(kn_row + partner, mask=d_mask, other=0.0)[None, :]
    v = tl.load(vn_row + offs_d, mask=d_mask, other=0.0)[None, :]
    return q, _rotate(k, k_partner, c, sn, offs_d, HEAD_DIM), v


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, qstart_ptr,
    o_ptr, part_o_ptr, part_ml_ptr,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    kn_ptr, vn_ptr, cos_ptr, sin_ptr, slot_ptr,  # ROPE: the step's new k / v rows, their rope rows and slots
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_ct,
    ROPE: tl.constexpr,  # q, k_new un-rotated: rotate them here and write k_new / v_new to the cache
    GROUP: tl.constexpr,  # query heads per KV head
    G_PAD: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot's smallest M)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,  # (ROPE only) load the first KV tile before waiting for the kernel that wrote q / k / v
):
    if not EARLY:
        wait_for_producer(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(qstart_ptr + b)
    ctx = tl.load(seq_lens_ptr + b)  # (before the branch: one dependent load fewer on the way to the KV)
    if tl.load(qstart_ptr + b + 1) == q_row:  # padding slot: no query this step
        return

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g  # [G_PAD]
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    # the splits share this sequence's actual context (not the block table's capacity, which sets
    # NUM_SPLITS on the host): a short context is spread over every split, one tile each
    partition = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_start = split * partition
    kv_end = tl.minimum(kv_start + partition, ctx)
    # with ROPE the step's own key (position ctx - 1) is not in the cache yet: the split that owns it takes it
    # from registers, and writes it to the cache for the next steps (no program of this launch reads it there)
    owns_new = (ctx - 1 >= kv_start) & (ctx - 1 < kv_end)
    if ROPE:
        kv_end_cache = tl.where(owns_new, ctx - 1, kv_end)
    else:
        kv_end_cache = kv_end
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    if EARLY:
        # Everything this tile reads is older than the kernel before this one (PDL lets this launch start only
        # once that kernel's programs have all passed their own wait, so every kernel before it has finished):
        # the step's inputs (query starts, lengths, block tables) and the cache's rows of earlier steps. The one
        # row this step adds is written by this launch and is not read here (kv_end_cache stops before it).
        # So the tile's DRAM round trips run while the q / k / v projection finishes, not after it.
        first_live = kv_start < kv_end_cache
        kt0, v0 = _load_kv_tile(k_head, v_head, bt_row, kv_start, tl.maximum(kv_end_cache, 1),
                                stride_kb, stride_ks, stride_vb, stride_vs, BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, 1,
                                True, first_live)
        wait_for_producer(PDL)

    # q: [G_PAD, BLOCK_D], the GROUP query heads of this KV head (padding rows are zeros)
    q_ptrs = q_ptr + q_row * stride_qt + heads[:, None] * stride_qh
    gd_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptrs + offs_d[None, :], mask=gd_mask, other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    if ROPE:
        c = tl.load(cos_ptr + q_row * stride_ct + offs_d, mask=d_mask, other=0.0)[None, :]  # [1, BLOCK_D] fp32
        sn = tl.load(sin_ptr + q_row * stride_ct + offs_d, mask=d_mask, other=0.0)[None, :]
        q, k_new, v_new = _rope_new_token(q, q_ptrs, gd_mask, kn_ptr + q_row * stride_knt + kvh * stride_knh,
                                          vn_ptr + q_row * stride_vnt + kvh * stride_vnh, c, sn, offs_d, d_mask,
                                          HEAD_DIM)
        slot = tl.load(slot_ptr + q_row).to(tl.int64)  # -1: write nothing
        blk = slot // BLOCK_SIZE
        pos = slot % BLOCK_SIZE
        w_ok = d_mask[None, :] & owns_new & (slot >= 0)
        tl.store(k_ptr + blk * stride_kb + pos * stride_ks + kvh * stride_kh + offs_d[None, :],
                 k_new.to(k_ptr.dtype.element_ty), mask=w_ok)
        tl.store(v_ptr + blk * stride_vb + pos * stride_vs + kvh * stride_vh + offs_d[None, :],
                 v_new.to(v_ptr.dtype.element_ty), mask=w_ok)
        # the new key first (so its registers are free during the loop): the owner starts its online softmax
        # with it (max s_new, sum 1, acc v_new); the other splits start empty, as without ROPE
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * qk_scale  # [G_PAD]
        m_i = tl.where(owns_new, s_new, m_i)
        l_i = tl.where(owns_new, 1.0, l_i)
        acc = tl.where(owns_new, v_new.to(v_ptr.dtype.element_ty).to(tl.float32) + acc, acc)
    loop_start = kv_start
    if EARLY:
        # an empty split's tile (all keys masked: NaNs) leaves the running state as it was
        m_1, l_1, acc_1 = _softmax_step(q, m_i, l_i, acc, kt0, v0, kv_start, kv_end_cache, 0, qk_scale, BLOCK_N, 1,
                                        INTERPRET)
        m_i = tl.where(first_live, m_1, m_i)
        l_i = tl.where(first_live, l_1, l_i)
        acc = tl.where(first_live, acc_1, acc)
        loop_start = kv_start + BLOCK_N
    if INTERPRET:  # the interpreter (numpy >= 2.3) cannot range() over tensor bounds
        start = loop_start
        while start < kv_end_cache:
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_head, v_head, bt_row, start, kv_end_cache, 0,
                                         qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                         BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, 1, INTERPRET)
            start += BLOCK_N
    else:
        for start in tl.range(loop_start, kv_end_cache, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_head, v_head, bt_row, start, kv_end_cache, 0,
                                         qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                         BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, 1, INTERPRET)

    if NUM_SPLITS == 1:
        # l_i == 0 only for an empty context: its output is zeros, as in the reference
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        # part_o: [B, H, NUM_SPLITS, BLOCK_D] unnormalised; part_ml: [B, H, NUM_SPLITS, 2] (max, sum)
        row = (b * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split  # [G_PAD]
        tl.store(part_o_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    qstart_ptr, o_ptr, part_o_ptr, part_ml_ptr,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,  # read the query starts (a step input) before the PDL wait, as the decode kernel's EARLY
):
    """o[row(b), h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s."""
    if not EARLY:
        wait_for_producer(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_row = tl.load(qstart_ptr + b)
    if tl.load(qstart_ptr + b + 1) == q_row:
        return
    if EARLY:
        wait_for_producer(PDL)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    row = (b * NUM_HEADS + h) * NUM_SPLITS + offs_s  # [SPLITS_PAD]
    m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty context: all weights 0
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    acc = tl.load(part_o_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], 0)  # [BLOCK_D]
    den = tl.sum(l * w, 0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + q_row * stride_ot + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# prefill / chunked prefill: several queries per sequence, causal with offset n - L
# ---------------------------------------------------------------------------------------------


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, qstart_ptr, o_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,  # GROUP padded to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per program; BLOCK_Q * G_PAD rows
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_producer(PDL)
    q_tile = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_first = tl.load(qstart_ptr + b)
    n_q = tl.load(qstart_ptr + b + 1) - q_first
    if q_tile * BLOCK_Q >= n_q:  # grid is sized by max_query_len; shorter sequences stop here
        return
    ctx = tl.load(seq_lens_ptr + b)

    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = q_tile * BLOCK_Q + offs_m // G_PAD  # [BLOCK_M] query index within the sequence
    heads = kvh * GROUP + offs_m % G_PAD  # [BLOCK_M]
    m_mask = (q_idx < n_q) & (offs_m % G_PAD < GROUP)
    d_mask = offs_d < HEAD_DIM
    q_pos = ctx - n_q + q_idx  # [BLOCK_M] position of each row's query in the context
    q_off = (q_first + q_idx).to(tl.int64) * stride_qt + heads * stride_qh  # [BLOCK_M]
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    # keys after this tile's last query are masked for all of its rows: stop there
    kv_end = tl.minimum(ctx, ctx - n_q + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, n_q))
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    # keys 0 .. first query's position are visible to every row: whole tiles of them need no mask
    full_end = (ctx - n_q + q_tile * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
    # the first tile run (masked or not) holds key 0, which every row sees: running max finite
    if INTERPRET:  # the interpreter (numpy >= 2.3) cannot range() over tensor bounds
        start = full_end * 0
        while start < full_end:
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_head, v_head, bt_row, start, kv_end, q_pos,
                                         qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                         BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, 0, INTERPRET)
            start += BLOCK_N
        while start < kv_end:
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_head, v_head, bt_row, start, kv_end, q_pos,
                                         qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                         BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, 2, INTERPRET)
            start += BLOCK_N
    else:
        for start in tl.range(0, full_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_head, v_head, bt_row, start, kv_end, q_pos,
                                         qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                         BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, 0, INTERPRET)
        for start in tl.range(full_end, kv_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_head, v_head, bt_row, start, kv_end, q_pos,
                                         qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                         BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, 2, INTERPRET)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_first + q_idx).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def decode_num_splits(batch: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """How many programs share one (sequence, KV head)'s context: enough to fill ~2 waves of SMs, and
    no more than a full block table holds DECODE_MIN_PARTITION-token slices of. Depends on shapes only
    (graph-safe); the kernel divides each sequence's actual context among them."""
    want = triton.cdiv(2 * num_sms(device), max(1, batch * kv_heads))
    cap = max(1, triton.cdiv(max_context, DECODE_MIN_PARTITION))
    return max(1, min(want, cap, 64))


def prefill_config(g_pad: int, block_d: int, max_query_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_N, num_warps, num_stages) of the prefill kernel. A program's rows are
    BLOCK_Q query tokens x g_pad heads (>= 16 rows for tl.dot); short chunks get smaller tiles."""
    block_q = max(1, PREFILL_BLOCK_M // g_pad)
    block_q = min(block_q, max(16 // g_pad, triton.next_power_of_2(max_query_len)))
    num_warps = PREFILL_NUM_WARPS or (8 if block_q * g_pad * block_d >= 128 * 128 else 4)
    return block_q, PREFILL_BLOCK_N, num_warps, PREFILL_NUM_STAGES


def _check_rope_kv(rope_kv, T: int, KVH: int, D: int, max_query_len: int) -> tuple:
    k_new, v_new, cos, sin, slots = rope_kv
    if max_query_len != 1:
        raise ValueError("rope_kv is for decode steps (max_query_len 1)")
    if D % 2 or k_new.shape != (T, KVH, D) or v_new.shape != (T, KVH, D) or slots.shape != (T,):
        raise ValueError(f"rope_kv: k_new {tuple(k_new.shape)} / v_new {tuple(v_new.shape)} must be [T={T}, KVH={KVH}, "
                         f"D={D}] (D even), slot_mapping {tuple(slots.shape)} [T]")
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("rope_kv: the head dim of k_new and v_new must be contiguous")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"rope_kv: cos / sin must be float32, got {cos.dtype} / {sin.dtype}")
    return (k_new, v_new, *rope_rows(cos, sin, T, D), slots)


def _rope_and_write_ref(q, k_cache, v_cache, k_new, v_new, cos, sin, slots) -> torch.Tensor:
    """The torch meaning of rope_kv: -> rotated q, after writing rotated k_new and v_new at the slots."""
    T, D = cos.shape
    cos, sin = cos.view(T, 1, D), sin.view(T, 1, D)
    write_kv(k_cache, v_cache, rope_ref(k_new, cos, sin), v_new, slots, use_triton=False)
    return rope_ref(q, cos, sin)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length after this step
    query_start: torch.Tensor,  # [B+1] int32
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,  # [T, H, D], q's dtype; preallocated for CUDA graphs
    num_splits: int | None = None,  # decode only: force the context split (tests, short-context graphs)
    rope_kv: tuple | None = None,  # decode only: (k_new, v_new, cos, sin, slot_mapping), see below
) -> torch.Tensor:
    """o [T, H, D] = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale).

    max_query_len must be >= every sequence's query count (1 selects the decode kernel).
    rope_kv = (k_new [T, KVH, D], v_new [T, KVH, D], cos [T, D] float32, sin [T, D], slot_mapping [T] int64),
    decode only: q and k_new are not rotated yet. The decode kernel rotates both (kernels/fused.py's RoPE),
    writes k_new and v_new to the caches at the slots (-1: nowhere), as rope_qk_(..., kv_cache=...) would, and
    attends over the context with the new token's key taken from registers: one launch instead of two.
    """
    T, H, D = q.shape
    num_blocks, block_size, KVH, Dk = k_cache.shape
    B = seq_lens.shape[0]
    if v_cache.shape != k_cache.shape or Dk != D:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
    if H % KVH:
        raise ValueError(f"query heads {H} not a multiple of KV heads {KVH}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two")
    if block_tables.shape[0] != B or query_start.shape[0] != B + 1:
        raise ValueError("block_tables [B, max_blocks], seq_lens [B], query_start [B+1] disagree on B")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head dim of q and the caches must be contiguous")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be [T, H, D] in q's dtype with a contiguous head dim")
    if rope_kv is not None:
        rope_kv = _check_rope_kv(rope_kv, T, KVH, D, max_query_len)
    if T == 0 or B == 0:
        return out
    interpret = _interpreting()
    if not q.is_cuda and not interpret:  # CPU tensors run Triton only under its interpreter (tests)
        if rope_kv is not None:
            q = _rope_and_write_ref(q, k_cache, v_cache, *rope_kv)
        out.copy_(paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale))
        return out

    group = H // KVH
    block_d = max(16, triton.next_power_of_2(D))
    qk_scale = scale * LOG2E
    common_strides = (
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
    )

    if max_query_len <= 1:
        max_context = block_tables.shape[1] * block_size
        splits = num_splits or decode_num_splits(B, KVH, max_context, q.device)
        early = DECODE_EARLY_KV and rope_kv is not None  # (both kernels: their step inputs before the PDL wait)
        if splits > 1:
            part_o = torch.empty(B * H * splits * block_d, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(B * H * splits * 2, dtype=torch.float32, device=q.device)
            if interpret:  # a merge that reads a partial no split wrote shows in the CPU tests
                part_o.fill_(float("nan"))
                part_ml.fill_(float("nan"))
        else:
            part_o = part_ml = out  # unused
        kn, vn, cos, sin, slots = rope_kv if rope_kv is not None else (q, q, q, q, seq_lens)  # unused: no ROPE
        _decode_kernel[(B, KVH, splits)](
            q, k_cache, v_cache, block_tables, seq_lens, query_start, out, part_o, part_ml,
            qk_scale, *common_strides,
            kn, vn, cos, sin, slots, kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), cos.stride(0),
            ROPE=rope_kv is not None, GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_SIZE=block_size, BLOCK_N=DECODE_BLOCK_N, NUM_SPLITS=splits, INTERPRET=interpret,
            EARLY=early,
            num_warps=DECODE_NUM_WARPS, num_stages=2, **launch_kwargs(q),
        )
        if splits > 1:
            _decode_reduce_kernel[(B, H)](
                query_start, out, part_o, part_ml, out.stride(0), out.stride(1),
                NUM_HEADS=H, HEAD_DIM=D, BLOCK_D=block_d, NUM_SPLITS=splits,
                SPLITS_PAD=triton.next_power_of_2(splits), EARLY=early,
                num_warps=DECODE_MERGE_WARPS, **launch_kwargs(q),
            )
        return out

    g_pad = triton.next_power_of_2(group)
    block_q, block_n, num_warps, num_stages = prefill_config(g_pad, block_d, max_query_len)
    _prefill_kernel[(triton.cdiv(max_query_len, block_q), B, KVH)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start, out,
        qk_scale, *common_strides,
        GROUP=group, G_PAD=g_pad, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_N=block_n, INTERPRET=interpret, num_warps=num_warps, num_stages=num_stages,
        **launch_kwargs(q),
    )
    return out


# ---------------------------------------------------------------------------------------------
# KV cache write
# ---------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, slot_ptr,
    stride_kb, stride_ks, stride_vb, stride_vs,
    stride_kt, stride_vt,
    BLOCK_SIZE: tl.constexpr,
    ROW: tl.constexpr,  # KVH * D: one token's contiguous row
    BLOCK_ROW: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_producer(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:  # padded token: nothing to write
        return
    offs = tl.arange(0, BLOCK_ROW)
    mask = offs < ROW
    blk = slot // BLOCK_SIZE
    pos = slot % BLOCK_SIZE
    k = tl.load(k_ptr + t * stride_kt + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs, mask=mask)
    tl.store(k_cache_ptr + blk * stride_kb + pos * stride_ks + offs, k, mask=mask)
    tl.store(v_cache_ptr + blk * stride_vb + pos * stride_vs + offs, v, mask=mask)


def write_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    slot_mapping: torch.Tensor,  # [T] int64, slot = block * block_size + offset; -1 = skip
    use_triton: bool | None = None,
) -> None:
    """In place: for each t with s = slot_mapping[t] >= 0,
    k_cache[s // block_size, s % block_size] = k[t] and v_cache[...] = v[t] (cast to the cache dtype).

    Rows with slot -1 (padding of a CUDA-graph batch) are skipped. Slots must be distinct.
    On CUDA (default) a Triton kernel, graph capturable (no host sync); on CPU a torch index_copy_.
    """
    num_blocks, block_size, KVH, D = k_cache.shape
    T = slot_mapping.shape[0]
    if k.shape != (T, KVH, D) or v.shape != (T, KVH, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit cache {tuple(k_cache.shape)}")
    if T == 0:
        return
    if use_triton is None:
        use_triton = k_cache.is_cuda
    if use_triton:
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if c.stride(2) != D or c.stride(3) != 1:
                raise ValueError(f"{name} must have contiguous [KVH, D] rows")
        k = k.to(k_cache.dtype).reshape(T, KVH * D)
        v = v.to(v_cache.dtype).reshape(T, KVH * D)
        _write_kv_kernel[(T,)](
            k_cache, v_cache, k, v, slot_mapping,
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            k.stride(0), v.stride(0),
            BLOCK_SIZE=block_size, ROW=KVH * D, BLOCK_ROW=triton.next_power_of_2(KVH * D), **launch_kwargs(k),
        )
        return
    keep = (slot_mapping >= 0).nonzero().squeeze(1)  # host sync: CPU path only
    slots = slot_mapping[keep]
    k_cache.view(-1, KVH, D).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, KVH, D).index_copy_(0, slots, v[keep].to(v_cache.dtype))
