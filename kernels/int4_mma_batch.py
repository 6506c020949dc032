"""Small-batch decode (1 <= M <= 16 rows of x) on the tensor cores: the int4 code words are the A operand of
`mma.sync` straight from the registers their loads land in (as in kernels.int4_mma_gemv), and the batch rows
are B's 8 columns. One pass over the codes serves every row, whatever adapter each row uses.

Semantics (modes 1 and 2 of kernels.int4_matmul; kernels.reference.adapted_linear_ref is the oracle), for
x [M, K], codes Q [N, K], float zero points z [N, G], group size -1 or 128, row m's slots (c_m, s_m):

  y[m, n] = chan[c_m, n] * sum_g S_m[n, g] * x[m, g] . (Q[n, g] - z[n, g])  (+ bias[n])
  S_m[n, g] = s0[n, g] (mode 1: base and per-channel PEQA)  or  scales[s_m, n, g] (mode 2)

Why: the tensor-core tile of int4_matmul (tl.dot) pays for layout conversions of the dequantized codes through
shared memory and runs at ~2.5x the int4 bytes' floor for M = 4..16 (bench/NOTES-kernels.md). Here the codes
go from their 16-byte loads into the MMA without leaving the registers:

- A K block is 128 codes (one group at group size 128) of a [BLOCK_N]-row tile. The tile's rows come in
  adjacent pairs (rows0[i], rows1[i]) = (2i, 2i + 1), each half held as an [HN, 16] word tile (a word = 8
  codes, nibble j = code 8w + j) laid out with 8 lanes along the rows and 4 along the words: lane
  (g, c) = (l >> 2, l & 3) of warp w holds words 4c..4c+3 of tile row i = 8w + g, in both halves. A step
  covers BPS blocks, stacked as row bands of [BPS * HN, 16] tiles: the bands are register repeats of the
  same lanes, so the layout holds while a warp has BPS KB of codes in flight.
- For m16n8k16 that lane is A rows g (rows0[i]) and g + 8 (rows1[i]); the 16 code positions an MMA reads
  from it are nibbles (j, j + 4) of its words (one LOP3 turns them into a bf16 pair 1 + Q/128, as in
  kernels.int4_mma_gemv), and 8 MMAs consume its 4 words. The dot's reduction index only has to agree between
  A and B, and lanes with the same c hold the same K positions, so B column g is x row (mb + g) at the lane's
  own K positions, which the lane loads itself (16 bytes per word). No MMA work is thrown away when M >= 8;
  M > 8 runs a second chain over the same words with B = rows 8..15.
- C register t of lane (g, c) is (row (rows0[i] if t < 2 else rows1[i]), batch mb + 2c + (t & 1)): the
  accumulator tile holds one output per element per band; the bands are added once at the end.
- sum_k x_k (1 + Q_k/SCALE) = X + x.Q / SCALE, so x . (Q - z) = SCALE * C - (SCALE + z) * X with the
  block sums X from a chain with A = 1.0 (in C's layout). Each step ends inside the same inline asm:
  acc_t += S_t * (SCALE * C_t - (SCALE + z_t) * X_t), float32, so float zero points stay exact.
- The group tables are N-contiguous ([G, N_pad] base tables; the slab stored [S, G, N]), so a lane reads its
  two rows' zero points in one 8-byte load, and its two rows' scales for each of its two batch columns in one
  load each (`S_PAIR`; else four loads).

The inline asm is only right when Triton lays the word tiles out as above (sizePerThread [1, 4],
threadsPerWarp [8, 4]); tests/kernels/test_int4_mma_gemv.py compiles every config for sm_90 and checks.
H100 (bench/NOTES-kernels.md, session 12): faster than int4_matmul's tensor-core tile at M = 4 (68.5 against
83.6 µs per 7B layer, g128 mode 2), slower at M = 16 (a second chain doubles x loads and registers) and than
the MMA GEMV at M = 1, so the dispatch gives it 2 <= M <= 8.
The interpreter (CPU CI) computes the same accumulator tile with plain tensor arithmetic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .device import ROW_INDEX_ARGS, quick_bench
from .int4_mma_gemv import _X_WORD_ASM, _mma_chain_asm, _ones_sums, scale_pairs_readable
from .pdl import launch_kwargs, prefetch_l2, wait_for_producer

BLOCK_K = tl.constexpr(128)  # codes per K block: 16 words of a row, one group at group size 128
WORDS = tl.constexpr(16)
GROUP_SIZES = (-1, 128)
MAX_M = 16  # two chains of 8 batch columns


def _step_asm(f16: bool) -> str:
    """One block of one lane (GPU): the 8-MMA code chain over words $4..$11 and x pairs $12..$27, then
    acc_t ($40 + t in, $t out) += S_t ($36 + t) * (SCALE * C_t - (SCALE + z_t ($32 + t)) * X_t ($28 + t))."""
    scale = "0f41800000" if f16 else "0f43000000"  # 16.0 / 128.0
    neg = "0fC1800000" if f16 else "0fC3000000"
    chain = _mma_chain_asm(f16, False).splitlines()
    assert chain[-1].startswith("mov.b32 $0")
    body = chain[:-1]
    body[0] = body[0].replace(".reg .f32 c0, c1, c2, c3;", ".reg .f32 c0, c1, c2, c3, e0, e1, e2, e3;")
    for t in range(4):
        body += [f"sub.f32 e{t}, {neg}, ${32 + t}; mul.f32 e{t}, e{t}, ${28 + t};",
                 f"fma.rn.f32 e{t}, c{t}, {scale}, e{t};"]
    body.append(" ".join(f"fma.rn.f32 ${t}, ${36 + t}, e{t}, ${40 + t};" for t in range(4)) + " }")
    return "\n".join(body)


_STEP_BF16 = tl.constexpr(_step_asm(False))
_STEP_F16 = tl.constexpr(_step_asm(True))
# out acc 4 (early clobber: written before the last inputs are read); in words 8, x pairs 16, X 4, z 4, S 4, acc 4
_STEP_CONSTRAINTS = tl.constexpr("=&f,=&f,=&f,=&f" + ",r" * 24 + ",f" * 16)

# (a, a, b, b) from the float32 pair (a, b) at $4 (zero points; mode 1's base scales): rows0 for t < 2
_PAIR_ASM = tl.constexpr("ld.global.nc.v2.f32 {$0, $2}, [$4]; mov.b32 $1, $0; mov.b32 $3, $2;")


@functools.cache  # one of six strings, asked for on every launch
def _scales_asm(s_type: str, pair: bool) -> str:
    """Mode 2's scales of a lane: out S_t for (row t >> 1, batch column t & 1). pair: rows0 and rows1 of batch
    column 0 in one load at $4, of column 1 at $5; else one load per element at $4 + t."""
    if s_type == "f32":
        if pair:
            return "ld.global.nc.v2.f32 {$0, $2}, [$4]; ld.global.nc.v2.f32 {$1, $3}, [$5];"
        return " ".join(f"ld.global.nc.f32 ${t}, [${4 + t}];" for t in range(4))
    out = ["{ .reg .b16 h0, h1, h2, h3; .reg .b32 a, b;"]
    if pair:
        out.append("ld.global.nc.b32 a, [$4]; ld.global.nc.b32 b, [$5]; mov.b32 {h0, h2}, a; mov.b32 {h1, h3}, b;")
    else:
        out.append(" ".join(f"ld.global.nc.b16 h{t}, [${4 + t}];" for t in range(4)))
    out.append(" ".join(f"cvt.f32.{s_type} ${t}, h{t};" for t in range(4)) + " }")
    return "\n".join(out)


S_TYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@triton.jit
def _pair_tile(ptrs, vword):
    """[R, 16] float32 (GPU): (a, a, b, b) per lane from the float32 pair at each lane's pointer. vword ([1, 16],
    the element's word) is an operand the asm ignores: the pointers are constant along the words, and Triton
    computes a pure elementwise op once per run of equal operands, which would give a lane's 4 different results
    one value. (Marking the asm impure instead cost it its layout.)"""
    lanes = tl.broadcast_to(vword, ptrs.shape)
    return tl.inline_asm_elementwise(_PAIR_ASM, "=f,=f,=f,=f,l,l,l,l,r,r,r,r", [ptrs, lanes], dtype=tl.float32,
                                     is_pure=True, pack=4)


@triton.jit
def _scale_tile(ptrs, vword, S_ASM: tl.constexpr):
    """[R, 16] float32 (GPU): mode 2's scale S_t of each element from its pointer, by the launcher's
    _scales_asm for the slab's dtype and layout (pair: elements 0 and 1 point at the rows0 / rows1 pair of the
    lane's two batch columns); vword as in _pair_tile."""
    lanes = tl.broadcast_to(vword, ptrs.shape)
    return tl.inline_asm_elementwise(S_ASM, "=f,=f,=f,=f,l,l,l,l,r,r,r,r", [ptrs, lanes], dtype=tl.float32,
                                     is_pure=True, pack=4)


