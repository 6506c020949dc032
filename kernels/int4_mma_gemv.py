"""Decode matmul for 1-8 rows on the tensor cores: the int4 codes are the A operand of `mma.sync`
straight from the registers their 16-byte loads land in, x is the B operand.

Semantics (modes 1 and 2 of kernels.int4_matmul; kernels.reference.adapted_linear_ref is the oracle),
for x [M, K] with M <= 8, codes Q [N, K], float zero points z [N, G], group size -1 or 128:

  y[m, n] = chan[c_m, n] * sum_g s[m, n, g] * x[m, g] . (Q[n, g] - z[n, g])  (+ bias[n])
  s[m, n, g] = s0[n, g] (mode 1: base and per-channel PEQA)  or  scales[s_m, n, g] (mode 2)

Why: the CUDA-core GEMV spends ~4.2 instructions per code (a LOP3 and an FFMA per code, shifts, x
handling) and is bound by issue and latency, not by DRAM (bench/NOTES-kernels.md). Here a code costs
~0.9 instruction and the multiply-adds go to the tensor cores:

- A word of codes_t holds 8 codes, nibble i = code 8w + i. Nibbles i and i + 4 sit at bits 4i and
  16 + 4i, so `lop3((word >> 4i) & 0x000F000F | 1.0bf16x2)` is the bf16 pair (1 + Q_i/128, 1 + Q_{i+4}/128)
  exactly, one LOP3 (plus a shift for i > 0) for two codes: an mma.sync A register. fp16 puts the
  nibble under bits 6..9 instead (1 + Q/16; a 1/1024 step would cost precision in the cancellation below).
- The dot's reduction index only has to agree between A and B, so each lane feeds the MMA with the
  codes it loaded itself: in the code tile's layout (a warp covers 8 rows x 16 words, 4 lanes per row,
  4 consecutive words per lane) lane l holds rows l/4 (and that row + BLOCK_N/2) and words 4(l%4)..+3,
  which is exactly where mma.m16n8k16 wants A rows l/4, l/4 + 8 and the k-slots of column group l%4.
  The B fragment is x at the same positions, for x-row l/4 (lanes of rows >= M feed zeros).
- sum_k x_k (1 + Q_k/SCALE) = X_g + x.Q / SCALE, so x . (Q - z) = SCALE * C - (SCALE + z) * X_g with
  X_g = sum_k x_k (one more MMA chain per block with A = 1.0, shared by every row of the tile).
  Everything after the MMA is float32, so float zero points stay exact.

Layout of the partial sums: a [BLOCK_N/2, 16] float tile per program, element (i, 4c + t) = C fragment
register t of lane column c: row rows0[i] (t < 2) or rows1[i] (t >= 2), x-row 2c + (t & 1). The
interpreter (CPU CI) computes the same tile with plain tensor arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, prefetch_l2, wait_for_producer

MMA_GEMV_MAX_M = 8  # the B operand's 8 columns
BLOCK_K = tl.constexpr(128)  # codes per K block: 16 words of a row, one group at group size 128
WORDS = tl.constexpr(16)  # words of a row per K block


def _deq(dst: str, word: str, i: int, f16: bool) -> str:
    """PTX: dst = the 16-bit pair (nibble i, nibble i + 4) of word as 1 + Q/SCALE."""
    if f16:  # nibble under mantissa bits 6..9 of 1.0 (0x3C00): 1 + Q/16
        shift = 6 - 4 * i
        mask, one = "0x03C003C0", "0x3C003C00"
    else:  # nibble under mantissa bits 0..3 of 1.0 (0x3F80): 1 + Q/128
        shift = -4 * i
        mask, one = "0x000F000F", "0x3F803F80"
    if shift == 0:
        return f"lop3.b32 {dst}, {word}, {mask}, {one}, 0xEA;"
    op = f"shl.b32 s, {word}, {shift};" if shift > 0 else f"shr.u32 s, {word}, {-shift};"
    return f"{op} lop3.b32 {dst}, s, {mask}, {one}, 0xEA;"


# the 16 (word u, nibble pair i) positions a lane holds per row and block; MMA t takes 2t and 2t + 1
_POSITIONS = [(u, i) for u in range(4) for i in range(4)]


def _mma_chain_asm(f16: bool, ones: bool) -> str:
    """8 chained m16n8k16 MMAs over one lane's 4 words of two rows ($4..$7, $8..$11) and the x pairs
    P_i of those words ($12 + 4i + u); C (4 floats) out in $0..$3. ones: A = 1.0 (X_g), no codes."""
    dt = "f16" if f16 else "bf16"
    one = "0x3C003C00" if f16 else "0x3F803F80"
    out = ["{ .reg .b32 s, a0, a1, a2, a3; .reg .f32 c0, c1, c2, c3;",
           "mov.f32 c0, 0f00000000; mov.f32 c1, 0f00000000; mov.f32 c2, 0f00000000; mov.f32 c3, 0f00000000;"]
    base = 0 if ones else 8  # operand index of P_0 word 0, minus 4
    if ones:
        out.append(f"mov.b32 a0, {one}; mov.b32 a1, {one}; mov.b32 a2, {one}; mov.b32 a3, {one};")
    for t in range(8):
        (u0, i0), (u1, i1) = _POSITIONS[2 * t], _POSITIONS[2 * t + 1]
        if not ones:
            out += [_deq("a0", f"${4 + u0}", i0, f16), _deq("a1", f"${8 + u0}", i0, f16),
                    _deq("a2", f"${4 + u1}", i1, f16), _deq("a3", f"${8 + u1}", i1, f16)]
        b0, b1 = f"${base + 4 + 4 * i0 + u0}", f"${base + 4 + 4 * i1 + u1}"
        out.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{dt}.{dt}.f32 {{c0, c1, c2, c3}}, "
                   f"{{a0, a1, a2, a3}}, {{{b0}, {b1}}}, {{c0, c1, c2, c3}};")
    out.append("mov.b32 $0, c0; mov.b32 $1, c1; mov.b32 $2, c2; mov.b32 $3, c3; }")
    return "\n".join(out)


# x word (16 bytes at the pointer; zeros where ok == 0) as the pairs P_i = (x[i], x[i + 4])
_X_WORD_ASM = tl.constexpr(
    "{ .reg .pred p; .reg .b32 h0, h1, h2, h3;\n"
    "setp.ne.s32 p, $5, 0;\n"
    "mov.b32 h0, 0; mov.b32 h1, 0; mov.b32 h2, 0; mov.b32 h3, 0;\n"
    "@p ld.global.nc.v4.b32 {h0, h1, h2, h3}, [$4];\n"
    "prmt.b32 $0, h0, h2, 0x5410; prmt.b32 $1, h0, h2, 0x7632;\n"
    "prmt.b32 $2, h1, h3, 0x5410; prmt.b32 $3, h1, h3, 0x7632; }"
)
_MMA_BF16 = tl.constexpr(_mma_chain_asm(False, False))
_MMA_F16 = tl.constexpr(_mma_chain_asm(True, False))
_ONES_BF16 = tl.constexpr(_mma_chain_asm(False, True))
_ONES_F16 = tl.constexpr(_mma_chain_asm(True, True))

# x word j of x-row laneid/4 (16 bytes; zeros where that row >= M or the word is past K), as the pairs
# P_i = (x[8j + i], x[8j + i + 4]) the A registers pair the nibbles in
_X_PAIRS_ASM = tl.constexpr(
    "{ .reg .u32 l; .reg .pred p, q; .reg .u64 a; .reg .b32 h0, h1, h2, h3;\n"
    "mov.u32 l, %laneid; shr.u32 l, l, 2;\n"
    "setp.lt.u32 p, l, $6; setp.ne.s32 q, $5, 0; and.pred p, p, q;\n"
    "mul.wide.u32 a, l, $7; add.u64 a, a, $4;\n"
    "mov.b32 h0, 0; mov.b32 h1, 0; mov.b32 h2, 0; mov.b32 h3, 0;\n"
    "@p ld.global.nc.v4.b32 {h0, h1, h2, h3}, [a];\n"
    "prmt.b32 $0, h0, h2, 0x5410; prmt.b32 $1, h0, h2, 0x7632;\n"
    "prmt.b32 $2, h1, h3, 0x5410; prmt.b32 $3, h1, h3, 0x7632; }"
)


@triton.jit
def _mma_part(w0, w1, p0, p1, p2, p3, zz, F16: tl.constexpr):
    """x . (Q - z) per element from the two MMA chains (codes, and A = 1.0 for X_g) over one lane's words."""
    if F16:
        c = tl.inline_asm_elementwise(_MMA_F16, "=r,=r,=r,=r" + ",r" * 24, [w0, w1, p0, p1, p2, p3],
                                      dtype=tl.float32, is_pure=True, pack=4)
        xg = tl.inline_asm_elementwise(_ONES_F16, "=r,=r,=r,=r" + ",r" * 16, [p0, p1, p2, p3],
                                       dtype=tl.float32, is_pure=True, pack=4)
        SCALE: tl.constexpr = 16.0
    else:
        c = tl.inline_asm_elementwise(_MMA_BF16, "=r,=r,=r,=r" + ",r" * 24, [w0, w1, p0, p1, p2, p3],
                                      dtype=tl.float32, is_pure=True, pack=4)
        xg = tl.inline_asm_elementwise(_ONES_BF16, "=r,=r,=r,=r" + ",r" * 16, [p0, p1, p2, p3],
                                       dtype=tl.float32, is_pure=True, pack=4)
        SCALE: tl.constexpr = 128.0
    return c * SCALE - xg * (zz + SCALE)  # sum x (1 + Q/SCALE) = X_g + x.Q/SCALE


