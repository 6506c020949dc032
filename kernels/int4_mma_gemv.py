"""Decode GEMV (one row of x) on the tensor cores: the int4 code words are the A operand of `mma.sync`
straight from the registers their 16-byte loads land in, x is the B operand.

Semantics (modes 1 and 2 of kernels.int4_matmul; kernels.reference.adapted_linear_ref is the oracle),
for x [1, K], codes Q [N, K], float zero points z [N, G], group size -1 or 128:

  y[n] = chan[c, n] * sum_g s[n, g] * x_g . (Q[n, g] - z[n, g])  (+ bias[n])
  s[n, g] = s0[n, g] (mode 1: base and per-channel PEQA)  or  scales[s, n, g] (mode 2)

Why: the CUDA-core GEMV spends ~4.2 instructions per code (a LOP3 and an FFMA per code, shifts, x
handling) and is bound by issue and latency (bench/NOTES-kernels.md). Here the loop is ~2.2 per code:

- A word of codes_t holds 8 codes, nibble i = code 8w + i. Nibbles i and i + 4 sit at bits 4i and
  16 + 4i, so `lop3((word >> 4i) & 0x000F000F | 1.0bf16x2)` is the bf16 pair (1 + Q_i/128, 1 + Q_{i+4}/128)
  exactly: one LOP3 (plus a shift for i > 0) makes an mma.sync A register of two codes. fp16 puts the
  nibble under bits 6..9 instead (1 + Q/16; a 1/1024 step would cost precision in the cancellation below).
- sum_k x_k (1 + Q_k/SCALE) = X + x.Q / SCALE, so x . (Q - z) = SCALE * C - (SCALE + z) * X, with the
  block sums X from a second MMA chain with A = 1.0. Everything after the MMA is float32: float zero
  points stay exact.
- The dot's reduction index only has to agree between A and B, so each lane feeds the MMA the codes it
  loaded itself. The code tile is [BLOCK_N/2, 128] words: tile row i holds 8 consecutive K blocks
  (16 words each) of code row rows0[i], and the same of rows1[i] in a second tile. Its layout puts the
  32 lanes of a warp along the 128 words, so lane l = 4r + c holds words 4c..4c+3 of block kb + r: one
  warp load is 512 contiguous bytes of a row. For m16n8k16 that lane is A row r (rows0[i], block r),
  A row r + 8 (rows1[i], block r) and the k-slots of column group c; B column r is x's block kb + r,
  which lane group r loads itself. The MMA computes every (row slot, column) pair and the wanted ones
  are the diagonal C[r][r] (rows0) and C[r + 8][r] (rows1): C register t = r & 1 (+2 for rows1) of lane
  c = r >> 1. 7/8 of the tensor-core work is thrown away; the tensor pipe has room for it.

- The tile's row pairs are adjacent rows: (rows0[i], rows1[i]) = (2i, 2i + 1) of the column tile (so N
  must be even). The group tables are N-contiguous ([G, N_pad] base tables; the adapter slab is stored
  [S, G, N]), so a lane that holds a diagonal reads its two rows' zero points in one 8-byte load and
  their scales in one 4- or 8-byte load. Only those 8 lanes of 32 load tables; the others get zeros.
- Each step ends inside the same inline asm as its MMAs: the lane picks its two diagonal C values and
  X by its block's parity and adds s * (SCALE * C - (SCALE + z) * X) for rows0 and rows1 (8 float ops,
  where an elementwise epilogue over the whole [BLOCK_N/2, 128] tile cost 48).

The partial sums stay in the tile ([BLOCK_N/2, 128] float32: a lane's rows0 sum in its element t = 0,
rows1's in t = 2, zeros elsewhere) until one reduction at the end. The interpreter (CPU CI) computes the
same tile with plain tensor arithmetic (the block dots on the diagonal elements).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

from .device import ROW_INDEX_ARGS, quick_bench
from .pdl import launch_kwargs, prefetch_l2, wait_for_producer

BLOCK_K = tl.constexpr(128)  # codes per K block: 16 words of a row, one group at group size 128
WORDS = tl.constexpr(16)  # words of a row per K block
GROUP_SIZES = (-1, 128)  # a K block must lie in one group


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


# the 16 (word u, nibble pair i) positions a lane holds per row and step; MMA t takes 2t and 2t + 1
_POSITIONS = [(u, i) for u in range(4) for i in range(4)]


def _mma_chain_asm(f16: bool, ones: bool) -> str:
    """8 chained m16n8k16 MMAs over one lane's 4 words of two rows ($4..$7, $8..$11) and the x pairs
    P_i of those words ($12 + 4i + u); C (4 floats) out in $0..$3. ones: A = 1.0 (the sums X), no codes."""
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


def _step_asm(f16: bool) -> str:
    """One step of one lane (GPU): the code chain of _mma_chain_asm, then only the two diagonal elements
    the lane may hold, picked by its block's parity ($40): C[r][r] (rows0) and C[r + 8][r] (rows1).
    acc (out $0..$3, in $36..$39) keeps rows0 in element 0 and rows1 in element 2 (1 and 3 stay as
    they are, zero); X_g is the ones chain ($28..$31), the tables $32..$35 = (z0, z1, s0, s1), zero
    on lanes without a diagonal (so their acc stays zero):
      acc0 += s0 * (SCALE * C - (SCALE + z0) * X)."""
    scale = "0f41800000" if f16 else "0f43000000"  # 16.0 / 128.0
    neg = "0fC1800000" if f16 else "0fC3000000"
    chain = _mma_chain_asm(f16, False).splitlines()
    assert chain[-1].startswith("mov.b32 $0")
    body = chain[:-1]
    body[0] = body[0].replace(".reg .f32 c0, c1, c2, c3;", ".reg .f32 c0, c1, c2, c3, u0, u1, xx, t0, t1; .reg .pred p;")
    body += [
        "setp.ne.s32 p, $40, 0;",
        "selp.f32 u0, c1, c0, p; selp.f32 u1, c3, c2, p; selp.f32 xx, $29, $28, p;",
        f"sub.f32 t0, {neg}, $32; sub.f32 t1, {neg}, $33; mul.f32 t0, t0, xx; mul.f32 t1, t1, xx;",
        f"fma.rn.f32 u0, u0, {scale}, t0; fma.rn.f32 u1, u1, {scale}, t1;",
        "fma.rn.f32 $0, $34, u0, $36; fma.rn.f32 $2, $35, u1, $38; mov.f32 $1, $37; mov.f32 $3, $39; }",
    ]
    return "\n".join(body)


_STEP_BF16 = tl.constexpr(_step_asm(False))
_STEP_F16 = tl.constexpr(_step_asm(True))
# operands of a step: out acc 4 (early clobber: written before the last inputs are read), in words 8,
# x pairs 16, X 4, tables 4, acc 4, parity 4
_STEP_CONSTRAINTS = tl.constexpr("=&f,=&f,=&f,=&f" + ",r" * 24 + ",f" * 12 + ",r" * 4)

# the tables of one lane and step (GPU), out (z0, z1, s0, s1) as float32, zeros where the lane's $12 == 0.
# Operands: zero-point pointers $4..$7 (the pair of rows0, rows1: adjacent float32), scale pointers
# $8..$11 (rows0 in element 0, rows1 in element 2; both in one load where PAIR: adjacent and aligned).
def _tables_asm(s_type: str, pair: bool) -> str:
    out = ["{ .reg .pred p; .reg .b32 w; .reg .b16 h0, h1;", "setp.ne.s32 p, $12, 0;",
           "mov.f32 $0, 0f00000000; mov.f32 $1, 0f00000000; mov.f32 $2, 0f00000000; mov.f32 $3, 0f00000000;",
           "@p ld.global.nc.v2.f32 {$0, $1}, [$4];"]
    if s_type == "f32":
        out.append("@p ld.global.nc.v2.f32 {$2, $3}, [$8]; }" if pair else
                   "@p ld.global.nc.f32 $2, [$8]; @p ld.global.nc.f32 $3, [$10]; }")
        return "\n".join(out)
    if pair:
        out.append("mov.b32 w, 0; @p ld.global.nc.b32 w, [$8]; mov.b32 {h0, h1}, w;")
    else:
        out.append("mov.b16 h0, 0; mov.b16 h1, 0; @p ld.global.nc.b16 h0, [$8]; @p ld.global.nc.b16 h1, [$10];")
    out.append(f"cvt.f32.{s_type} $2, h0; cvt.f32.{s_type} $3, h1; }}")
    return "\n".join(out)


_TAB_CONSTRAINTS = tl.constexpr("=&f,=&f,=&f,=&f" + ",l" * 8 + ",r" * 4)
_TAB_F32 = tl.constexpr(_tables_asm("f32", False))
_TAB_F32_PAIR = tl.constexpr(_tables_asm("f32", True))
_TAB_F16 = tl.constexpr(_tables_asm("f16", False))
_TAB_F16_PAIR = tl.constexpr(_tables_asm("f16", True))
_TAB_BF16 = tl.constexpr(_tables_asm("bf16", False))
_TAB_BF16_PAIR = tl.constexpr(_tables_asm("bf16", True))


# The same for the SiLU-gated GEMV, whose rows1 = rows0 + N / 2: $12 is N / 2 where the lane reads (else 0),
# and the pointers are rows0's only ($4: zero point, $8: scale; both tables N-contiguous), so rows1's are
# computed here instead of held as a second [HN, 128] pointer tensor (which cost 38-70 registers).
def _apart_tables_asm(s_type: str) -> str:
    size = 4 if s_type == "f32" else 2
    out = ["{ .reg .pred p; .reg .b16 h0, h1; .reg .b64 a, o;", "setp.ne.s32 p, $12, 0;",
           "mov.f32 $0, 0f00000000; mov.f32 $1, 0f00000000; mov.f32 $2, 0f00000000; mov.f32 $3, 0f00000000;",
           "mul.wide.s32 o, $12, 4; add.s64 a, $4, o;",
           "@p ld.global.nc.f32 $0, [$4]; @p ld.global.nc.f32 $1, [a];",
           f"mul.wide.s32 o, $12, {size}; add.s64 a, $8, o;"]
    if s_type == "f32":
        out.append("@p ld.global.nc.f32 $2, [$8]; @p ld.global.nc.f32 $3, [a]; }")
    else:
        out.append("mov.b16 h0, 0; mov.b16 h1, 0; @p ld.global.nc.b16 h0, [$8]; @p ld.global.nc.b16 h1, [a];")
        out.append(f"cvt.f32.{s_type} $2, h0; cvt.f32.{s_type} $3, h1; }}")
    return "\n".join(out)


_TAB_F32_APART = tl.constexpr(_apart_tables_asm("f32"))
_TAB_F16_APART = tl.constexpr(_apart_tables_asm("f16"))
_TAB_BF16_APART = tl.constexpr(_apart_tables_asm("bf16"))


# x word (16 bytes at the pointer; zeros where ok == 0) as the pairs P_i = (x[i], x[i + 4])
_X_WORD_ASM = tl.constexpr(
    "{ .reg .pred p; .reg .b32 h0, h1, h2, h3;\n"
    "setp.ne.s32 p, $5, 0;\n"
    "mov.b32 h0, 0; mov.b32 h1, 0; mov.b32 h2, 0; mov.b32 h3, 0;\n"
    "@p ld.global.nc.v4.b32 {h0, h1, h2, h3}, [$4];\n"
    "prmt.b32 $0, h0, h2, 0x5410; prmt.b32 $1, h0, h2, 0x7632;\n"
    "prmt.b32 $2, h1, h3, 0x5410; prmt.b32 $3, h1, h3, 0x7632; }"
)
_ONES_BF16 = tl.constexpr(_mma_chain_asm(False, True))
_ONES_F16 = tl.constexpr(_mma_chain_asm(True, True))


@triton.jit
def _ones_sums(p0, p1, p2, p3, F16: tl.constexpr):
    """X of each block (GPU): the A = 1.0 chain over a lane's x pairs; C[*][col] = X of block kb + col."""
    if F16:
        ONES: tl.constexpr = _ONES_F16
    else:
        ONES: tl.constexpr = _ONES_BF16
    return tl.inline_asm_elementwise(ONES, "=r,=r,=r,=r" + ",r" * 16, [p0, p1, p2, p3], dtype=tl.float32,
                                     is_pure=True, pack=4)