@triton.jit
def _x_pairs(x_ptrs, ok):
    """x words (16 bytes at each element's pointer; zeros where not ok) as the B pairs P_j = (x[j], x[j + 4])."""
    return tl.inline_asm_elementwise(_X_WORD_ASM, "=r,=r,=r,=r,l,r", [x_ptrs, ok.to(tl.int32)],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _chain_step(acc, w0, w1, p0, p1, p2, p3, zt, st, F16: tl.constexpr):
    """acc [R, 16] += the blocks' scaled dots for one chain of 8 batch columns (GPU; _step_asm)."""
    if F16:
        STEP: tl.constexpr = _STEP_F16
    else:
        STEP: tl.constexpr = _STEP_BF16
    xs = _ones_sums(p0, p1, p2, p3, F16)
    return tl.inline_asm_elementwise(STEP, _STEP_CONSTRAINTS, [w0, w1, p0, p1, p2, p3, xs, zt, st, acc],
                                     dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _plain_step(acc, blk, w0, w1, zt, st, x_ptr, stride_xm, mb, M, K, vcol):
    """Interpreter: acc [R, 16] += S * x_m . (Q_n - z) over each tile row's block blk [R, 1], on the elements
    (n, m) of the tile's layout (element t of a lane: row rows0/rows1 by t < 2, batch mb + 2c + (t & 1)), with
    plain arithmetic."""
    R: tl.constexpr = w0.shape[0]
    nib = tl.arange(0, 8)[None, None, :] * 4
    q0 = tl.reshape(((w0[:, :, None] >> nib) & 0xF).to(tl.float32), [R, BLOCK_K])  # [R, 128]: k = 8w + j
    q1 = tl.reshape(((w1[:, :, None] >> nib) & 0xF).to(tl.float32), [R, BLOCK_K])
    rb = mb + tl.arange(0, 8)[None, :, None]  # [1, 8, 1] the chain's batch rows
    k = blk[:, :, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :]  # [R, 1, 128]
    xb = tl.load(x_ptr + rb * stride_xm + k, mask=(rb < M) & (k < K), other=0.0).to(tl.float32)  # [R, 8, 128]
    d0 = tl.sum(q0[:, None, :] * xb, 2)  # [R, 8] rows0 x batch
    d1 = tl.sum(q1[:, None, :] * xb, 2)
    xs = tl.sum(xb, 2)  # [R, 8]
    t = vcol & 3
    pick = (2 * (vcol >> 2) + (t & 1))[:, None] == tl.arange(0, 8)[None, :]  # [16, 8] element -> batch column
    e0 = tl.sum(tl.where(pick[None, :, :], d0[:, None, :], 0.0), 2)  # [R, 16]
    e1 = tl.sum(tl.where(pick[None, :, :], d1[:, None, :], 0.0), 2)
    xe = tl.sum(tl.where(pick[None, :, :], xs[:, None, :], 0.0), 2)
    return acc + st * (tl.where(t[None, :] < 2, e0, e1) - zt * xe)


@triton.jit
def _step_x(blk, live, x0p, x1p, xok0, xok1, K, vword, MB2: tl.constexpr, EVEN_K: tl.constexpr):
    """The x pairs of both chains for the blocks blk [R, 1] (GPU; zeros where not live)."""
    kx = blk * BLOCK_K + vword * 8  # [R, 16] first k of each word
    if EVEN_K:  # (only a block past the range, a prefetch whose values go unused, could leave x)
        xin = live
    else:  # the ragged last block: codes past K are 0 and would still add -z * x
        xin = (kx < K) & live
    a0, a1, a2, a3 = _x_pairs(x0p + kx, xok0 & xin)
    if MB2:
        b0, b1, b2, b3 = _x_pairs(x1p + kx, xok1 & xin)
    else:
        b0 = a0
        b1 = a1
        b2 = a2
        b3 = a3
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _step_loads(s, kb_hi, rblk, q0, q1, x0p, x1p, xok0, xok1, zp, sp, sp1, stride_zg, stride_tg, K, vword,
                MB2: tl.constexpr, S_ASM: tl.constexpr, MODE: tl.constexpr, ONE_GROUP: tl.constexpr,
                EVEN_K: tl.constexpr, BPS: tl.constexpr, X_AHEAD: tl.constexpr, CLAMP: tl.constexpr = False):
    """Everything step s reads (GPU), as [R, 16] tiles over its BPS blocks: the code words of both halves, the x
    pairs of each chain (X_AHEAD; else zeros: loaded at the step), the zero points and the scales of each chain
    (codes and x zero past kb_hi; with CLAMP the codes there are block kb_hi - 1's, real words that need no mask
    or zero fill, and add nothing since their x is zero)."""
    blk = s * BPS + rblk  # [R, 1] each tile row's block
    live = blk < kb_hi
    if CLAMP:
        bc = (tl.minimum(blk, kb_hi - 1) - rblk) * WORDS  # [R, 1]: q0 already holds rblk's offset
        w0 = tl.load(q0 + bc, eviction_policy="evict_first")
        w1 = tl.load(q1 + bc, eviction_policy="evict_first")
    else:
        w0 = tl.load(q0 + s * (BPS * WORDS), mask=live, other=0, eviction_policy="evict_first")
        w1 = tl.load(q1 + s * (BPS * WORDS), mask=live, other=0, eviction_policy="evict_first")
    if X_AHEAD:
        a0, a1, a2, a3, b0, b1, b2, b3 = _step_x(blk, live, x0p, x1p, xok0, xok1, K, vword, MB2, EVEN_K)
    else:
        a0 = w0
        a1 = w0
        a2 = w0
        a3 = w0
        b0 = w0
        b1 = w0
        b2 = w0
        b3 = w0
    if ONE_GROUP:
        g = 0 * blk
    else:
        g = tl.minimum(blk, kb_hi - 1)  # (past the range: any valid group; its block adds nothing)
    zt = _pair_tile(zp + g * stride_zg, vword)
    if MODE == 1:
        st = _pair_tile(sp + g * stride_zg, vword)
        st1 = st
    else:
        st = _scale_tile(sp + g * stride_tg, vword, S_ASM)
        if MB2:  # (batch rows 8..15 have slots of their own)
            st1 = _scale_tile(sp1 + g * stride_tg, vword, S_ASM)
        else:
            st1 = st
    return w0, w1, a0, a1, a2, a3, b0, b1, b2, b3, zt, st, st1


@triton.jit
def _batch_setup(pid_n, pid_k, q_ptr, x_ptr, M, K, stride_qn, stride_xm, BLOCK_N: tl.constexpr, BPS: tl.constexpr,
                 SPLIT_K: tl.constexpr, PDL: tl.constexpr):
    """A batch-layout program's geometry (this kernel's, kernels.int4_mma_alpha's batch kernel's), its first codes
    asked into L2 and the PDL wait: (rblk [R, 1] each tile row's block within a step, pair0 [R] its first row, vcol
    [16] / vword [1, 16] the element column = word 4c + t of the lane's block, t [1, 16], the code pointers q0 / q1
    [R, 16] at step 0, num_kb, the split's steps [s_lo, s_hi) and blocks up to kb_hi, the x row pointers of both
    chains and where those rows exist, colr [1, 16] each element's batch column (chain 0))."""
    HN: tl.constexpr = BLOCK_N // 2
    R: tl.constexpr = BPS * HN
    r = tl.arange(0, R)
    rblk = (r // HN)[:, None]  # [R, 1] the tile row's block within a step
    pair0 = pid_n * BLOCK_N + 2 * (r % HN)  # [R] the tile row's first row
    vcol = tl.arange(0, WORDS)  # [16]: element column = word 4c + t of the lane's block
    vword = vcol[None, :]
    t = vword & 3
    q0 = q_ptr + pair0[:, None] * stride_qn + rblk * WORDS + vword  # [R, 16] at step 0
    q1 = q0 + stride_qn
    num_kb = tl.cdiv(K, BLOCK_K)
    steps_per_split = tl.cdiv(tl.cdiv(num_kb, BPS), SPLIT_K)
    s_lo = pid_k * steps_per_split
    kb_hi = tl.minimum((s_lo + steps_per_split) * BPS, num_kb)  # this split's blocks end here
    s_hi = tl.cdiv(kb_hi, BPS)
    if PDL:  # this program's first code blocks into L2 (a 128-byte line holds two blocks of a row)
        first = ((vword & 7) == 0) & (rblk == 0) & (s_lo < s_hi)
        prefetch_l2(q0 + s_lo * (BPS * WORDS) + (vword >> 3) * 32, first)
        prefetch_l2(q1 + s_lo * (BPS * WORDS) + (vword >> 3) * 32, first)
    wait_for_producer(PDL)
    brow0 = (r % 8)[:, None] + 0 * vword  # [R, 16]: the x row whose B column the lane loads (chain 0)
    x0p = x_ptr + brow0 * stride_xm
    x1p = x0p + 8 * stride_xm
    xok0 = brow0 < M
    xok1 = brow0 + 8 < M
    # tables: element (r, v) stands for row pair0 + (t >> 1) and batch column 2c + (t & 1)
    colr = 2 * (vword >> 2) + (t & 1)  # [1, 16]
    return rblk, pair0, vcol, vword, t, q0, q1, num_kb, s_lo, kb_hi, s_hi, x0p, x1p, xok0, xok1, colr


@triton.jit(do_not_specialize=ROW_INDEX_ARGS)
def _mma_batch_kernel(
    x_ptr, y_ptr, bias_ptr,  # x [M, K], y [M, N], bias [N]
    q_ptr, zero_ptr, s0_ptr,  # codes_t as int32 [N_pad, KW], zeros_t / scales_t [G, N_pad] f32
    chan_ptr, scale_ptr,  # slab tables [Sc, N], [Sg, N, G] (any float dtype, through strides)
    chan_idx_ptr, scale_idx_ptr,  # [M] the rows' slots
    ws_ptr, cnt_ptr,  # split-K workspace [SPLIT_K, M, N] f32, arrival counters (one per column tile, zero)
    M, N, K,
    stride_xm, stride_ym, stride_qn, stride_zg, stride_cs, stride_ss, stride_sn, stride_sg,
    MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, FAST: tl.constexpr,
    F16: tl.constexpr, PDL: tl.constexpr, S_PAIR: tl.constexpr, S_ASM: tl.constexpr, MB2: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BPS: tl.constexpr, DEPTH: tl.constexpr, X_AHEAD: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """y[:M, tile] for one column tile of BLOCK_N = 16 * num_warps rows (one row pair per lane group) and one of
    SPLIT_K ranges of steps. A step is BPS consecutive K blocks, held as BPS row bands of the [BPS * HN, 16] tiles
    (tile row r: row pair r % HN, block r // HN of the step: a lane's register repeats). MB2: M > 8, a second
    chain for batch rows 8..15. DEPTH (1 or 2): how many steps ahead the codes, tables (and with X_AHEAD the x
    pairs) are loaded into registers. UNROLL 2 (DEPTH 1): two steps an iteration, whose loads alternate between
    two sets of registers (no copies of the loaded set at the loop's end; int4_mma_gemv has the same option)."""
    tl.static_assert(UNROLL == 1 or (UNROLL == 2 and DEPTH == 1), "UNROLL 2 takes DEPTH 1")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HN: tl.constexpr = BLOCK_N // 2
    R: tl.constexpr = BPS * HN
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0
    (rblk, pair0, vcol, vword, t, q0, q1, num_kb, s_lo, kb_hi, s_hi, x0p, x1p, xok0, xok1,
     colr) = _batch_setup(pid_n, pid_k, q_ptr, x_ptr, M, K, stride_qn, stride_xm, BLOCK_N, BPS, SPLIT_K, PDL)
    zp = zero_ptr + pair0[:, None] + 0 * vword  # [R, 16]: the zero-point pair (rows0, rows1)
    if MODE == 1:
        sp = s0_ptr + pair0[:, None] + 0 * vword
        sp1 = sp
        stride_tg = stride_zg
    else:
        if FAST and S_PAIR:  # elements 0 / 1: the rows0 scale of the lane's batch columns 0 / 1
            srow = tl.minimum(pair0[:, None], N - 2) + 0 * vword
        else:
            srow = tl.minimum(pair0[:, None] + (t >> 1), N - 1)
        sidx = tl.load(scale_idx_ptr + colr, mask=colr < M, other=0).to(tl.int64)  # [1, 16]
        sp = scale_ptr + sidx * stride_ss + srow * stride_sn
        sidx1 = tl.load(scale_idx_ptr + colr + 8, mask=colr + 8 < M, other=0).to(tl.int64)
        sp1 = scale_ptr + sidx1 * stride_ss + srow * stride_sn
        stride_tg = stride_sg
    acc0 = tl.zeros([R, WORDS], dtype=tl.float32)
    acc1 = tl.zeros([R, WORDS], dtype=tl.float32)
    if FAST and UNROLL == 2:  # set A runs step s while set B loads step s + 1, then the other way round
        w0A, w1A, a0A, a1A, a2A, a3A, b0A, b1A, b2A, b3A, ztA, stA, s1A = _step_loads(
            s_lo, kb_hi, rblk, q0, q1, x0p, x1p, xok0, xok1, zp, sp, sp1, stride_zg, stride_tg, K, vword, MB2, S_ASM,
            MODE, ONE_GROUP, EVEN_K, BPS, X_AHEAD, True)
        for s in range(s_lo, s_hi, 2):
            w0B, w1B, a0B, a1B, a2B, a3B, b0B, b1B, b2B, b3B, ztB, stB, s1B = _step_loads(
                s + 1, kb_hi, rblk, q0, q1, x0p, x1p, xok0, xok1, zp, sp, sp1, stride_zg, stride_tg, K, vword, MB2,
                S_ASM, MODE, ONE_GROUP, EVEN_K, BPS, X_AHEAD, True)
            if not X_AHEAD:
                blk = s * BPS + rblk
                a0A, a1A, a2A, a3A, b0A, b1A, b2A, b3A = _step_x(blk, blk < kb_hi, x0p, x1p, xok0, xok1, K, vword,
                                                                 MB2, EVEN_K)
            acc0 = _chain_step(acc0, w0A, w1A, a0A, a1A, a2A, a3A, ztA, stA, F16)
            if MB2:
                acc1 = _chain_step(acc1, w0A, w1A, b0A, b1A, b2A, b3A, ztA, s1A, F16)
            w0A, w1A, a0A, a1A, a2A, a3A, b0A, b1A, b2A, b3A, ztA, stA, s1A = _step_loads(
                s + 2, kb_hi, rblk, q0, q1, x0p, x1p, xok0, xok1, zp, sp, sp1, stride_zg, stride_tg, K, vword, MB2,
                S_ASM, MODE, ONE_GROUP, EVEN_K, BPS, X_AHEAD, True)
            if s + 1 < s_hi:  # (an odd number of steps: the last iteration's second step has no blocks)
                if not X_AHEAD:
                    blk = (s + 1) * BPS + rblk
                    a0B, a1B, a2B, a3B, b0B, b1B, b2B, b3B = _step_x(blk, blk < kb_hi, x0p, x1p, xok0, xok1, K,
                                                                     vword, MB2, EVEN_K)
                acc0 = _chain_step(acc0, w0B, w1B, a0B, a1B, a2B, a3B, ztB, stB, F16)
                if MB2:
                    acc1 = _chain_step(acc1, w0B, w1B, b0B, b1B, b2B, b3B, ztB, s1B, F16)
    elif FAST:
        w0n, w1n, a0n, a1n, a2n, a3n, b0n, b1n, b2n, b3n, ztn, stn, s1n = _step_loads(
            s_lo, kb_hi, rblk, q0, q1, x0p, x1p, xok0, xok1, zp, sp, sp1, stride_zg, stride_tg, K, vword, MB2, S_ASM,
            MODE, ONE_GROUP, EVEN_K, BPS, X_AHEAD)
        if DEPTH == 2:
            w0m, w1m, a0m, a1m, a2m, a3m, b0m, b1m, b2m, b3m, ztm, stm, s1m = _step_loads(
                s_lo + 1, kb_hi, rblk, q0, q1, x0p, x1p, xok0, xok1, zp, sp, sp1, stride_zg, stride_tg, K, vword, MB2,
                S_ASM, MODE, ONE_GROUP, EVEN_K, BPS, X_AHEAD)
        for s in range(s_lo, s_hi):
            w0 = w0n
            w1 = w1n
            a0 = a0n
            a1 = a1n
            a2 = a2n
            a3 = a3n
            b0 = b0n
            b1 = b1n
            b2 = b2n
            b3 = b3n
            zt = ztn
            st = stn
            su = s1n
            if DEPTH == 2:
                w0n = w0m
                w1n = w1m
                a0n = a0m
                a1n = a1m
                a2n = a2m
                a3n = a3m
                b0n = b0m
                b1n = b1m
                b2n = b2m
                b3n = b3m
                ztn = ztm
                stn = stm
                s1n = s1m
                w0m, w1m, a0m, a1m, a2m, a3m, b0m, b1m, b2m, b3m, ztm, stm, s1m = _step_loads(
                    s + 2, kb_hi, rblk, q0, q1, x0p, x1p, xok0, xok1, zp, sp, sp1, stride_zg, stride_tg, K, vword,
                    MB2, S_ASM, MODE, ONE_GROUP, EVEN_K, BPS, X_AHEAD)
            else:
                w0n, w1n, a0n, a1n, a2n, a3n, b0n, b1n, b2n, b3n, ztn, stn, s1n = _step_loads(
                    s + 1, kb_hi, rblk, q0, q1, x0p, x1p, xok0, xok1, zp, sp, sp1, stride_zg, stride_tg, K, vword,
                    MB2, S_ASM, MODE, ONE_GROUP, EVEN_K, BPS, X_AHEAD)
            if not X_AHEAD:  # x at the step (L1 hits after the first warp): fewer registers
                blk = s * BPS + rblk
                a0, a1, a2, a3, b0, b1, b2, b3 = _step_x(blk, blk < kb_hi, x0p, x1p, xok0, xok1, K, vword, MB2,
                                                         EVEN_K)
            acc0 = _chain_step(acc0, w0, w1, a0, a1, a2, a3, zt, st, F16)
            if MB2:
                acc1 = _chain_step(acc1, w0, w1, b0, b1, b2, b3, zt, su, F16)
    else:
        rowt = pair0[:, None] + (t >> 1)  # [R, 16] each element's row
        s = s_lo
        while s < s_hi:
            blk = s * BPS + rblk  # [R, 1]
            live = blk < kb_hi
            w0 = tl.load(q0 + s * (BPS * WORDS), mask=live, other=0)
            w1 = tl.load(q1 + s * (BPS * WORDS), mask=live, other=0)
            if ONE_GROUP:
                g = 0 * blk
            else:
                g = tl.minimum(blk, num_kb - 1)
            zt = tl.load(zero_ptr + g * stride_zg + rowt)
            if MODE == 1:
                st = tl.load(s0_ptr + g * stride_zg + rowt)
                su = st
            else:
                st = tl.load(sp + g * stride_sg).to(tl.float32)
                su = tl.load(sp1 + g * stride_sg).to(tl.float32)
            acc0 = _plain_step(acc0, blk, w0, w1, zt, st, x_ptr, stride_xm, 0, M, K, vcol)
            if MB2:
                acc1 = _plain_step(acc1, blk, w0, w1, zt, su, x_ptr, stride_xm, 8, M, K, vcol)
            s += 1
    if BPS > 1:  # the step's blocks are row bands of the tile: add them up (within each thread)
        acc0 = tl.sum(tl.reshape(acc0, [BPS, HN, WORDS]), 0)
        acc1 = tl.sum(tl.reshape(acc1, [BPS, HN, WORDS]), 0)
    i = tl.arange(0, HN)
    rowe = pid_n * BLOCK_N + 2 * i[:, None] + (t >> 1)  # [HN, 16]
    _finish(acc0, rowe, colr, pid_n, pid_k, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, ws_ptr, cnt_ptr, M, N,
            stride_ym, stride_cs, acc1, MB2, HAS_BIAS, SPLIT_K)


@triton.jit
def _finish(acc0, rowe, col, pid_n, pid_k, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, ws_ptr, cnt_ptr, M, N,
            stride_ym, stride_cs, acc1, MB2: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
            alpha_idx_ptr=None, ALPHA: tl.constexpr = False):
    """y[col, rowe] = acc * chan[c_col, rowe] (+ bias) for both chains; with split-K the last split to arrive
    at the column tile sums the partials (fixed order: deterministic). ALPHA (kernels.int4_mma_alpha's batch
    kernel): AlphaTuning columns (alpha_idx >= 0) take no chan."""
    if SPLIT_K > 1:
        ok0 = (rowe < N) & (col < M)
        tl.store(ws_ptr + (pid_k * M + col) * N + rowe, acc0, mask=ok0)
        if MB2:
            tl.store(ws_ptr + (pid_k * M + col + 8) * N + rowe, acc1, mask=(rowe < N) & (col + 8 < M))
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        cnt = cnt_ptr + pid_n
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc0 = tl.zeros_like(acc0)
            acc1 = tl.zeros_like(acc1)
            for sk in tl.static_range(SPLIT_K):
                acc0 += tl.load(ws_ptr + (sk * M + col) * N + rowe, mask=ok0, other=0.0, cache_modifier=".cg")
                if MB2:
                    acc1 += tl.load(ws_ptr + (sk * M + col + 8) * N + rowe, mask=(rowe < N) & (col + 8 < M),
                                    other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt, 0)
            _store(acc0, rowe, col, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, M, N, stride_ym, stride_cs, HAS_BIAS,
                   alpha_idx_ptr, ALPHA)
            if MB2:
                _store(acc1, rowe, col + 8, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, M, N, stride_ym, stride_cs,
                       HAS_BIAS, alpha_idx_ptr, ALPHA)
    else:
        _store(acc0, rowe, col, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, M, N, stride_ym, stride_cs, HAS_BIAS,
               alpha_idx_ptr, ALPHA)
        if MB2:
            _store(acc1, rowe, col + 8, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, M, N, stride_ym, stride_cs, HAS_BIAS,
                   alpha_idx_ptr, ALPHA)


@triton.jit
def _store(acc, rowe, col, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, M, N, stride_ym, stride_cs,
           HAS_BIAS: tl.constexpr, alpha_idx_ptr, ALPHA: tl.constexpr):
    ok = (rowe < N) & (col < M)
    cidx = tl.load(chan_idx_ptr + col, mask=col < M, other=0).to(tl.int64)  # [1, 16]
    c_ok = ok
    if ALPHA:
        c_ok = ok & (tl.load(alpha_idx_ptr + col, mask=col < M, other=0) < 0)
    y = acc * tl.load(chan_ptr + cidx * stride_cs + rowe, mask=c_ok, other=1.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rowe, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + col * stride_ym + rowe, y.to(y_ptr.dtype.element_ty), mask=ok)


def _cfg(warps, sk, bps=1, depth=1, x_ahead=1, maxnreg=None, unroll=1):
    return triton.Config({"BLOCK_N": 16 * warps, "SPLIT_K": sk, "BPS": bps, "DEPTH": depth, "X_AHEAD": x_ahead,
                          "UNROLL": unroll}, num_warps=warps, num_stages=1, maxnreg=maxnreg)


# BLOCK_N = 16 rows per warp (8 row pairs, one per lane group); a step's BPS blocks put BPS KB a warp in flight;
# split-K fills the SMs on the short shapes. Offline (sm_90a, mode 2, 4 warps): BPS 1 / 2 / 4 (x at the step)
# take 70 / 130 / 210 registers for one chain; two chains (M > 8) 130 / 246 / 255 + spills, so BPS 4 is for
# M <= 8 only (_prune).
MMA_BATCH_CONFIGS = [
    _cfg(4, 1, 2), _cfg(4, 2, 2), _cfg(4, 4, 2), _cfg(4, 2, 2, x_ahead=0), _cfg(4, 4), _cfg(4, 8), _cfg(4, 4, depth=2),
    _cfg(2, 4, 2), _cfg(2, 8, 2), _cfg(8, 1, 2), _cfg(4, 1, 4, x_ahead=0), _cfg(4, 2, 4, x_ahead=0),
    _cfg(4, 1, 2, depth=2, x_ahead=0), _cfg(4, 2, 2, depth=2, x_ahead=0),
    # two steps an iteration (UNROLL 2: no copies of the prefetched set at the loop's end, code loads past the
    # range clamped instead of zero-filled). Offline sm_90a, mode 2, g128, 4 warps, SASS a step / registers: BPS
    # 2 375 / 128 -> 315 / 168. H200, M = 4, g128 mode 2 (bench/results/mma-batch-sweep-s14-h200.json): the best
    # of every config on qkv (15.0 µs; 17.6 with UNROLL 1) and gate_up (22.8; the list's best before 23.6)
    _cfg(4, 1, 2, unroll=2), _cfg(4, 2, 2, unroll=2),
]
# Candidates: forced configs only, which bench/kernels.py --mma-batch-sweep times beside MMA_BATCH_CONFIGS; the
# autotuner does not see them. UNROLL 2 with BPS 1 (SASS a step 192 / 70 registers -> 168 / 95) or 2 warps:
# slower than the list's best on every 7B shape (H200, session 14).
MMA_BATCH_CANDIDATE_CONFIGS = [_cfg(4, 4, unroll=2), _cfg(2, 8, 2, unroll=2)]
INTERPRET_CONFIG = {"BLOCK_N": 16, "SPLIT_K": 1, "BPS": 2, "DEPTH": 1, "X_AHEAD": 1, "UNROLL": 1}
INTERPRET_WARPS = 1
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in MMA_BATCH_CONFIGS)
_KEY = ["N", "K", "MODE", "GROUP_SIZE", "HAS_BIAS", "F16", "S_PAIR", "MB2"]  # (K fixes EVEN_K)



def _prune(configs, named_args, **kwargs):
    """Two chains (M > 8) take the configs of at most 2 blocks a step and one step an iteration (BPS 2 already
    takes 246 registers for them: a second register set would spill)."""
    if kwargs.get("MB2", named_args.get("MB2")):
        return [c for c in configs if c.kwargs["BPS"] <= 2 and c.kwargs["UNROLL"] == 1]
    return configs


_tuned = triton.autotune(configs=MMA_BATCH_CONFIGS, key=_KEY, do_bench=quick_bench, cache_results=True,
                         prune_configs_by={"early_config_prune": _prune})(_mma_batch_kernel)


def mma_batch_supported(x: torch.Tensor, N: int, mode: int, group_size: int, has_zeros: bool) -> bool:
    """Whether the inputs fit this kernel: 1 <= M <= 16, an even N (rows in adjacent pairs), modes 1/2 with
    zero points at group size -1 or 128; on the GPU 16-bit x read as 16-byte words (K a multiple of 8, rows
    16-byte aligned)."""
    M, K = x.shape
    if not (1 <= M <= MAX_M and N % 2 == 0 and mode in (1, 2) and has_zeros and group_size in GROUP_SIZES):
        return False
    if x.device.type == "cpu":  # the interpreter computes in float32, from any float x
        return x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return (x.dtype in (torch.bfloat16, torch.float16) and K % 8 == 0 and x.stride(1) == 1
            and x.data_ptr() % 16 == 0 and (M == 1 or x.stride(0) % 8 == 0))


def launch_mma_batch(x, y, w, chan, scales, chan_idx, scale_idx, mode, bias, config, ws, cnt):
    """y [M, N] = the modes 1/2 semantics for x [M, K], 1 <= M <= 16; ws: float32 workspace of at least
    MAX_SPLIT_K * M * N elements (SPLIT_K * M * N with a config), cnt: zeroed int32 counters (one per column
    tile). config: BLOCK_N (16 x num_warps), SPLIT_K, optional DEPTH (else autotuned; fixed in the interpreter)."""
    M, K = x.shape
    N = w.N
    if not mma_batch_supported(x, N, mode, w.group_size, w.zeros_t is not None):
        raise ValueError("the MMA batch kernel takes 1 to 16 rows of x, an even N, modes 1/2 with group size -1 or "
                         "128, and on CUDA 16-bit x with 16-byte aligned rows and K a multiple of 8")
    q32 = w.codes_t.view(torch.int32)
    st = scales if scales is not None else w.zeros_t
    s_strides = (st.stride(0), st.stride(1), st.stride(2)) if scales is not None else (0, 0, 0)
    args = (x, y, bias if bias is not None else x, q32, w.zeros_t, w.scales_t, chan, st, chan_idx, scale_idx, ws, cnt,
            M, N, K, x.stride(0), y.stride(0), q32.stride(0), w.zeros_t.stride(0), chan.stride(0), *s_strides)
    interpret = x.device.type == "cpu"
    s_pair = scale_pairs_readable(mode, scales)
    meta = dict(MODE=mode, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, FAST=not interpret,
                F16=x.dtype == torch.float16, S_PAIR=s_pair, S_ASM=_scales_asm(S_TYPE[st.dtype], s_pair),
                MB2=M > 8,
                EVEN_K=K % 128 == 0,
                **launch_kwargs(x))

    run_batch_kernel(_mma_batch_kernel, _tuned, args, meta, config, ws, M, N, interpret)
    return y


def run_batch_kernel(kernel, tuned, args, meta, config, ws, M: int, N: int, interpret: bool) -> None:
    """Launch a batch-layout kernel (this one, kernels.int4_mma_alpha's batch kernel) over N's column tiles and the
    config's splits: a forced config (checked), the interpreter's fixed one, else its autotuner's."""
    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is None and interpret:
        config = {**INTERPRET_CONFIG, "num_warps": INTERPRET_WARPS}
    if config is None:
        tuned[grid](*args, **meta)
        return
    # (num_stages 1 as in the autotune list: another value is another compile of the same loop)
    cfg = {"BPS": 1, "DEPTH": 1, "X_AHEAD": 1, "UNROLL": 1, "num_stages": 1,
           **{k: v for k, v in config.items() if k != "MMA_BATCH"}}
    if cfg["BLOCK_N"] != 16 * cfg.get("num_warps", 4):
        raise ValueError("BLOCK_N must be 16 x num_warps (one row pair per lane group)")
    if ws.numel() < cfg["SPLIT_K"] * M * N:
        raise ValueError("workspace too small for SPLIT_K")
    kernel[grid](*args, **meta, **cfg)