@triton.jit
def _mma_block(acc, kb, w0, w1, x_ptr, M, K, stride_xm, z0p, z1p, s0p, s1p, s_tile, stride_zg, stride_sg,
               words, half, m_j, MODE: tl.constexpr, ONE_GROUP: tl.constexpr, FAST: tl.constexpr,
               F16: tl.constexpr):
    """acc [HN, 16] += s * x_m . (Q - z) over K block kb for the tile's (row, x-row) pairs (see module doc).

    w0, w1 [HN, 16] int32: the block's code words of rows0 / rows1; z0p, z1p, s0p, s1p [HN, 1]: the
    rows' zero-point / base-scale pointers at group 0; s_tile [HN, 16]: mode-2 scale pointers at group 0.
    """
    if ONE_GROUP:
        g = 0
    else:
        g = kb
    zz = tl.where(half == 0, load_f32(z0p + g * stride_zg, FAST), load_f32(z1p + g * stride_zg, FAST))
    if MODE == 1:
        ss = tl.where(half == 0, load_f32(s0p + g * stride_zg, FAST), load_f32(s1p + g * stride_zg, FAST))
    else:
        ss = load_f32(s_tile + g * stride_sg, FAST)
    k0 = kb * BLOCK_K
    if FAST:
        xp = x_ptr + k0 + words * 8  # [1, 16]: word j of x-row 0 (the asm adds the lane's row)
        ok = (k0 + words * 8 < K).to(tl.int32)
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            _X_PAIRS_ASM, "=r,=r,=r,=r,l,r,r,r",
            [xp, ok, tl.zeros_like(ok) + M, tl.zeros_like(ok) + stride_xm * 2],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        part = _mma_part(w0, w1, p0, p1, p2, p3, zz, F16)  # [HN, 16] = x_m . (Q - z)
    else:  # plain arithmetic, same tile: D[i, j] = x_m(j) . Q_row(i, j) over the block
        HN: tl.constexpr = w0.shape[0]
        nib = tl.arange(0, 8)[None, None, :] * 4  # [1, 1, 8]
        q0 = ((w0[:, :, None] >> nib) & 0xF).to(tl.float32)  # [HN, 16 words, 8]
        q1 = ((w1[:, :, None] >> nib) & 0xF).to(tl.float32)
        kx = k0 + tl.arange(0, WORDS)[:, None] * 8 + tl.arange(0, 8)[None, :]  # [16, 8]
        m3 = tl.reshape(m_j, [16])[:, None, None]  # [16 (j), 1, 1]
        xm = tl.load(x_ptr + m3 * stride_xm + kx[None, :, :], mask=(m3 < M) & (kx < K)[None, :, :],
                     other=0.0).to(tl.float32)  # [16 (j), 16 words, 8]
        xm2 = tl.reshape(xm, [16, BLOCK_K])
        d0 = tl.sum(tl.reshape(q0, [HN, 1, BLOCK_K]) * xm2[None, :, :], 2)  # [HN, 16]
        d1 = tl.sum(tl.reshape(q1, [HN, 1, BLOCK_K]) * xm2[None, :, :], 2)
        xg = tl.sum(xm2, 1)[None, :]  # [1, 16] = X_g of x-row m(j)
        part = tl.where(half == 0, d0, d1) - zz * xg
    return acc + part * ss