@triton.jit
def _mma_step(acc, w0, w1, p0, p1, p2, p3, tt, odd, F16: tl.constexpr):
    """acc [HN, 128] += the step's diagonal block dots, scaled (GPU; _step_asm)."""
    if F16:
        STEP: tl.constexpr = _STEP_F16
    else:
        STEP: tl.constexpr = _STEP_BF16
    xg = _ones_sums(p0, p1, p2, p3, F16)
    return tl.inline_asm_elementwise(STEP, _STEP_CONSTRAINTS, [w0, w1, p0, p1, p2, p3, xg, tt, acc, odd],
                                     dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _lane_tables(zp, sp, ok, S_PAIR: tl.constexpr, SILU: tl.constexpr):
    """(z0, z1, s0, s1) of each lane's diagonal as the 4 elements of its pack (GPU), zeros where not ok.
    zp: the zero-point pair's pointer; sp: rows0's scale pointer at t < 2, rows1's at t >= 2. SILU: zp and sp
    are rows0's, and ok is N / 2 (the distance to rows1) where the lane reads."""
    DT: tl.constexpr = sp.dtype.element_ty
    if SILU:  # rows N / 2 apart: every table in two loads
        if DT == tl.float32:
            ASM: tl.constexpr = _TAB_F32_APART
        elif DT == tl.float16:
            ASM: tl.constexpr = _TAB_F16_APART
        else:
            ASM: tl.constexpr = _TAB_BF16_APART
    elif DT == tl.float32:
        if S_PAIR:
            ASM: tl.constexpr = _TAB_F32_PAIR
        else:
            ASM: tl.constexpr = _TAB_F32
    elif DT == tl.float16:
        if S_PAIR:
            ASM: tl.constexpr = _TAB_F16_PAIR
        else:
            ASM: tl.constexpr = _TAB_F16
    else:
        if S_PAIR:
            ASM: tl.constexpr = _TAB_BF16_PAIR
        else:
            ASM: tl.constexpr = _TAB_BF16
    sp = sp.to(zp.dtype)  # (the operands share a type; the asm reads what DT says)
    return tl.inline_asm_elementwise(ASM, _TAB_CONSTRAINTS, [zp, sp, ok.to(tl.int32)], dtype=tl.float32,
                                     is_pure=True, pack=4)


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


@triton.jit
def _plain_tables(kb, kb_hi, z0p, z1p, sp0, sp1, stride_zg, stride_sg, vblock, vreg, ONE_GROUP: tl.constexpr,
                  MODE: tl.constexpr):
    """Interpreter: zero points and scales [HN, 128] of each element's (row, group of block kb + r), rows0
    for registers t < 2, rows1 for t >= 2."""
    if ONE_GROUP:
        g = 0
    else:
        g = tl.minimum(kb + vblock, kb_hi - 1)
    zp = tl.where(vreg < 2, z0p, z1p) + g * stride_zg  # [HN, 128]
    if MODE == 1:
        sp = tl.where(vreg < 2, sp0, sp1) + g * stride_zg
    else:
        sp = tl.where(vreg < 2, sp0, sp1) + g * stride_sg
    return tl.load(zp).to(tl.float32), tl.load(sp).to(tl.float32)


@triton.jit
def _plain_step(acc, kb, w0, w1, zz, ss, x_ptr, K, kb_hi, vblock, vword, diag0, diag1):
    """Interpreter: acc [HN, 128] += s * x_b . (Q_b - z) on the diagonal elements for blocks b = kb + r,
    with plain arithmetic (the block dot of each (row, block), put on the tile's diagonal elements)."""
    blk = kb + vblock  # [1, 128]
    kx = blk * BLOCK_K + vword * 8  # [1, 128] first k of each word
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


@triton.jit
def _kmajor_x(kb, x_ptr, K, kb_hi, vblock, vword):
    """x words of step kb as the B pairs (GPU): 4 x [1, 128] int32."""
    kx = (kb + vblock) * BLOCK_K + vword * 8  # [1, 128] first k of each word
    ok = (kx < K) & (kb + vblock < kb_hi)
    return tl.inline_asm_elementwise(_X_WORD_ASM, "=r,=r,=r,=r,l,r", [x_ptr + kx, ok.to(tl.int32)],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _kmajor_codes(kb, kb_hi, q0, q1, vblock, CLAMP: tl.constexpr = False):
    """The code words of step kb (rows0, rows1): [HN, 128] int32 each, zeros past kb_hi. CLAMP: past kb_hi
    block kb_hi - 1's words instead (real ones, so the loads need no mask and no zero fill: ~16 instructions a
    step fewer at 32 rows); their x is zero, so they add nothing."""
    if CLAMP:
        kc = tl.minimum(kb + vblock, kb_hi - 1) - vblock
        w0 = tl.load(q0 + kc * WORDS, eviction_policy="evict_first")
        w1 = tl.load(q1 + kc * WORDS, eviction_policy="evict_first")
    else:
        ok = kb + vblock < kb_hi
        w0 = tl.load(q0 + kb * WORDS, mask=ok, other=0, eviction_policy="evict_first")
        w1 = tl.load(q1 + kb * WORDS, mask=ok, other=0, eviction_policy="evict_first")
    return w0, w1


@triton.jit
def _kmajor_side(kb, kb_hi, x_ptr, K, zpair, sp, stride_zg, stride_tg, vblock, vword, diag, FIRST: tl.constexpr,
                 ONE_GROUP: tl.constexpr, S_PAIR: tl.constexpr, SILU: tl.constexpr):
    """What step kb reads beside its codes (GPU): the lanes' tables (only the first time for one group: zeros
    otherwise) and the x pairs."""
    tt = _kmajor_tables(kb, kb_hi, zpair, sp, stride_zg, stride_tg, vblock, diag, FIRST, ONE_GROUP, S_PAIR, SILU)
    x0, x1, x2, x3 = _kmajor_x(kb, x_ptr, K, kb_hi, vblock, vword)
    return tt, x0, x1, x2, x3


@triton.jit
def _kmajor_tables(kb, kb_hi, zpair, sp, stride_zg, stride_tg, vblock, diag, FIRST: tl.constexpr,
                   ONE_GROUP: tl.constexpr, S_PAIR: tl.constexpr, SILU: tl.constexpr):
    """The lanes' tables of step kb (GPU; only the first time for one group: zeros otherwise)."""
    shape: tl.constexpr = [sp.shape[0], 8 * WORDS]
    if ONE_GROUP:
        if FIRST:
            tt = _lane_tables(zpair + 0 * vblock, sp, tl.broadcast_to(diag, shape), S_PAIR, SILU)
        else:
            tt = tl.zeros(shape, tl.float32)
    else:
        g = kb + vblock  # [1, 128]: the group of each lane's block (past kb_hi: masked, no clamp needed)
        if SILU:  # (diag is N / 2 or 0 there)
            ok = tl.where(g < kb_hi, diag, 0)
        else:
            ok = diag & (g < kb_hi)
        tt = _lane_tables(zpair + g * stride_zg, sp + g * stride_tg, tl.broadcast_to(ok, shape), S_PAIR, SILU)
    return tt


@triton.jit
def _kmajor_load(kb, kb_hi, q0, q1, x_ptr, K, zpair, sp, stride_zg, stride_tg, vblock, vword, diag, FIRST: tl.constexpr,
                 ONE_GROUP: tl.constexpr, S_PAIR: tl.constexpr, SILU: tl.constexpr, CLAMP: tl.constexpr = False):
    """Everything step kb reads (GPU): its code words (rows0, rows1), the lanes' tables and x pairs."""
    w0, w1 = _kmajor_codes(kb, kb_hi, q0, q1, vblock, CLAMP)
    tt, x0, x1, x2, x3 = _kmajor_side(kb, kb_hi, x_ptr, K, zpair, sp, stride_zg, stride_tg, vblock, vword, diag, FIRST,
                                      ONE_GROUP, S_PAIR, SILU)
    return w0, w1, tt, x0, x1, x2, x3


@triton.jit
def _step_lanes():
    """The [1, 128] geometry of an 8-block step: word v, its block (a division: the compiler sees 16 equal
    values in a row and keeps the masked code loads 16 bytes wide), its word within the block, the C
    register its element stands for (< 2: rows0), and the lanes whose C holds a diagonal (8 of 32):
    C[r][r] for rows0 (diag0), C[r + 8][r] for rows1 (diag1)."""
    v = tl.arange(0, 8 * WORDS)[None, :]
    vblock = v // WORDS
    vword = v % WORDS
    vreg = vword & 3
    diag = (vword >> 2) == (vblock >> 1)
    diag0 = diag & (vreg == (vblock & 1))
    diag1 = diag & (vreg == 2 + (vblock & 1))
    return v, vblock, vword, vreg, diag, diag0, diag1


@triton.jit
def _scale_table(s0_ptr, scale_ptr, scale_idx_ptr, stride_zg, stride_ss, stride_sn, stride_sg, MODE: tl.constexpr):
    """(base, row stride, group stride) of the scales a call reads: the base table (mode 1) or the row's
    slab slot (mode 2)."""
    if MODE == 1:
        base = s0_ptr
        row = 1
        group = stride_zg
    else:
        base = scale_ptr + tl.load(scale_idx_ptr).to(tl.int64) * stride_ss
        row = stride_sn
        group = stride_sg
    return base, row, group


@triton.jit
def _pair_scale_ptr(s_base, rows0, N, s_row, MODE: tl.constexpr):
    """[HN, 1]: the scale of each row pair's first row (mode 2: a real pair past N; N is even)."""
    if MODE == 1:
        return s_base + rows0[:, None]
    return s_base + tl.minimum(rows0, N - 2)[:, None] * s_row


@triton.jit(do_not_specialize=ROW_INDEX_ARGS)
def _mma_gemv_kernel(
    x_ptr, y_ptr, bias_ptr,  # x [K] (one row), y [N], bias [N]
    q_ptr, zero_ptr, s0_ptr,  # codes_t as int32 [N_pad, KW], zeros_t / scales_t [G, N_pad] f32
    chan_ptr, scale_ptr,  # slab tables [Sc, N], [Sg, N, G] (any float dtype, through strides)
    chan_idx_ptr, scale_idx_ptr,  # the row's slots (one element each)
    ws_ptr, cnt_ptr,  # split-K workspace [SPLIT_K, N] f32, arrival counters (two per column tile, zero)
    h_ptr, g_ptr, xg_ptr, eps,  # the RMSNorm epilogues: h [K] (NORM_IN), g [N] and xg [N] (NORM_OUT)
    sq_in_ptr, sq_out_ptr,  # h's sums of squares per 16 elements, [cdiv(K, 16)] (SQ_IN) / y's, [cdiv(N, 16)] (SQ_OUT)
    N, K,
    stride_qn, stride_zg, stride_cs, stride_ss, stride_sn, stride_sg,
    MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, FAST: tl.constexpr,
    F16: tl.constexpr, PDL: tl.constexpr, S_PAIR: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, DEPTH: tl.constexpr, X_AHEAD: tl.constexpr,
    STAGES: tl.constexpr, UNROLL: tl.constexpr, SILU: tl.constexpr,
    NORM_IN: tl.constexpr, ACCUM: tl.constexpr, NORM_OUT: tl.constexpr, NORM_CHUNK: tl.constexpr,
    SQ_IN: tl.constexpr, SQ_OUT: tl.constexpr,
):
    """y[n] for one column tile and one of SPLIT_K ranges of 8-block steps. The tile's row pairs (rows0[i],
    rows1[i]) = (2i, 2i + 1) are adjacent, so a lane reads both rows' zero points (and, where S_PAIR,
    scales) in one load. N is even. DEPTH: how many steps ahead the codes, x and tables are loaded into
    registers; STAGES > 1 instead streams the codes through Triton's pipeliner (cp.async into shared memory,
    STAGES - 1 steps ahead, no registers held for them), x and the tables one step ahead. UNROLL 2 (DEPTH 1):
    two steps an iteration, whose loads alternate between two sets of registers.
    SILU (a fused gate / up projection): the pairs are (j, N / 2 + j) instead, so each lane's diagonal holds a
    gate row and its up row, and the tile writes y[j] = silu(gate_j) * up_j, [N / 2]; the tables then take two
    loads each.
    The RMSNorms around a projection (launch_mma_gemv's docstring has the semantics): NORM_IN scales the sums by
    rsqrt(mean(h^2) + eps), which every program computes from h itself; ACCUM adds y into the residual stream
    y_ptr holds; NORM_OUT also writes xg = y * g. SQ_OUT: the sums of y^2 over every 16 rows as well, which a
    NORM_IN projection reading y as its h takes instead of h (SQ_IN): its loads go out with the first step's, and
    the sum waits until after the loop."""
    tl.static_assert(UNROLL == 1 or (UNROLL == 2 and DEPTH == 1 and STAGES == 1), "UNROLL 2 takes DEPTH 1, STAGES 1")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HN: tl.constexpr = BLOCK_N // 2
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0
    if SILU:
        cols = pid_n * HN + tl.arange(0, HN)  # the outputs j of the tile
        rows0 = tl.minimum(cols, N // 2 - 1)  # gate rows (past N / 2: the last real pair again, not stored)
        rows1 = rows0 + N // 2  # up rows
    else:
        rows0 = pid_n * BLOCK_N + 2 * tl.arange(0, HN)
        rows1 = rows0 + 1
    v, vblock, vword, vreg, diag, diag0, diag1 = _step_lanes()
    q0 = q_ptr + rows0[:, None] * stride_qn + v  # [HN, 128]: word v from block kb
    q1 = q_ptr + rows1[:, None] * stride_qn + v
    num_kb = tl.cdiv(K, BLOCK_K)
    kb_per_split = tl.cdiv(tl.cdiv(num_kb, 8), SPLIT_K) * 8  # whole 8-block steps per split
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)
    if PDL:  # this program's first 8 blocks into L2 (4 lines of each row)
        prefetch_l2(q0 + kb_lo * WORDS, ((v % 32) == 0) & (kb_lo < kb_hi))
        prefetch_l2(q1 + kb_lo * WORDS, ((v % 32) == 0) & (kb_lo < kb_hi))
    wait_for_producer(PDL)
    if NORM_IN:  # (the previous kernel wrote h: it is an L2 hit, and the first codes are on their way to L2)
        if SQ_IN:  # the producer's sums: loaded now, added up after the loop (the loop does not wait for them)
            sq = tl.load(sq_in_ptr + tl.arange(0, NORM_CHUNK), mask=tl.arange(0, NORM_CHUNK) < tl.cdiv(K, 16),
                         other=0.0)
        else:
            rstd = _rms_inverse(h_ptr, K, eps, NORM_CHUNK)
    cidx = tl.load(chan_idx_ptr).to(tl.int64)  # the adapter's channel slot (its round trip overlaps the loop's)
    z0p = zero_ptr + rows0[:, None]  # [HN, 1] (padded tables): the pair (rows0, rows1), adjacent unless SILU
    z1p = zero_ptr + rows1[:, None]
    s_base, s_row, stride_tg = _scale_table(s0_ptr, scale_ptr, scale_idx_ptr, stride_zg, stride_ss, stride_sn,
                                            stride_sg, MODE)
    if SILU:
        sp0 = s_base + rows0[:, None] * s_row
        sp1 = s_base + rows1[:, None] * s_row
    else:
        sp0 = _pair_scale_ptr(s_base, rows0, N, s_row, MODE)
        sp1 = sp0 + s_row
    acc = tl.zeros([HN, 8 * WORDS], dtype=tl.float32)
    if FAST:
        zp = z0p  # the pair's pointer (SILU: rows0's; the tables asm adds N / 2)
        if SILU:
            sp = sp0
            diag = tl.where(diag, N // 2, 0)  # the lanes that read tables, and how far rows1 lies
        else:
            sp = tl.where(vreg < 2, sp0, sp1)  # [HN, 128]
        odd = vblock & 1  # the C register of the lane's diagonal
    if FAST and STAGES > 1:
        tn = _kmajor_tables(kb_lo, kb_hi, zp, sp, stride_zg, stride_tg, vblock, diag, True, ONE_GROUP, S_PAIR, SILU)
        x0n, x1n, x2n, x3n = _kmajor_x(kb_lo, x_ptr, K, kb_hi, vblock, vword)
        for kb in tl.range(kb_lo, kb_hi, 8, num_stages=STAGES):
            w0, w1 = _kmajor_codes(kb, kb_hi, q0, q1, vblock)
            tt = tn
            p0 = x0n
            p1 = x1n
            p2 = x2n
            p3 = x3n
            tn1, x0n, x1n, x2n, x3n = _kmajor_side(kb + 8, kb_hi, x_ptr, K, zp, sp, stride_zg, stride_tg, vblock,
                                                   vword, diag, False, ONE_GROUP, S_PAIR, SILU)
            if not ONE_GROUP:
                tn = tn1
            acc = _mma_step(acc, w0, w1, p0, p1, p2, p3, tt, odd, F16)
    elif FAST and UNROLL == 2:
        # One step ahead as below, but two steps an iteration: step kb runs on set a while set b loads step
        # kb + 8, then the other way round. With one step an iteration the loaded set has to be copied into the
        # step's registers at the loop's end: ~45 moves a step, 9 % of its instructions (offline sm_90a, mode 2,
        # g128, 32 rows, 4 warps; bench/NOTES-kernels.md, session 13). Its code loads past the range read real
        # words (CLAMP) instead of zero-filled ones.
        w0a, w1a = _kmajor_codes(kb_lo, kb_hi, q0, q1, vblock, True)
        ta = _kmajor_tables(kb_lo, kb_hi, zp, sp, stride_zg, stride_tg, vblock, diag, True, ONE_GROUP, S_PAIR, SILU)
        x0a, x1a, x2a, x3a = _kmajor_x(kb_lo, x_ptr, K, kb_hi, vblock, vword)
        for kb in range(kb_lo, kb_hi, 16):
            w0b, w1b, tb, x0b, x1b, x2b, x3b = _kmajor_load(
                kb + 8, kb_hi, q0, q1, x_ptr, K, zp, sp, stride_zg, stride_tg, vblock, vword, diag, False, ONE_GROUP,
                S_PAIR, SILU, True)
            if ONE_GROUP:  # (loaded once)
                tb = ta
            if not X_AHEAD:
                x0a, x1a, x2a, x3a = _kmajor_x(kb, x_ptr, K, kb_hi, vblock, vword)
            acc = _mma_step(acc, w0a, w1a, x0a, x1a, x2a, x3a, ta, odd, F16)
            w0a, w1a, ta1, x0a, x1a, x2a, x3a = _kmajor_load(
                kb + 16, kb_hi, q0, q1, x_ptr, K, zp, sp, stride_zg, stride_tg, vblock, vword, diag, False, ONE_GROUP,
                S_PAIR, SILU, True)
            if not ONE_GROUP:
                ta = ta1
            if kb + 8 < kb_hi:  # (an odd number of steps: the last iteration's second step has no blocks)
                if not X_AHEAD:
                    x0b, x1b, x2b, x3b = _kmajor_x(kb + 8, x_ptr, K, kb_hi, vblock, vword)
                acc = _mma_step(acc, w0b, w1b, x0b, x1b, x2b, x3b, tb, odd, F16)
    elif FAST:  # codes, x and tables DEPTH steps ahead, in registers
        w0n, w1n = _kmajor_codes(kb_lo, kb_hi, q0, q1, vblock)
        tn = _kmajor_tables(kb_lo, kb_hi, zp, sp, stride_zg, stride_tg, vblock, diag, True, ONE_GROUP, S_PAIR, SILU)
        if DEPTH == 2:
            w0m, w1m = _kmajor_codes(kb_lo + 8, kb_hi, q0, q1, vblock)
            tm = _kmajor_tables(kb_lo + 8, kb_hi, zp, sp, stride_zg, stride_tg, vblock, diag, True, ONE_GROUP, S_PAIR,
                                SILU)
        x0n, x1n, x2n, x3n = _kmajor_x(kb_lo, x_ptr, K, kb_hi, vblock, vword)
        if DEPTH == 2:
            x0m, x1m, x2m, x3m = _kmajor_x(kb_lo + 8, x_ptr, K, kb_hi, vblock, vword)
        for kb in range(kb_lo, kb_hi, 8):
            w0 = w0n
            w1 = w1n
            tt = tn
            p0 = x0n
            p1 = x1n
            p2 = x2n
            p3 = x3n
            if DEPTH == 2:
                w0n = w0m
                w1n = w1m
                tn = tm
                x0n = x0m
                x1n = x1m
                x2n = x2m
                x3n = x3m
                w0m, w1m, tm, x0m, x1m, x2m, x3m = _kmajor_load(
                    kb + 16, kb_hi, q0, q1, x_ptr, K, zp, sp, stride_zg, stride_tg, vblock, vword, diag, False,
                    ONE_GROUP, S_PAIR, SILU)
                if ONE_GROUP:  # (loaded once)
                    tm = tn
            else:
                w0n, w1n, tn1, x0n, x1n, x2n, x3n = _kmajor_load(
                    kb + 8, kb_hi, q0, q1, x_ptr, K, zp, sp, stride_zg, stride_tg, vblock, vword, diag, False,
                    ONE_GROUP, S_PAIR, SILU)
                if not ONE_GROUP:
                    tn = tn1
            if not X_AHEAD:  # x at the step (an L1 hit after the first warp): fewer registers
                p0, p1, p2, p3 = _kmajor_x(kb, x_ptr, K, kb_hi, vblock, vword)
            acc = _mma_step(acc, w0, w1, p0, p1, p2, p3, tt, odd, F16)
    else:
        kb = kb_lo
        while kb < kb_hi:
            ok = kb + vblock < kb_hi
            w0 = tl.load(q0 + kb * WORDS, mask=ok, other=0)
            w1 = tl.load(q1 + kb * WORDS, mask=ok, other=0)
            zz, ss = _plain_tables(kb, kb_hi, z0p, z1p, sp0, sp1, stride_zg, stride_tg, vblock, vreg, ONE_GROUP, MODE)
            acc = _plain_step(acc, kb, w0, w1, zz, ss, x_ptr, K, kb_hi, vblock, vword, diag0, diag1)
            kb += 8
    y0 = tl.sum(tl.where(vreg < 2, acc, 0.0), 1)  # [HN]: rows0
    y1 = tl.sum(tl.where(vreg < 2, 0.0, acc), 1)
    if NORM_IN:
        if SQ_IN:
            rstd = 1.0 / tl.sqrt(tl.sum(sq, 0) / K + eps)
        y0 *= rstd
        y1 *= rstd
    if SILU:
        _finish_silu(y0, y1, cols, rows0, rows1, pid_n, pid_k, cidx, y_ptr, bias_ptr, chan_ptr, ws_ptr, cnt_ptr,
                     N, stride_cs, HAS_BIAS, SPLIT_K)
    else:
        _finish_pair(y0, y1, rows0, rows1, pid_n, pid_k, cidx, y_ptr, bias_ptr, chan_ptr, ws_ptr, cnt_ptr, g_ptr,
                     xg_ptr, sq_out_ptr, N, stride_cs, HAS_BIAS, SPLIT_K, ACCUM, NORM_OUT, SQ_OUT)


@triton.jit
def _rms_inverse(h_ptr, K, eps, CHUNK: tl.constexpr):
    """rsqrt(mean(h^2) + eps) of h [K], in float32; one load per CHUNK (>= K for the usual widths)."""
    kk = tl.arange(0, CHUNK)
    ss = tl.zeros([CHUNK], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        h = tl.load(h_ptr + k0 + kk, mask=k0 + kk < K, other=0.0).to(tl.float32)
        ss += h * h
        k0 += CHUNK
    return 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)


@triton.jit
def _finish_pair(y0, y1, rows0, rows1, pid_n, pid_k, cidx, y_ptr, bias_ptr, chan_ptr, ws_ptr, cnt_ptr, g_ptr, xg_ptr,
                 sq_ptr, N, stride_cs, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, ACCUM: tl.constexpr,
                 NORM_OUT: tl.constexpr, SQ_OUT: tl.constexpr):
    """y[rows] = y * chan[c_0, rows] (+ bias) for both halves of the tile (ACCUM: added to y[rows]; NORM_OUT:
    xg[rows] = that * g[rows]), by the split that finishes the tile.
    Every load of both halves comes before either half's store: a load cannot pass a store that may alias it, so
    half by half the tail was a chain of up to 8 dependent L2 round trips (session 18: 2.158 -> 2.141 ms a 7B
    decode step on the H100)."""
    ok0 = rows0 < N
    ok1 = rows1 < N
    y0, y1, last = _split_sums(y0, y1, rows0, rows1, ok0, ok1, pid_n, pid_k, ws_ptr, cnt_ptr, N, SPLIT_K)
    if last:
        out0, out1 = _store_pair(y0, y1, rows0, rows1, ok0, ok1, cidx, y_ptr, bias_ptr, chan_ptr, g_ptr, xg_ptr,
                                 stride_cs, HAS_BIAS, ACCUM, NORM_OUT)
        if SQ_OUT:
            _store_sumsq(out0, out1, ok0, ok1, pid_n, sq_ptr, N)


@triton.jit
def _store_sumsq(y0, y1, ok0, ok1, pid_n, sq_ptr, N):
    """sq[j] = sum of y[n]^2 over the 16 rows 16 j .. 16 j + 15 of the tile's stored (rounded) values: the tile's
    BLOCK_N / 16 entries, from pid_n * BLOCK_N / 16 (its row pairs in order: entry j holds pairs 8 j .. 8 j + 7)."""
    HN: tl.constexpr = y0.shape[0]
    a = tl.where(ok0, y0.to(tl.float32), 0.0)
    b = tl.where(ok1, y1.to(tl.float32), 0.0)
    sums = tl.sum(tl.reshape(a * a + b * b, [HN // 8, 8]), 1)
    j = pid_n * (HN // 8) + tl.arange(0, HN // 8)
    tl.store(sq_ptr + j, sums, mask=j < tl.cdiv(N, 16))


@triton.jit
def _split_sums(y0, y1, rows0, rows1, ok0, ok1, pid_n, pid_k, ws_ptr, cnt_ptr, N, SPLIT_K: tl.constexpr):
    """-> (the tile's sums over its SPLIT_K splits, whether this program holds them): each split writes its
    partials of both halves, and the last to arrive (one counter a tile, zeroed again for the next launch) sums
    them. With one split, the program's own sums."""
    last = True
    if SPLIT_K > 1:
        tl.store(ws_ptr + pid_k * N + rows0, y0, mask=ok0)
        tl.store(ws_ptr + pid_k * N + rows1, y1, mask=ok1)
        tl.debug_barrier()  # every thread's partials are written before the arrival is published
        last = tl.atomic_add(cnt_ptr + 2 * pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:
            y0 = tl.zeros_like(y0)
            y1 = tl.zeros_like(y1)
            for sk in tl.static_range(SPLIT_K):
                y0 += tl.load(ws_ptr + sk * N + rows0, mask=ok0, other=0.0, cache_modifier=".cg")
                y1 += tl.load(ws_ptr + sk * N + rows1, mask=ok1, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + 2 * pid_n, 0)
    return y0, y1, last


@triton.jit
def _pair_inputs(rows, ok, cidx, y_ptr, bias_ptr, chan_ptr, g_ptr, stride_cs, HAS_BIAS: tl.constexpr,
                 ACCUM: tl.constexpr, NORM_OUT: tl.constexpr):
    """What the epilogue reads for rows, float32: chan[c_0, rows], bias, the residual stream, the norm weight
    (zeros where a flag leaves one out)."""
    c = tl.load(chan_ptr + cidx * stride_cs + rows, mask=ok, other=0.0).to(tl.float32)
    b = tl.zeros_like(c)
    r = tl.zeros_like(c)
    g = tl.zeros_like(c)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    if ACCUM:  # (only this program reads or writes these elements)
        r = tl.load(y_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    if NORM_OUT:
        g = tl.load(g_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    return c, b, r, g


@triton.jit
def _store_pair(y0, y1, rows0, rows1, ok0, ok1, cidx, y_ptr, bias_ptr, chan_ptr, g_ptr, xg_ptr, stride_cs,
                HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr, NORM_OUT: tl.constexpr):
    DT: tl.constexpr = y_ptr.dtype.element_ty
    c0, b0, r0, g0 = _pair_inputs(rows0, ok0, cidx, y_ptr, bias_ptr, chan_ptr, g_ptr, stride_cs, HAS_BIAS, ACCUM,
                                  NORM_OUT)
    c1, b1, r1, g1 = _pair_inputs(rows1, ok1, cidx, y_ptr, bias_ptr, chan_ptr, g_ptr, stride_cs, HAS_BIAS, ACCUM,
                                  NORM_OUT)
    y0 = y0 * c0 + b0  # (times chan, plus bias, then the stream)
    y1 = y1 * c1 + b1
    if ACCUM:
        y0 += r0
        y1 += r1
    y0 = y0.to(DT)
    y1 = y1.to(DT)
    tl.store(y_ptr + rows0, y0, mask=ok0)
    tl.store(y_ptr + rows1, y1, mask=ok1)
    if NORM_OUT:
        tl.store(xg_ptr + rows0, (y0.to(tl.float32) * g0).to(DT), mask=ok0)
        tl.store(xg_ptr + rows1, (y1.to(tl.float32) * g1).to(DT), mask=ok1)
    return y0, y1


@triton.jit
def _finish_silu(gate, up, cols, rows0, rows1, pid_n, pid_k, cidx, y_ptr, bias_ptr, chan_ptr, ws_ptr, cnt_ptr,
                 N, stride_cs, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[cols] = silu(gate) * up, each of gate and up first adapted and rounded to y's dtype as the gate / up
    projection's output would be (so the result is kernels.fused.silu_mul's of the unfused projection), by the
    split that finishes the tile."""
    ok = cols < N // 2
    gate, up, last = _split_sums(gate, up, rows0, rows1, ok, ok, pid_n, pid_k, ws_ptr, cnt_ptr, N, SPLIT_K)
    if last:
        DT: tl.constexpr = y_ptr.dtype.element_ty
        c0, b0, _, _ = _pair_inputs(rows0, ok, cidx, y_ptr, bias_ptr, chan_ptr, bias_ptr, stride_cs, HAS_BIAS, False,
                                    False)
        c1, b1, _, _ = _pair_inputs(rows1, ok, cidx, y_ptr, bias_ptr, chan_ptr, bias_ptr, stride_cs, HAS_BIAS, False,
                                    False)
        g = (gate * c0 + b0).to(DT).to(tl.float32)
        u = (up * c1 + b1).to(DT).to(tl.float32)
        tl.store(y_ptr + cols, (g / (1.0 + tl.exp(-g)) * u).to(DT), mask=ok)


# BLOCK_N / 2 row pairs, one per warp per pass; DEPTH steps of loads in flight
def _cfg1(bn, sk, depth, warps=4, x_ahead=1, maxnreg=None, stages=1, unroll=1):
    return triton.Config({"BLOCK_N": bn, "SPLIT_K": sk, "DEPTH": depth, "X_AHEAD": x_ahead, "STAGES": stages,
                          "UNROLL": unroll}, num_warps=warps, num_stages=1, maxnreg=maxnreg)


# 32 rows twice: uncapped (mode 2: 166 registers, 3 programs per SM; qkv 13.0 µs on the H100, session 10)
# and capped at 168 for mode 1, which would take 180 (2 programs per SM) and then loses qkv (session 11:
# 13.0 µs capped against 14.2 for the best other config). The cap is not free for mode 2: under it ptxas
# spills 64 B where it fits 166 registers without (offline sm_90a), likely why session 11's autotune, with
# only the capped tile in the list, took a 16-row one for mode 2's qkv (15.3).
MMA_GEMV_CONFIGS = [
    _cfg1(16, 1, 1), _cfg1(16, 2, 1), _cfg1(32, 1, 1), _cfg1(32, 1, 1, maxnreg=168), _cfg1(32, 2, 1),
    _cfg1(64, 1, 1),
    _cfg1(16, 1, 2), _cfg1(16, 2, 2), _cfg1(16, 1, 2, warps=8), _cfg1(32, 1, 2, warps=8),
    _cfg1(16, 1, 1, warps=8), _cfg1(16, 4, 2),
]
INTERPRET_CONFIG = {"BLOCK_N": 16, "SPLIT_K": 1, "DEPTH": 1, "X_AHEAD": 1, "STAGES": 1, "UNROLL": 1}
# Candidates: forced configs only, which bench/kernels.py --mma-sweep times beside MMA_GEMV_CONFIGS; the
# autotuner does not see them.
MMA_CANDIDATE_CONFIGS = [
    # x loaded at its step: with one row pair per warp ptxas then needs 64-76 registers instead of 72-128
    # (session 11, qkv mode 1: 15.5-16.1 µs, slower than the list's best)
    _cfg1(16, 1, 2, warps=8, x_ahead=0), _cfg1(16, 1, 1, warps=8, x_ahead=0), _cfg1(8, 1, 2, x_ahead=0),
    _cfg1(32, 1, 2, warps=8, x_ahead=0),
    # codes through the pipeliner (cp.async, 8 KB a stage at 16 rows): bytes in flight that hold no registers.
    # Session 11 autotuned these four among the list on the 7B shapes (H100): none was picked.
    _cfg1(16, 1, 1, stages=4), _cfg1(32, 1, 1, stages=3), _cfg1(16, 1, 1, warps=8, stages=4),
    _cfg1(16, 2, 1, stages=4),
    # deeper rings (session 18): ncu has the register-fed configs latency bound, 0.26-0.40 instructions issued a
    # scheduler cycle at 26-57 % of DRAM, with ~48 KB of codes in flight an SM. At K = 4096 (4 steps a program)
    # STAGES >= 5 requests all of a program's codes at once. Offline sm_90a, mode 2: 16 rows STAGES 8 96 registers
    # and 56 KB of shared memory (4 programs an SM, ~220 KB in flight), 8 warps STAGES 6 65 / 40 KB, 32 rows STAGES
    # 6 130 / 80 KB. H100 (session 19, bench/results/mma-sweep-rings-s19-h100.json): slower than STAGES 3-4, which
    # are slower than the list's best on every 7B shape (qkv 21.6 / 15.3 / 13.3 µs, gate_up 33.5 / 27.0 / 22.5).
    _cfg1(16, 1, 1, stages=8), _cfg1(16, 1, 1, warps=8, stages=6), _cfg1(32, 1, 1, stages=6),
    # two steps an iteration (UNROLL 2): no copies of the prefetched set at the loop's end and no zero fill of
    # the code loads, but the two sets' live ranges cost registers. Offline sm_90a, mode 2, g128 (session 13),
    # SASS a step / registers: 16 rows 285 / 96 -> 253 / 132; 32 rows 498 / 166 -> 426 / 254, or 435 / 200
    # capped at 200. H200, M = 1, g128 mode 2 (session 14, bench/results/mma-sweep-s14-h200.json): slower than
    # the list's best on every 7B shape, by 0.3-3.6 µs (qkv 14.3 against 11.1, gate_up 24.4 against 20.8).
    _cfg1(16, 1, 1, unroll=2), _cfg1(16, 2, 1, unroll=2), _cfg1(16, 1, 1, warps=8, unroll=2),
    _cfg1(32, 1, 1, maxnreg=200, unroll=2),
]
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in MMA_GEMV_CONFIGS)
_KEY = ["N", "K", "MODE", "GROUP_SIZE", "HAS_BIAS", "F16", "S_PAIR", "SILU", "NORM_IN", "ACCUM", "NORM_OUT", "SQ_IN",
        "SQ_OUT"]


_tuned = triton.autotune(configs=MMA_GEMV_CONFIGS, key=_KEY, do_bench=quick_bench,
                         cache_results=True)(_mma_gemv_kernel)
# ACCUM reads y: the autotuner's timed launches would add into the residual stream again and again, so this one
# restores y after each (a copy the other launches need not pay while they are timed)
_tuned_accum = triton.autotune(configs=MMA_GEMV_CONFIGS, key=_KEY, do_bench=quick_bench, cache_results=True,
                               restore_value=["y_ptr"])(_mma_gemv_kernel)

# Configs pinned per shape, (N, K, mode, group size) -> a config of the list's form (BLOCK_N, SPLIT_K, DEPTH, ...,
# num_warps, maxnreg), taken for bf16 x instead of the autotuner's pick; a launch with the SiLU epilogue looks up
# (N, K, mode, group size, 1) instead (experiments set it:
# bench/decode_profile.py --mma-pins, bench/tune_decode.py). Session 16 pinned graph replay's per-shape picks
# (bench/kernels.py --timing-check, cold weights, one shape at a time) and the H100 decode step got slower (graph
# 2.277 -> 2.315 ms): the fastest config alone is not the fastest inside the step.
PINNED: dict[tuple[int, ...], dict] = {}
# Below PINNED, the device's own pins, where kernels/pins/<device name>.json exists: configs that bench/tune_decode.py
# picked by timing the whole batch-1 decode graph of a model with those shapes on that GPU. The autotuner times each
# kernel alone (its L2 flushed, nothing before it): inside the step it picked differently from run to run, and the
# H100 step moved by up to ~80 µs with the picks (bench/NOTES-kernels.md, session 21).
DEVICE_PINS_DIR = Path(__file__).resolve().parent / "pins"
USE_DEVICE_PINS = True  # False: the autotuner where PINNED has nothing (benches compare the two)


def config_pin(cfg: triton.Config) -> dict:
    """A config of the autotune list as a pin: its kwargs, num_warps, maxnreg where set."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {})}


# the autotune list as pins: what a pins file may hold (the configs the GPU tests cover) and what graph tuning tries
PIN_CONFIGS = [config_pin(c) for c in MMA_GEMV_CONFIGS]


def pins_file(directory: Path, device_name: str) -> Path:
    """<directory>/<the device name's alphanumerics joined by _>.json."""
    return Path(directory) / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def read_pins(path: Path) -> dict[tuple[int, ...], dict]:
    """A pins file's entries, {"pins": {"N,K,mode,group_size[,1]": config}} (",1": the SiLU epilogue's launches), each
    checked: ValueError names the file and the entry whose key is not that or whose config is not in the autotune
    list (the configs the GPU tests cover)."""
    try:
        raw = json.loads(Path(path).read_text())["pins"]
        items = list(raw.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a pins file ({e})") from e
    pins = {}
    for key, cfg in items:
        k = tuple(int(v) for v in key.split(",")) if re.fullmatch(r"\d+(,\d+){3}(,1)?", key) else None
        if k is None:
            raise ValueError(f"{path}: pin key {key!r} is not N,K,mode,group_size[,1]")
        if cfg not in PIN_CONFIGS:
            raise ValueError(f"{path}: pin {key} is not a config of the MMA GEMV's autotune list: {cfg}")
        pins[k] = cfg
    return pins


def write_pins(path: Path, pins: dict[tuple[int, ...], dict], **about) -> None:
    """read_pins' format (with `about` beside the pins), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**about, "pins": {",".join(map(str, k)): cfg for k, cfg in sorted(pins.items())}},
                              indent=1))
    tmp.replace(path)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def device_pins(name: str) -> dict[tuple[int, ...], dict]:
    """The pins of kernels/pins/<name>.json (name: torch.cuda.get_device_name), keyed as PINNED; {} if none."""
    path = pins_file(DEVICE_PINS_DIR, name)
    return read_pins(path) if path.is_file() else {}


def pin_key(N: int, K: int, mode: int, group_size: int, silu: bool) -> tuple[int, ...]:
    return (N, K, mode, group_size, 1) if silu else (N, K, mode, group_size)


# the pin keys launches have looked up (server/graph_tune.py tunes those the process has met)
LOOKED_UP: set[tuple[int, ...]] = set()


def current_pin(x: torch.Tensor, key: tuple[int, ...]) -> dict | None:
    """PINNED's config for key, else the device's (USE_DEVICE_PINS, CUDA x), else None (the autotuner's turn)."""
    if key in PINNED:
        return PINNED[key]
    if not (USE_DEVICE_PINS and x.is_cuda):
        return None
    return device_pins(_device_name(x.device.index)).get(key)


_CONFIG_KEYS = ("BLOCK_N", "SPLIT_K", "DEPTH", "X_AHEAD", "STAGES", "UNROLL", "num_warps", "maxnreg")


def pins_from_rows(rows: list[dict], time_key: str) -> dict[tuple[int, int, int, int], dict]:
    """The fastest MMA GEMV config by rows[time_key] per (N, K, mode, group_size), from bench/kernels.py JSON
    rows of forced MMA configs (--mma-sweep: "us", --timing-check: "graph_us")."""
    best: dict[tuple[int, int, int, int], dict] = {}
    for r in rows:
        if not r.get("MMA") or r.get(time_key) is None:
            continue
        key = (r["N"], r["K"], r["mode"], r["group_size"])
        if key not in best or r[time_key] < best[key][time_key]:
            best[key] = r
    return {k: {c: r[c] for c in _CONFIG_KEYS if r.get(c) is not None} for k, r in best.items()}


# Whether a NORM_IN launch given the producer's sums of squares (norm_in's sumsq) takes them; False: it reads h and
# sums its squares itself before the loop, as it did before the sums were passed (bench/decode_bounds.py's A/B).
NORM_SUMSQ = True
# Elements of h a program loads at once for NORM_IN (32 a thread at 4 warps; with SQ_IN, of the producer's sums).
# Without SQ_IN the sum of squares comes right after the PDL wait, and the loop waits for it: ~0.8 µs a consuming
# launch on the H100 (session 17). Summing once the first steps' loads are issued was slower in the decode step
# (session 18, bench/NOTES-kernels.md), as was issuing the adapter slots, first codes and tables before the wait.
NORM_MAX_CHUNK = 4096


def sumsq_parts(n: int) -> int:
    """Entries of a sums-of-squares vector over n elements (one per 16): norm_in's / norm_out's sumsq."""
    return -(-n // 16)


def _check_sumsq(sq: torch.Tensor | None, n: int, what: str) -> None:
    if sq is not None and (sq.shape != (sumsq_parts(n),) or sq.dtype != torch.float32 or not sq.is_contiguous()):
        raise ValueError(f"{what}'s sumsq must be a contiguous float32 [{sumsq_parts(n)}], got {list(sq.shape)} "
                         f"{sq.dtype}")


def _check_norm_args(x, y, N, silu, norm_in, accumulate, norm_out):
    K = x.shape[1]
    if silu and (accumulate or norm_out is not None):
        raise ValueError("a gate / up projection (silu) neither adds into a residual stream nor feeds a norm")
    if norm_in is not None:
        h, eps, sq = (*norm_in, None)[:3]
        if h.shape not in ((K,), (1, K)) or h.dtype != x.dtype or not h.is_contiguous():
            raise ValueError(f"norm_in's h must be a contiguous [1, {K}] {x.dtype}, got {list(h.shape)} {h.dtype}")
        if not eps >= 0:
            raise ValueError(f"norm_in's eps must be >= 0, got {eps}")
        _check_sumsq(sq, K, "norm_in")
        if sq is not None and sumsq_parts(K) > NORM_MAX_CHUNK:
            raise ValueError(f"norm_in's sumsq takes K <= {16 * NORM_MAX_CHUNK}, got {K}")
    if norm_out is not None:
        g, xg, sq = (*norm_out, None)[:3]
        if g.shape != (N,) or not g.is_contiguous():
            raise ValueError(f"norm_out's weight must be a contiguous [{N}], got {list(g.shape)}")
        if xg.shape not in ((N,), (1, N)) or xg.dtype != y.dtype or not xg.is_contiguous():
            raise ValueError(f"norm_out's xg must be a contiguous [1, {N}] {y.dtype}, got {list(xg.shape)} {xg.dtype}")
        if xg.data_ptr() == y.data_ptr():
            raise ValueError("norm_out's xg must not be y")
        _check_sumsq(sq, N, "norm_out")


def mma_gemv_supported(x: torch.Tensor, N: int, mode: int, group_size: int, has_zeros: bool) -> bool:
    """Whether the inputs fit this kernel (else the caller takes the CUDA-core GEMV / tensor-core paths).

    N even: a tile's rows come in adjacent pairs. On the GPU x is read as 16-byte words: K a multiple of
    8 and a 16-byte aligned row.
    """
    M, K = x.shape
    return (mma_gemv_fits(M, N, K, mode, group_size, has_zeros, x.dtype, x.device.type)
            and (x.device.type == "cpu" or (x.stride(1) == 1 and x.data_ptr() % 16 == 0)))


def mma_gemv_fits(M: int, N: int, K: int, mode: int, group_size: int, has_zeros: bool, dtype: torch.dtype,
                  device_type: str) -> bool:
    """mma_gemv_supported's rules that do not look at x's memory (its row must also be 16-byte aligned)."""
    if not (M == 1 and N % 2 == 0 and mode in (1, 2) and has_zeros and group_size in GROUP_SIZES):
        return False
    if device_type == "cpu":  # the interpreter computes in float32, from any float x
        return dtype in (torch.bfloat16, torch.float16, torch.float32)
    return dtype in (torch.bfloat16, torch.float16) and K % 8 == 0


def column_pairs_readable(table: torch.Tensor) -> bool:
    """Whether a slab table with N second to last ([S, N, G] scales and betas, [S, b, N, G] alphas) may be read as
    (n, n + 1) pairs at even n in one load: unit stride along N and every pair aligned to its size."""
    n_dim = table.dim() - 2
    return (table.stride(n_dim) == 1 and all(s % 2 == 0 for d, s in enumerate(table.stride()) if d != n_dim)
            and table.data_ptr() % (2 * table.element_size()) == 0)


def scale_pairs_readable(mode: int, scales: torch.Tensor | None) -> bool:
    """Whether a lane reads the scales of its two adjacent rows in one load: mode 1 (the base table,
    N contiguous, N_pad rows), or a mode-2 slab whose column pairs are readable."""
    return mode == 1 or column_pairs_readable(scales)


def launch_mma_gemv(x, y, w, chan, scales, chan_idx, scale_idx, mode, bias, config, ws, cnt, silu=False,
                    norm_in=None, accumulate=False, norm_out=None):
    """y [1, N] = the modes 1/2 semantics for x [1, K]; ws: float32 workspace of at least
    MAX_SPLIT_K * N elements (SPLIT_K * N with a config), cnt: zeroed int32 counters (two per column tile).
    config: BLOCK_N, SPLIT_K, optional DEPTH / num_warps (else autotuned; a fixed one in the interpreter).
    silu: a fused gate / up projection (gate rows first): y [1, N / 2] = silu(gate) * up instead.

    The RMSNorms around a projection, in its epilogue (y_lin: the float32 sums above, before chan and bias):
      norm_in = (h [1, K], eps): x is round(h * g) of an RMSNorm whose division is left here:
                y_lin *= rsqrt(mean(h^2) + eps)
      accumulate: y holds the residual stream, y = round(y + adapted y_lin) in place
      norm_out = (g [N], xg [1, N]): also xg = round(y * g), the next RMSNorm's input (with its division left
                to the projection that reads it).
    A third element sumsq, float32 [ceil(dim / 16)], passes h's sums of squares from one to the other: norm_out's
    gets sumsq[j] = sum of y[n]^2 over n in [16 j, 16 j + 16) (y as stored), and a norm_in that is given them
    takes mean(h^2) from them instead of reading h (norm_in's h must then be the y they were made from)."""
    K = x.shape[1]
    N = w.N
    if not mma_gemv_supported(x, N, mode, w.group_size, w.zeros_t is not None):
        raise ValueError("the MMA GEMV takes one row of x, an even N, modes 1/2 with group size -1 or 128, and "
                         "on CUDA 16-bit x with a 16-byte aligned row and K a multiple of 8")
    if y.shape != (1, N // 2 if silu else N) or y.stride(-1) != 1:
        raise ValueError(f"y must be [1, {N // 2 if silu else N}] with unit stride")
    _check_norm_args(x, y, N, silu, norm_in, accumulate, norm_out)
    if silu and scales is not None and scales.stride(1) != 1:  # the tables asm takes rows1 = rows0 + N / 2
        scales = scales.transpose(-1, -2).contiguous().transpose(-1, -2)
    q32 = w.codes_t.view(torch.int32)
    st = scales if scales is not None else w.zeros_t
    s_strides = (st.stride(0), st.stride(1), st.stride(2)) if scales is not None else (0, 0, 0)
    h, eps, sq_in = (*norm_in, None)[:3] if norm_in is not None else (x, 0.0, None)
    sq_in = sq_in if NORM_SUMSQ else None
    g, xg, sq_out = (*norm_out, None)[:3] if norm_out is not None else (x, x, None)
    args = (x, y, bias if bias is not None else x, q32, w.zeros_t, w.scales_t, chan, st, chan_idx, scale_idx, ws, cnt,
            h, g, xg, float(eps), sq_in if sq_in is not None else ws, sq_out if sq_out is not None else ws, N, K,
            q32.stride(0), w.zeros_t.stride(0), chan.stride(0), *s_strides)
    meta = dict(MODE=mode, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, FAST=x.device.type != "cpu",
                F16=x.dtype == torch.float16, S_PAIR=not silu and scale_pairs_readable(mode, scales), SILU=silu,
                NORM_IN=norm_in is not None, ACCUM=accumulate, NORM_OUT=norm_out is not None,
                NORM_CHUNK=(triton.next_power_of_2(sumsq_parts(K)) if sq_in is not None
                            else min(triton.next_power_of_2(K), NORM_MAX_CHUNK)),
                SQ_IN=sq_in is not None, SQ_OUT=sq_out is not None, **launch_kwargs(x))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is None and x.device.type == "cpu":
        config = INTERPRET_CONFIG
    if config is None and x.dtype == torch.bfloat16:
        key = pin_key(N, K, mode, w.group_size, silu)
        LOOKED_UP.add(key)
        config = current_pin(x, key)
    if config is None:
        (_tuned_accum if accumulate else _tuned)[grid](*args, **meta)
        return y
    # (num_stages 1 as in the autotune list: the loops pipeline by hand, and another value is another compile)
    cfg = {"DEPTH": 1, "X_AHEAD": 1, "STAGES": 1, "UNROLL": 1, "num_stages": 1,
           **{k: v for k, v in config.items() if k != "MMA"}}
    if ws.numel() < cfg["SPLIT_K"] * N:
        raise ValueError("workspace too small for SPLIT_K")
    _mma_gemv_kernel[grid](*args, **meta, **cfg)
    return y