@triton.jit
def load_f32(ptrs, FAST: tl.constexpr):
    """float32 of an fp32 / fp16 / bf16 pointer tensor (always in bounds), in the pointers' layout on
    the GPU (an inline-asm load: a plain load may take a coalesced layout and cost a conversion)."""
    DT: tl.constexpr = ptrs.dtype.element_ty
    if FAST:
        if DT == tl.float32:
            v = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                          is_pure=True, pack=1)
            return v.to(tl.float32, bitcast=True)
        else:
            v = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs], dtype=tl.int16,
                                          is_pure=True, pack=1)
            return v.to(DT, bitcast=True).to(tl.float32)
    else:
        return tl.load(ptrs).to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _mma_gemv_kernel(
    x_ptr, y_ptr, bias_ptr,  # x [M, K] (M <= 8), y [M, N], bias [N]
    q_ptr, zero_ptr, s0_ptr,  # codes_t as int32 [N_pad, KW], zeros_t / scales_t [G, N_pad] f32
    chan_ptr, scale_ptr,  # slab tables [Sc, N], [Sg, N, G] (any float dtype, through strides)
    chan_idx_ptr, scale_idx_ptr,  # [M] int32
    ws_ptr, cnt_ptr,  # split-K workspace [SPLIT_K, M, N] f32, per-column-tile arrival counters (zero)
    M, N, K,
    stride_xm, stride_ym, stride_qn, stride_zg, stride_cs, stride_ss, stride_sn, stride_sg,
    MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, FAST: tl.constexpr,
    F16: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HN: tl.constexpr = BLOCK_N // 2
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0
    rows0 = pid_n * BLOCK_N + tl.arange(0, HN)  # A rows l/4 of each MMA; rows1 are rows l/4 + 8
    rows1 = rows0 + HN
    words = tl.arange(0, WORDS)[None, :]  # [1, 16]
    q0 = q_ptr + rows0[:, None] * stride_qn + words  # [HN, 16] (rows and words padded: no masks)
    q1 = q_ptr + rows1[:, None] * stride_qn + words
    num_kb = tl.cdiv(K, BLOCK_K)
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)
    if PDL:  # while the previous kernel finishes: this program's first code block into L2
        prefetch_l2(q0 + kb_lo * WORDS, (words % 32 == 0) & (kb_lo < kb_hi))
        prefetch_l2(q1 + kb_lo * WORDS, (words % 32 == 0) & (kb_lo < kb_hi))
    wait_for_producer(PDL)  # x, the slots and the tables may come from the previous kernel

    j = tl.arange(0, 16)[None, :]  # [1, 16] tile column 4c + t
    half = (j & 3) >> 1  # 0: rows0, 1: rows1
    m_j = 2 * (j >> 2) + (j & 1)  # x-row of the column
    m_ok = m_j < M
    n_ij = tl.where(half == 0, rows0[:, None], rows1[:, None])  # [HN, 16]
    n_ok = n_ij < N
    n_in = tl.minimum(n_ij, N - 1)  # slab-table columns clamped into N: the loads need no masks
    z0p = zero_ptr + rows0[:, None]  # [HN, 1] (padded tables)
    z1p = zero_ptr + rows1[:, None]
    s0p = s0_ptr + rows0[:, None]
    s1p = s0_ptr + rows1[:, None]
    if MODE == 2:
        sidx = tl.load(scale_idx_ptr + m_j, mask=m_ok, other=0).to(tl.int64)  # [1, 16]
        s_tile = scale_ptr + sidx * stride_ss + n_in * stride_sn  # [HN, 16] at group 0
    else:
        s_tile = s0p  # unused
    acc = tl.zeros([HN, WORDS], dtype=tl.float32)
    if FAST:  # registers double-buffer the code words: the next block is in flight during this one
        w0n = tl.load(q0 + kb_lo * WORDS, eviction_policy="evict_first")
        w1n = tl.load(q1 + kb_lo * WORDS, eviction_policy="evict_first")
        for kb in range(kb_lo, kb_hi):
            w0 = w0n
            w1 = w1n
            nxt = tl.minimum(kb + 1, kb_hi - 1)
            w0n = tl.load(q0 + nxt * WORDS, eviction_policy="evict_first")
            w1n = tl.load(q1 + nxt * WORDS, eviction_policy="evict_first")
            acc = _mma_block(acc, kb, w0, w1, x_ptr, M, K, stride_xm, z0p, z1p, s0p, s1p, s_tile, stride_zg,
                             stride_sg, words, half, m_j, MODE, ONE_GROUP, FAST, F16)
    else:  # the interpreter (numpy >= 2.3) cannot range() over tensor bounds
        kb = kb_lo
        while kb < kb_hi:
            w0 = tl.load(q0 + kb * WORDS)
            w1 = tl.load(q1 + kb * WORDS)
            acc = _mma_block(acc, kb, w0, w1, x_ptr, M, K, stride_xm, z0p, z1p, s0p, s1p, s_tile, stride_zg,
                             stride_sg, words, half, m_j, MODE, ONE_GROUP, FAST, F16)
            kb += 1

    out_ok = m_ok & n_ok
    cidx = tl.load(chan_idx_ptr + m_j, mask=m_ok, other=0).to(tl.int64)  # [1, 16]
    if SPLIT_K == 1:
        _finish(acc, y_ptr, bias_ptr, chan_ptr, cidx, m_j, n_ij, n_in, out_ok, stride_ym, stride_cs, HAS_BIAS)
    else:
        # park the partial; the last split to arrive at this column tile sums them in fixed order
        ws_tile = ws_ptr + m_j * N + n_ij
        tl.store(ws_tile + pid_k * M * N, acc, mask=out_ok)
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([HN, WORDS], dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                total += tl.load(ws_tile + sk * M * N, mask=out_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next launch (and CUDA-graph replays)
            _finish(total, y_ptr, bias_ptr, chan_ptr, cidx, m_j, n_ij, n_in, out_ok, stride_ym, stride_cs, HAS_BIAS)


# --- M = 1: the 8 B columns carry 8 consecutive K blocks of x (long runs of each code row) ----------
#
# With one row of x the B operand has 7 idle columns, and the row-major tile above reads only 64 bytes
# of each code row per block (measured: 84 vs 62 µs per 7B layer for the CUDA-core GEMV, which reads
# 512-byte runs). Here lane l = 4r + c of a warp holds words 4c..4c+3 of K block kb + r of one code row
# (rows0[i] as MMA rows r, rows1[i] as rows r + 8), so one warp load is 512 contiguous bytes of a row;
# B column r is x's block kb + r, loaded by the lanes r themselves. The MMA then computes every (row
# slot, column) pair and the wanted ones are the diagonal C[r][r], C[r + 8][r]: register t = r & 1
# (+2 for rows1) of lane c = r >> 1. The tile is [HN, 8, 16]: (row pair i, 16 r + 4c + t): block r, word 4c + t. As a 2-D tile of 128 contiguous words a
# row, its layout puts the 32 lanes of a warp along the 128 words, which is the lane mapping above.


@triton.jit
def _kmajor_tables(kb, kb_hi, z0p, z1p, sp0, sp1, stride_zg, stride_sg, r3, diag0, ONE_GROUP: tl.constexpr,
                   MODE: tl.constexpr, FAST: tl.constexpr):
    """Zero points and scales [HN, 128] of each element's (row, group of block kb + r)."""
    if ONE_GROUP:
        g = 0
    else:
        g = tl.minimum(kb + r3, kb_hi - 1)
    zz = tl.where(diag0, load_f32(z0p + g * stride_zg, FAST), load_f32(z1p + g * stride_zg, FAST))
    if MODE == 1:
        ss = tl.where(diag0, load_f32(sp0 + g * stride_zg, FAST), load_f32(sp1 + g * stride_zg, FAST))
    else:
        ss = tl.where(diag0, load_f32(sp0 + g * stride_sg, FAST), load_f32(sp1 + g * stride_sg, FAST))
    return zz, ss


@triton.jit
def _kmajor_x(kb, x_ptr, K, kb_hi, r3, words3):
    """x words of step kb as the B pairs (GPU): 4 x [1, 128] int32."""
    kx = (kb + r3) * BLOCK_K + words3 * 8  # [1, 128] first k of each word
    ok = (kx < K) & (kb + r3 < kb_hi)
    return tl.inline_asm_elementwise(_X_WORD_ASM, "=r,=r,=r,=r,l,r", [x_ptr + kx, ok.to(tl.int32)],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _kmajor_step(acc, kb, w0, w1, zz, ss, p0, p1, p2, p3, x_ptr, K, kb_hi, r3, words3, diag0, diag1,
                 FAST: tl.constexpr, F16: tl.constexpr):
    """acc [HN, 128] += s * x_b . (Q_b - z) on the diagonal elements for blocks b = kb + r
    (zz, ss: _kmajor_tables, p0..p3: _kmajor_x of step kb, loaded one step ahead on the GPU)."""
    blk = kb + r3  # [1, 128]
    kx = blk * BLOCK_K + words3 * 8  # [1, 128] first k of each word
    if FAST:
        part = _mma_part(w0, w1, p0, p1, p2, p3, zz, F16)
    else:  # plain arithmetic: the block dot of each (row, block), put on the tile's diagonal elements
        HN: tl.constexpr = w0.shape[0]
        nib = tl.arange(0, 8)[None, None, :] * 4
        q0 = tl.reshape(((w0[:, :, None] >> nib) & 0xF).to(tl.float32), [HN, 8, BLOCK_K])  # [HN, block, k]
        q1 = tl.reshape(((w1[:, :, None] >> nib) & 0xF).to(tl.float32), [HN, 8, BLOCK_K])
        k3 = kx[:, :, None] + tl.arange(0, 8)[None, None, :]  # [1, 128, 8]
        xv = tl.load(x_ptr + k3, mask=(k3 < K) & (blk < kb_hi)[:, :, None], other=0.0).to(tl.float32)
        xv = tl.reshape(xv, [1, 8, BLOCK_K])
        d0 = tl.sum(q0 * xv, 2)  # [HN, 8] = block dots of rows0
        d1 = tl.sum(q1 * xv, 2)
        xs = tl.sum(xv, 2)  # [1, 8] = X of each block
        # onto the tile: column v belongs to block v >> 4 (a [8] -> [128] broadcast via a size-16 axis)
        d0 = tl.reshape(tl.broadcast_to(d0[:, :, None], [HN, 8, WORDS]), [HN, 8 * WORDS])
        d1 = tl.reshape(tl.broadcast_to(d1[:, :, None], [HN, 8, WORDS]), [HN, 8 * WORDS])
        xs = tl.reshape(tl.broadcast_to(xs[:, :, None], [1, 8, WORDS]), [1, 8 * WORDS])
        part = tl.where(diag0, d0, d1) - zz * xs
    return acc + tl.where(diag0 | diag1, part * ss, 0.0)


@triton.jit(do_not_specialize=["M"])
def _mma_gemv1_kernel(
    x_ptr, y_ptr, bias_ptr, q_ptr, zero_ptr, s0_ptr, chan_ptr, scale_ptr, chan_idx_ptr, scale_idx_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_ym, stride_qn, stride_zg, stride_cs, stride_ss, stride_sn, stride_sg,
    MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, FAST: tl.constexpr,
    F16: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """The one-row case (M == 1) with the [HN, 8, 16] K-major tile (see above); same arguments."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HN: tl.constexpr = BLOCK_N // 2
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0
    rows0 = pid_n * BLOCK_N + tl.arange(0, HN)
    rows1 = rows0 + HN
    v = tl.arange(0, 8 * WORDS)[None, :]  # [1, 128]: word v of the 8-block step
    r3 = v >> 4  # block within the 8
    words3 = v & 15  # word within the block
    t3 = words3 & 3
    diag = (words3 >> 2) == (r3 >> 1)
    diag0 = diag & (t3 == (r3 & 1))  # C[r][r]: rows0
    diag1 = diag & (t3 == 2 + (r3 & 1))  # C[r + 8][r]: rows1
    off = v  # [1, 128] word offset from block kb
    q0 = q_ptr + rows0[:, None] * stride_qn + off  # [HN, 128]
    q1 = q_ptr + rows1[:, None] * stride_qn + off
    num_kb = tl.cdiv(K, BLOCK_K)
    kb_per_split = tl.cdiv(tl.cdiv(num_kb, 8), SPLIT_K) * 8  # whole 8-block steps per split
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)
    if PDL:  # this program's first 8 blocks into L2 (4 lines of each row)
        prefetch_l2(q0 + kb_lo * WORDS, ((off % 32) == 0) & (kb_lo < kb_hi))
        prefetch_l2(q1 + kb_lo * WORDS, ((off % 32) == 0) & (kb_lo < kb_hi))
    wait_for_producer(PDL)
    z0p = zero_ptr + rows0[:, None]  # [HN, 1] (padded tables)
    z1p = zero_ptr + rows1[:, None]
    n0 = tl.minimum(rows0, N - 1)[:, None]
    n1 = tl.minimum(rows1, N - 1)[:, None]
    if MODE == 1:
        sp0 = s0_ptr + rows0[:, None]
        sp1 = s0_ptr + rows1[:, None]
    else:
        sidx = tl.load(scale_idx_ptr).to(tl.int64)
        sp0 = scale_ptr + sidx * stride_ss + n0 * stride_sn
        sp1 = scale_ptr + sidx * stride_ss + n1 * stride_sn
    acc = tl.zeros([HN, 8 * WORDS], dtype=tl.float32)
    if FAST:
        ok = (kb_lo + r3 < kb_hi)
        w0n = tl.load(q0 + kb_lo * WORDS, mask=ok, other=0, eviction_policy="evict_first")
        w1n = tl.load(q1 + kb_lo * WORDS, mask=ok, other=0, eviction_policy="evict_first")
        zn, sn = _kmajor_tables(kb_lo, kb_hi, z0p, z1p, sp0, sp1, stride_zg, stride_sg, r3, diag0, ONE_GROUP, MODE,
                                FAST)
        x0n, x1n, x2n, x3n = _kmajor_x(kb_lo, x_ptr, K, kb_hi, r3, words3)
        for kb in range(kb_lo, kb_hi, 8):  # codes, x and group tables one step ahead, in registers
            w0 = w0n
            w1 = w1n
            zz = zn
            ss = sn
            p0 = x0n
            p1 = x1n
            p2 = x2n
            p3 = x3n
            x0n, x1n, x2n, x3n = _kmajor_x(kb + 8, x_ptr, K, kb_hi, r3, words3)
            ok = kb + 8 + r3 < kb_hi
            w0n = tl.load(q0 + (kb + 8) * WORDS, mask=ok, other=0, eviction_policy="evict_first")
            w1n = tl.load(q1 + (kb + 8) * WORDS, mask=ok, other=0, eviction_policy="evict_first")
            if not ONE_GROUP:
                zn, sn = _kmajor_tables(kb + 8, kb_hi, z0p, z1p, sp0, sp1, stride_zg, stride_sg, r3, diag0, ONE_GROUP,
                                        MODE, FAST)
            acc = _kmajor_step(acc, kb, w0, w1, zz, ss, p0, p1, p2, p3, x_ptr, K, kb_hi, r3, words3, diag0, diag1,
                               FAST, F16)
    else:
        kb = kb_lo
        while kb < kb_hi:
            ok = kb + r3 < kb_hi
            w0 = tl.load(q0 + kb * WORDS, mask=ok, other=0)
            w1 = tl.load(q1 + kb * WORDS, mask=ok, other=0)
            zz, ss = _kmajor_tables(kb, kb_hi, z0p, z1p, sp0, sp1, stride_zg, stride_sg, r3, diag0, ONE_GROUP, MODE,
                                    FAST)
            acc = _kmajor_step(acc, kb, w0, w1, zz, ss, w0, w0, w0, w0, x_ptr, K, kb_hi, r3, words3, diag0, diag1,
                               FAST, F16)
            kb += 8
    y0 = tl.sum(tl.where(t3 < 2, acc, 0.0), 1)  # [HN]: rows0
    y1 = tl.sum(tl.where(t3 < 2, 0.0, acc), 1)
    _finish_row(y0, rows0, pid_n, pid_k, 0, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, ws_ptr, cnt_ptr, N, stride_cs,
                HAS_BIAS, SPLIT_K)
    _finish_row(y1, rows1, pid_n, pid_k, 1, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, ws_ptr, cnt_ptr, N, stride_cs,
                HAS_BIAS, SPLIT_K)


@triton.jit
def _finish_row(y, rows, pid_n, pid_k, HALF_ID: tl.constexpr, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, ws_ptr,
                cnt_ptr, N, stride_cs, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[rows] = y * chan[c_0, rows] (+ bias); with split-K the last split of (tile, half) sums the partials."""
    ok = rows < N
    cidx = tl.load(chan_idx_ptr).to(tl.int64)
    if SPLIT_K > 1:
        tl.store(ws_ptr + pid_k * N + rows, y, mask=ok)
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        cnt = cnt_ptr + 2 * pid_n + HALF_ID
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            y = tl.zeros_like(y)
            for sk in tl.static_range(SPLIT_K):
                y += tl.load(ws_ptr + sk * N + rows, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt, 0)
            _store_row(y, rows, ok, y_ptr, bias_ptr, chan_ptr, cidx, stride_cs, HAS_BIAS)
    else:
        _store_row(y, rows, ok, y_ptr, bias_ptr, chan_ptr, cidx, stride_cs, HAS_BIAS)


@triton.jit
def _store_row(y, rows, ok, y_ptr, bias_ptr, chan_ptr, cidx, stride_cs, HAS_BIAS: tl.constexpr):
    y = y * tl.load(chan_ptr + cidx * stride_cs + rows, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _finish(acc, y_ptr, bias_ptr, chan_ptr, cidx, m_j, n_ij, n_in, out_ok, stride_ym, stride_cs,
            HAS_BIAS: tl.constexpr):
    """y[m, n] = acc * chan[c_m, n] (+ bias[n]) for the tile's valid (x-row, row) pairs."""
    y = acc * tl.load(chan_ptr + cidx * stride_cs + n_in).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n_in).to(tl.float32)
    tl.store(y_ptr + m_j * stride_ym + n_ij, y.to(y_ptr.dtype.element_ty), mask=out_ok)


def _cfg(bn, sk, warps=4):
    return triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=warps, num_stages=1)


# BLOCK_N / 2 rows per half tile, a multiple of the 8 rows x num_warps one pass of the warps covers
MMA_GEMV_CONFIGS = [
    _cfg(64, 1), _cfg(64, 2), _cfg(64, 4), _cfg(128, 1), _cfg(128, 2), _cfg(128, 4), _cfg(256, 1), _cfg(256, 2),
    _cfg(128, 1, warps=8), _cfg(256, 1, warps=8), _cfg(256, 2, warps=8),
]
# M = 1 (K-major tile): BLOCK_N / 2 row pairs, one per warp per pass
MMA_GEMV1_CONFIGS = [
    _cfg(16, 1), _cfg(16, 2), _cfg(16, 4), _cfg(32, 1), _cfg(32, 2), _cfg(32, 4), _cfg(64, 1), _cfg(64, 2),
    _cfg(32, 1, warps=8), _cfg(64, 1, warps=8),
]
INTERPRET_CONFIG = {"BLOCK_N": 64, "SPLIT_K": 1}
INTERPRET_CONFIG_1 = {"BLOCK_N": 16, "SPLIT_K": 1}
MAX_SPLIT_K = 4
_KEY = ["N", "K", "MODE", "GROUP_SIZE", "HAS_BIAS", "F16"]


def _quick_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_tuned = triton.autotune(configs=MMA_GEMV_CONFIGS, key=_KEY, do_bench=_quick_bench,
                         cache_results=True)(_mma_gemv_kernel)
_tuned1 = triton.autotune(configs=MMA_GEMV1_CONFIGS, key=_KEY, do_bench=_quick_bench,
                          cache_results=True)(_mma_gemv1_kernel)


def mma_gemv_supported(x: torch.Tensor, mode: int, group_size: int, has_zeros: bool) -> bool:
    """Whether the inputs fit this kernel (else the caller takes the CUDA-core GEMV / tensor-core paths).

    On the GPU x's rows are read as 16-byte words: K a multiple of 8 and 16-byte aligned rows.
    """
    M, K = x.shape
    if not (1 <= M <= MMA_GEMV_MAX_M and mode in (1, 2) and has_zeros and group_size in (-1, 128)):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16):
        return x.device.type == "cpu" and x.dtype == torch.float32  # the interpreter computes in fp32
    if x.device.type == "cpu":
        return True
    return K % 8 == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0


def launch_mma_gemv(x, y, w, chan, scales, chan_idx, scale_idx, mode, bias, config, ws, cnt):
    """y [M, N] = the modes 1/2 semantics for x [M <= 8, K]; ws: float32 workspace of at least
    MAX_SPLIT_K * M * N elements (or SPLIT_K's), cnt: zeroed int32 counters (one per column tile)."""
    M, K = x.shape
    N = w.N
    interpret = x.device.type == "cpu"
    if not mma_gemv_supported(x, mode, w.group_size, w.zeros_t is not None):
        raise ValueError("the MMA GEMV takes modes 1/2, M <= 8, group size -1 or 128, 16-bit x with "
                         "16-byte aligned rows and K a multiple of 8")
    q32 = w.codes_t.view(torch.int32)
    st = scales if scales is not None else w.zeros_t
    s_strides = (st.stride(0), st.stride(1), st.stride(2)) if scales is not None else (0, 0, 0)
    args = (x, y, bias if bias is not None else x, q32, w.zeros_t, w.scales_t, chan, st, chan_idx, scale_idx, ws, cnt,
            M, N, K, x.stride(0), y.stride(0), q32.stride(0), w.zeros_t.stride(0), chan.stride(0), *s_strides)
    meta = dict(MODE=mode, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, FAST=not interpret,
                F16=x.dtype == torch.float16, **launch_kwargs(x))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel, tuned = (_mma_gemv1_kernel, _tuned1) if M == 1 else (_mma_gemv_kernel, _tuned)
    if config is None and interpret:
        config = INTERPRET_CONFIG_1 if M == 1 else INTERPRET_CONFIG
    if config is not None:
        cfg = {k: v for k, v in config.items() if k != "MMA"}
        if ws.numel() < cfg["SPLIT_K"] * M * N:
            raise ValueError("workspace too small for SPLIT_K")
        kernel[grid](*args, **meta, **cfg)
    else:
        tuned[grid](*args, **meta)
    return y
