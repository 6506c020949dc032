"""Mode 3 of kernels.int4_matmul (AlphaTuning rows) on the tensor cores, for decode: the code words as the A operand of
`mma.sync`, one chain per bit plane. Two kernels, each the mode-2 kernel of its batch size with planes:
- the GEMV (one row of x), laid out and loaded exactly as kernels.int4_mma_gemv (read its docstring first: the
  [BLOCK_N/2, 128] word tile, the lanes' diagonal, the split-K finish);
- the batch kernel (1 <= M <= 16 rows), laid out as kernels.int4_mma_batch (B's 8 columns are batch rows, a second
  chain for rows 8..15); each element of a lane's C fragment is a (row, batch row) pair with its own adapter.

Semantics (kernels.reference.adapted_linear_ref is the oracle), per row i of x [M, K] (M = 1 for the GEMV, up to 16
for the batch kernel), codes Q [N, K] of BITS bits, group size -1 or 128, the row's slots (c, s, a) = (chan_idx[i],
scale_idx[i], alpha_idx[i]):

  alpha row (a >= 0): y[i, n] = sum_g [ sum_j alphas[a, j, n, g] * S_jg[n] + betas[a, n, g] * X_g ]   (+ bias[n])
  PEQA row  (a < 0):  y[i, n] = chan[c, n] * sum_g scales[s, n, g] * x_g . (Q[n, g] - z[n, g])         (+ bias[n])
  S_jg[n] = x_g . (2 bit_j(Q[n, g]) - 1),  X_g = sum_{k in g} x[i, k]

A PEQA row takes the same plane dots through kernels.quant.rtn_to_alphas' identity, s (Q - z) =
sum_j s 2^(j-1) (2 bit_j(Q) - 1) + s ((2^BITS - 1) / 2 - z): its tables are made from s and z as they load.

How: one MMA chain per bit plane over the same x pairs. A chain's A register holds bit j of two codes as the bf16
pair 1 + bit/SCALE_j: the word shifted by 4i as in the mode-2 GEMV (one shift serves every plane) and one LOP3
(`(s & bit j of both halves) | 1.0`), SCALE_j = 128 / 2^j (fp16: the nibble under mantissa bits 6..9, 16 / 2^j).
So C_j = X + x . bit_j / SCALE_j, and with K_j = 2 SCALE_j:

  S_j = 2 x . bit_j - X = K_j C_j - (K_j + 1) X,   a lane's row: acc += sum_j alpha_j S_j + beta X   (float32)

A step is BITS chains of 8 MMAs (+ the ones chain for X) and 32 LOP3s a chain, against the mode-2 GEMV's one chain:
the loads, the layout, the x pairs and the split-K finish are the mode-2 kernel's own helpers.
In the GEMV each diagonal lane reads its two rows' tables per group (alpha per plane, beta) with predicated loads in
the lanes' layout; the others get zeros, so their accumulators stay zero. In the batch kernel every element reads its
(row, batch row)'s tables, the alpha slot's or, for a PEQA batch row, those made from its scale and zero point.
The interpreter (CPU CI) computes the same tiles with plain tensor arithmetic.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from .device import ROW_INDEX_ARGS, quick_bench
from .int4_mma_gemv import (BLOCK_K, GROUP_SIZES, INTERPRET_CONFIG, MMA_GEMV_CONFIGS, WORDS, _kmajor_codes,
                            _kmajor_x, _ones_sums, _POSITIONS, _split_sums, _step_lanes, column_pairs_readable,
                            current_pin, pin_key)
from .int4_mma_batch import MAX_M as MMA_BATCH_MAX_M
from .int4_mma_batch import (MMA_BATCH_CONFIGS, S_TYPE, _batch_setup, _finish, _pair_tile, _scale_tile,
                             _scales_asm, _step_x, run_batch_kernel)
from .pdl import launch_kwargs, prefetch_l2, wait_for_producer

MODE_ALPHA = 3
# Where the slab's alpha and beta tables hold a lane's two adjacent rows in one 4- or 8-byte load (as AdapterSlab lays
# them out), read them so, one step ahead (PAIRS): offline sm_90a (bf16, 16 rows, 4 warps) 602 instructions a step
# against 622 and 18 loads against 28, same registers. Correct on the H100 (session 23's GPU tests). Timed once on the
# H100 (session 24, `bash bench/gpu_session.sh table_pairs_ab`, µs per 7B layer, M = 1, g128): 92.0 on against 98.3
# off, but shape by shape mixed (qkv 21.1 / 23.5, gate_up 35.5 / 43.9, o 11.0 / 9.6, down 24.4 / 21.3) and within
# the run-to-run spread of earlier sessions: off until a repeat says the same. The tables then load one element at a
# time, in the step.
TABLE_PAIRS = False
# The batch kernel with K_j folded into the plane operands (FOLD_PLANE_SCALES): plane j's LOP3 ORs its bit into
# K_j = 2 SCALE_j instead of 1.0, so its A value is K_j + 2 bit (K_j a power of two: exact) and its chain sums K_j C_j
# itself, exactly. The step's combine then spends two instructions a plane and element (u = C'_j - (K_j + 1) X,
# acc += alpha_j u) instead of three. Offline sm_90a (bf16, 4 bits, 4 warps, one block a step; session 23): loop 429
# -> 424 SASS with one chain, 643 -> 608 with two (M > 8), registers 238 -> 222 there. (The GEMV's step, 631 -> 639
# with it, keeps the product.) Off: slower on the H100 (session 24, `bash bench/gpu_session.sh fold_planes_ab`, µs per
# 7B layer, g128, on / off): M = 4 131.7 / 117.9, M = 16 with 16 adapters 224.3 / 217.2. Fewer instructions in the
# loop and yet slower (gate_up and down most): why was not looked into.
FOLD_PLANE_SCALES = False


def _f32(v: float) -> str:
    """A PTX float32 immediate."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", v))[0]


def _plane_shift(i: int, f16: bool) -> int:
    """Left shift (negative: right) that puts nibble i of both halves where the plane masks read it: bits 0..3 of
    each half (bf16) or 6..9 (fp16), as kernels.int4_mma_gemv._deq does."""
    return 6 - 4 * i if f16 else -4 * i


def plane_scale(j: int, f16: bool) -> float:
    """SCALE_j: plane j's A value is 1 + bit / SCALE_j."""
    return (16.0 if f16 else 128.0) / 2**j


def _half_pair(v: float, f16: bool) -> str:
    """The b32 immediate holding v (exact in the 16-bit type) in both halves."""
    h = struct.unpack("<H", struct.pack("<e", v))[0] if f16 else struct.unpack("<I", struct.pack("<f", v))[0] >> 16
    return "0x%04X%04X" % (h, h)


def _plane_chains_asm(f16: bool, bits: int, regs: str, fold: bool = False) -> list[str]:
    """The PTX of one lane's plane chains: c<j>_<e> (4 floats, zeroed here) = the m16n8k16 chain over the lane's
    words of rows0 ($4..$7) and rows1 ($8..$11) as plane j (with fold: K_j times that), B the x pairs $12..$27 (P_i of
    word u at $12 + 4i + u). The A rows and B columns are what kernels.int4_mma_gemv._mma_chain_asm makes of the same
    operands. regs: more registers for the caller's epilogue, declared in the same scope."""
    dt = "f16" if f16 else "bf16"
    base_mask = 0x00400040 if f16 else 0x00010001
    chains = [f"c{j}_{e}" for j in range(bits) for e in range(4)]
    out = ["{ .reg .b32 s0, s1, s2, s3, a0, a1, a2, a3; .reg .f32 " + ", ".join(chains) + ", " + regs + ";",
           " ".join(f"mov.f32 {c}, 0f00000000;" for c in chains)]
    for t in range(8):
        (u0, i0), (u1, i1) = _POSITIONS[2 * t], _POSITIONS[2 * t + 1]
        srcs = []
        for dst, word, i in (("s0", f"${4 + u0}", i0), ("s1", f"${8 + u0}", i0), ("s2", f"${4 + u1}", i1),
                             ("s3", f"${8 + u1}", i1)):
            shift = _plane_shift(i, f16)
            if shift == 0:
                srcs.append(word)
                continue
            op = f"shl.b32 {dst}, {word}, {shift};" if shift > 0 else f"shr.u32 {dst}, {word}, {-shift};"
            out.append(op)
            srcs.append(dst)
        b0, b1 = f"${12 + 4 * i0 + u0}", f"${12 + 4 * i1 + u1}"
        for j in range(bits):
            mask = "0x%08X" % (base_mask << j)
            # the value plane j's bit is ORed into: 1.0 (A = 1 + bit / SCALE_j), with fold K_j (A = K_j + 2 bit)
            one = _half_pair(2 * plane_scale(j, f16) if fold else 1.0, f16)
            out.append(" ".join(f"lop3.b32 a{k}, {srcs[k]}, {mask}, {one}, 0xEA;" for k in range(4)))
            c = ", ".join(f"c{j}_{e}" for e in range(4))
            out.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{dt}.{dt}.f32 {{{c}}}, {{a0, a1, a2, a3}}, "
                       f"{{{b0}, {b1}}}, {{{c}}};")
    return out


def _plane_step_asm(f16: bool, bits: int) -> str:
    """One step of one lane of the GEMV (GPU). Operands: acc out $0..$3; words $4..$11 and x pairs $12..$27 (as in
    _plane_chains_asm); X $28..$31; tables ta $32..$35 = (alpha_0 r0, alpha_0 r1, alpha_1 r0, alpha_1 r1), tb
    $36..$39 the same of planes 2 and 3, tc $40..$43 = (beta r0, beta r1, -, -); acc in $44..$47; the block's parity
    $48..$51. acc keeps rows0 in element 0 and rows1 in element 2 (1 and 3 stay as they are)."""
    out = _plane_chains_asm(f16, bits, "u, v, xx, nx, r0, r1; .reg .pred p")
    # the lane's diagonal (by its block's parity) and its rows' sums
    out += ["setp.ne.s32 p, $48, 0;", "selp.f32 xx, $29, $28, p;", "mov.f32 r0, $44; mov.f32 r1, $46;"]
    for j in range(bits):
        k = 2 * plane_scale(j, f16)
        a_r0, a_r1 = (f"${32 + 2 * j}", f"${33 + 2 * j}")  # ta then tb: plane j's pair at 32 + 2j
        out += [f"selp.f32 u, c{j}_1, c{j}_0, p; selp.f32 v, c{j}_3, c{j}_2, p;",
                f"mul.f32 nx, xx, {_f32(-(k + 1))};",
                f"fma.rn.f32 u, u, {_f32(k)}, nx; fma.rn.f32 v, v, {_f32(k)}, nx;",
                f"fma.rn.f32 r0, {a_r0}, u, r0; fma.rn.f32 r1, {a_r1}, v, r1;"]
    out.append("fma.rn.f32 $0, $40, xx, r0; fma.rn.f32 $2, $41, xx, r1; mov.f32 $1, $45; mov.f32 $3, $47; }")
    return "\n".join(out)


def _batch_step_asm(f16: bool, bits: int, fold: bool = False) -> str:
    """One block of one lane of the batch kernel (GPU): element t of a lane is (row rows0 / rows1 by t >> 1, batch
    column t & 1), C register t of every chain. Operands: acc out $0..$3; words and x pairs as in _plane_chains_asm;
    X_t $28..$31; alpha of plane j, element t at $32 + 4j + t (four planes passed, `bits` read); beta_t $48..$51;
    acc in $52..$55:  acc_t += sum_j alpha_jt (K_j C_jt - (K_j + 1) X_t) + beta_t X_t. fold: the chains of
    _plane_chains_asm's fold, which sum K_j C_jt."""
    out = _plane_chains_asm(f16, bits, "u, nx, r", fold)
    for t in range(4):
        out.append(f"mov.f32 r, ${52 + t};")
        for j in range(bits):
            k = 2 * plane_scale(j, f16)
            if fold:
                out.append(f"fma.rn.f32 u, ${28 + t}, {_f32(-(k + 1))}, c{j}_{t};")
            else:
                out.append(f"mul.f32 nx, ${28 + t}, {_f32(-(k + 1))}; fma.rn.f32 u, c{j}_{t}, {_f32(k)}, nx;")
            out.append(f"fma.rn.f32 r, ${32 + 4 * j + t}, u, r;")
        out.append(f"fma.rn.f32 ${t}, ${48 + t}, ${28 + t}, r;")
    out.append("}")
    return "\n".join(out)


step_asm = functools.cache(_plane_step_asm)  # (launchers ask for one on every launch)
batch_step_asm = functools.cache(_batch_step_asm)
# out acc 4 (early clobber), in words 8, x pairs 16, X 4, alphas 16, betas 4, acc 4
_BSTEP_CONSTRAINTS = tl.constexpr("=&f,=&f,=&f,=&f" + ",r" * 24 + ",f" * 28)
# out acc 4 (early clobber), in words 8, x pairs 16, X 4, tables 12, acc 4, parity 4
_STEP_CONSTRAINTS = tl.constexpr("=&f,=&f,=&f,=&f" + ",r" * 24 + ",f" * 20 + ",r" * 4)


@triton.jit
def _plane_step(acc, w0, w1, p0, p1, p2, p3, ta, tb, tc, odd, F16: tl.constexpr, STEP_ASM: tl.constexpr):
    """acc [HN, 128] += the step's diagonal plane dots, weighted by the lanes' tables (GPU; STEP_ASM: the launcher's
    step_asm for x's dtype and the bits)."""
    xg = _ones_sums(p0, p1, p2, p3, F16)
    return tl.inline_asm_elementwise(STEP_ASM, _STEP_CONSTRAINTS, [w0, w1, p0, p1, p2, p3, xg, ta, tb, tc, acc, odd],
                                     dtype=tl.float32, is_pure=True, pack=4)


def _pairs_asm(s_type: str, planes: int) -> str:
    """One lane's (plane p of rows0, of rows1, plane p + 1 of rows0, of rows1) as float32 (GPU), zeros where $12 == 0:
    each plane's two rows are adjacent entries (one 4- or 8-byte load) at the pointer $4, plane p + 1 at $4 + $8
    bytes; `planes` (1 or 2) of them exist."""
    out = ["{ .reg .pred p; .reg .b32 w; .reg .b16 h0, h1; .reg .b64 a;", "setp.ne.s32 p, $12, 0;",
           "mov.f32 $0, 0f00000000; mov.f32 $1, 0f00000000; mov.f32 $2, 0f00000000; mov.f32 $3, 0f00000000;"]
    for k in range(planes):
        src = "$4" if k == 0 else "a"
        if k == 1:
            out.append("add.s64 a, $4, $8;")
        if s_type == "f32":
            out.append(f"@p ld.global.nc.v2.f32 {{${2 * k}, ${2 * k + 1}}}, [{src}];")
        else:
            out.append(f"mov.b32 w, 0; @p ld.global.nc.b32 w, [{src}]; mov.b32 {{h0, h1}}, w; "
                       f"cvt.f32.{s_type} ${2 * k}, h0; cvt.f32.{s_type} ${2 * k + 1}, h1;")
    out.append("}")
    return "\n".join(out)


_PAIRS_F32_1, _PAIRS_F32_2 = tl.constexpr(_pairs_asm("f32", 1)), tl.constexpr(_pairs_asm("f32", 2))
_PAIRS_F16_1, _PAIRS_F16_2 = tl.constexpr(_pairs_asm("f16", 1)), tl.constexpr(_pairs_asm("f16", 2))
_PAIRS_BF16_1, _PAIRS_BF16_2 = tl.constexpr(_pairs_asm("bf16", 1)), tl.constexpr(_pairs_asm("bf16", 2))


@triton.jit
def _pairs(ptrs, step_bytes, ok, vreg, PLANES: tl.constexpr):
    """[HN, 128] packs of _pairs_asm (GPU): ptrs the lanes' (plane p, rows0) entries, step_bytes [HN, 128] int64 the
    distance to plane p + 1. vreg ([1, 128], the element's register) is an operand the asm ignores: every other one
    is constant along a lane's 4 elements, and Triton computes a pure elementwise op once per run of equal operands
    (kernels.int4_mma_batch._pair_tile), which would hand the lane's 4 different results one value."""
    DT: tl.constexpr = ptrs.dtype.element_ty
    if DT == tl.float32:
        if PLANES == 1:
            ASM: tl.constexpr = _PAIRS_F32_1
        else:
            ASM: tl.constexpr = _PAIRS_F32_2
    elif DT == tl.float16:
        if PLANES == 1:
            ASM: tl.constexpr = _PAIRS_F16_1
        else:
            ASM: tl.constexpr = _PAIRS_F16_2
    else:
        if PLANES == 1:
            ASM: tl.constexpr = _PAIRS_BF16_1
        else:
            ASM: tl.constexpr = _PAIRS_BF16_2
    lanes = tl.broadcast_to(vreg, ptrs.shape)
    return tl.inline_asm_elementwise(ASM, "=&f,=&f,=&f,=&f" + ",l" * 8 + ",r" * 8,
                                     [ptrs, step_bytes, ok.to(tl.int32), lanes], dtype=tl.float32, is_pure=True,
                                     pack=4)


@triton.jit
def _pair_tables(g, ok, a_pair, b_pair, step_bytes, stride_aj, stride_ag, stride_bg, vreg, BITS: tl.constexpr):
    """(ta, tb, tc) of _lane_tables for an alpha row whose tables hold adjacent rows in one load (GPU): a_pair /
    b_pair point at each lane's rows0 entry of plane 0 / beta in group 0."""
    a = a_pair + g * stride_ag
    ta = _pairs(a, step_bytes, ok, vreg, 2)
    if BITS == 4:
        tb = _pairs(a + 2 * stride_aj, step_bytes, ok, vreg, 2)
    elif BITS == 3:
        tb = _pairs(a + 2 * stride_aj, step_bytes, ok, vreg, 1)
    else:
        tb = tl.zeros(ok.shape, tl.float32)
    tc = _pairs(b_pair + g * stride_bg, step_bytes, ok, vreg, 1)
    return ta, tb, tc


@triton.jit
def _load_if(ptrs, ok, FAST: tl.constexpr = True):
    """float32 of an fp32 / fp16 / bf16 pointer tensor where ok, else 0.0: on the GPU a predicated load in the
    pointers' layout (a plain masked load may take a coalesced layout and cost a conversion), in the interpreter a
    masked load."""
    DT: tl.constexpr = ptrs.dtype.element_ty
    if not FAST:
        v = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    elif DT == tl.float32:
        v = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; mov.b32 $0, 0; @p ld.global.nc.b32 $0, [$1]; }",
            "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
    else:
        v = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; mov.b16 $0, 0; @p ld.global.nc.b16 $0, [$1]; }",
            "=h,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int16, is_pure=True, pack=1).to(DT, bitcast=True)
        v = v.to(tl.float32)
    return v


@triton.jit
def _lane_tables(g, ok, row, plane, a_rows, b_rows, s_rows, zero_ptr, stride_aj, stride_ag, stride_bg, stride_sg,
                 stride_zg, PEQA: tl.constexpr, BITS: tl.constexpr):
    """(ta, tb, tc) [HN, 128] (GPU): each element's plane (plane, plane + 2) alpha and beta of its row and group g,
    zeros where not ok. Alpha row: a_rows / b_rows point at the row's plane-0 alpha and its beta in group 0. PEQA row
    (rtn_to_alphas): alpha_j = s 2^(j-1), beta = s ((2^BITS - 1) / 2 - z), from s_rows (the row's scale in group 0)
    and the base zero points."""
    ok_b = ok & (plane + 2 < BITS)
    if PEQA:
        s = _load_if(s_rows + g * stride_sg, ok)
        ta = s * tl.where(plane == 0, 0.5, 1.0)
        tb = tl.where(ok_b, s * tl.where(plane == 0, 2.0, 4.0), 0.0)
        z = _load_if(zero_ptr + g * stride_zg + row, ok & (plane == 0))
        tc = tl.where(plane == 0, s * ((2**BITS - 1) / 2 - z), 0.0)
    else:
        ta = _load_if(a_rows + plane * stride_aj + g * stride_ag, ok)
        tb = _load_if(a_rows + (plane + 2) * stride_aj + g * stride_ag, ok_b)
        tc = _load_if(b_rows + g * stride_bg, ok & (plane == 0))
    return ta, tb, tc


@triton.jit
def _plain_plane_step(acc, kb, kb_hi, w0, w1, x_ptr, K, a_rows0, a_rows1, b_rows0, b_rows1, s_rows0, s_rows1,
                      zero_ptr, rows0, rows1, stride_aj, stride_ag, stride_bg, stride_sg, stride_zg, vblock, vword,
                      diag0, diag1, PEQA: tl.constexpr, BITS: tl.constexpr, ONE_GROUP: tl.constexpr):
    """Interpreter: acc [HN, 128] += sum_j alpha_j S_j + beta X of each (row, block b = kb + r) on the diagonal
    elements, in plain float32 arithmetic."""
    blk = kb + vblock  # [1, 128]
    kx = blk * BLOCK_K + vword * 8
    HN: tl.constexpr = w0.shape[0]
    nib = tl.arange(0, 8)[None, None, :] * 4
    k3 = kx[:, :, None] + tl.arange(0, 8)[None, None, :]  # [1, 128, 8]
    xv = tl.load(x_ptr + k3, mask=(k3 < K) & (blk < kb_hi)[:, :, None], other=0.0).to(tl.float32)
    xv = tl.reshape(xv, [1, 8, BLOCK_K])
    xs = tl.sum(xv, 2)  # [1, 8] = X of each block
    # each block's group (its tables are read per element: rows0's on diag0, rows1's on diag1)
    blk8 = (kb + tl.arange(0, 8))[None, :]  # [1, 8]
    if ONE_GROUP:
        g = blk8 * 0
    else:
        g = blk8
    ok = blk8 < kb_hi
    y0 = tl.zeros([HN, 8], tl.float32)  # each (row, block)'s sum over the planes, then + beta X
    y1 = tl.zeros([HN, 8], tl.float32)
    for j in tl.static_range(BITS):
        b0 = tl.reshape(((w0[:, :, None] >> (nib + j)) & 1).to(tl.float32), [HN, 8, BLOCK_K])
        b1 = tl.reshape(((w1[:, :, None] >> (nib + j)) & 1).to(tl.float32), [HN, 8, BLOCK_K])
        s0 = 2.0 * tl.sum(b0 * xv, 2) - xs  # [HN, 8] = S_j of rows0 per block
        s1 = 2.0 * tl.sum(b1 * xv, 2) - xs
        if PEQA:
            a0 = tl.load(s_rows0 + g * stride_sg, mask=ok, other=0.0).to(tl.float32) * 2.0 ** (j - 1)
            a1 = tl.load(s_rows1 + g * stride_sg, mask=ok, other=0.0).to(tl.float32) * 2.0 ** (j - 1)
        else:
            a0 = tl.load(a_rows0 + j * stride_aj + g * stride_ag, mask=ok, other=0.0).to(tl.float32)
            a1 = tl.load(a_rows1 + j * stride_aj + g * stride_ag, mask=ok, other=0.0).to(tl.float32)
        y0 += a0 * s0
        y1 += a1 * s1
    if PEQA:
        c = (2**BITS - 1) / 2
        s0 = tl.load(s_rows0 + g * stride_sg, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(s_rows1 + g * stride_sg, mask=ok, other=0.0).to(tl.float32)
        be0 = s0 * (c - tl.load(zero_ptr + g * stride_zg + rows0[:, None], mask=ok, other=0.0))
        be1 = s1 * (c - tl.load(zero_ptr + g * stride_zg + rows1[:, None], mask=ok, other=0.0))
    else:
        be0 = tl.load(b_rows0 + g * stride_bg, mask=ok, other=0.0).to(tl.float32)
        be1 = tl.load(b_rows1 + g * stride_bg, mask=ok, other=0.0).to(tl.float32)
    y0 += be0 * xs
    y1 += be1 * xs
    # onto the tile: column v belongs to block v >> 4 (a [8] -> [128] broadcast via a size-16 axis)
    y0 = tl.reshape(tl.broadcast_to(y0[:, :, None], [HN, 8, WORDS]), [HN, 8 * WORDS])
    y1 = tl.reshape(tl.broadcast_to(y1[:, :, None], [HN, 8, WORDS]), [HN, 8 * WORDS])
    return acc + tl.where(diag0, y0, tl.where(diag1, y1, 0.0))


@triton.jit
def _step_tables(kb, kb_hi, vblock, diag, row, vreg, a_rows, b_rows, s_rows, a_pair, b_pair, step_bytes, zero_ptr,
                 stride_aj, stride_ag, stride_bg, stride_sg, stride_zg, PEQA: tl.constexpr, PAIRS: tl.constexpr,
                 BITS: tl.constexpr, ONE_GROUP: tl.constexpr):
    """The lanes' tables (ta, tb, tc) of step kb (GPU): pair loads where PAIRS, else one load an element (element t
    of a lane's pack: plane t >> 1, and t >> 1 + 2, row t & 1)."""
    plane = vreg >> 1
    if ONE_GROUP:
        g = vblock * 0
    else:
        g = kb + vblock
    ok = tl.broadcast_to(diag & (kb + vblock < kb_hi), row.shape)
    if PAIRS:
        ta, tb, tc = _pair_tables(g, ok, a_pair, b_pair, step_bytes, stride_aj, stride_ag, stride_bg, vreg, BITS)
    else:
        ta, tb, tc = _lane_tables(g, ok, row, plane, a_rows, b_rows, s_rows, zero_ptr, stride_aj, stride_ag, stride_bg,
                                  stride_sg, stride_zg, PEQA, BITS)
    return ta, tb, tc


@triton.jit
def _plane_loop(acc, kb_lo, kb_hi, q0, q1, x_ptr, K, rows0, rows1, a_base, b_base, s_base, zero_ptr,
                stride_aj, stride_an, stride_ag, stride_bn, stride_bg, stride_sn, stride_sg, stride_zg,
                PEQA: tl.constexpr, PAIRS: tl.constexpr, BITS: tl.constexpr, ONE_GROUP: tl.constexpr,
                F16: tl.constexpr, FAST: tl.constexpr, DEPTH: tl.constexpr, STEP_ASM: tl.constexpr):
    """acc over the steps [kb_lo, kb_hi) of one row kind (PEQA: tables from the scales and zero points). The codes
    and x are loaded DEPTH steps ahead, the lanes' tables one step ahead where PAIRS, else in their step."""
    v, vblock, vword, vreg, diag, diag0, diag1 = _step_lanes()
    if FAST:
        # element t of a lane's pack: row t & 1 (rows0 / rows1; _step_tables has the planes)
        row = tl.where((vreg & 1) == 0, rows0[:, None], rows1[:, None])  # [HN, 128]
        a_rows = a_base + row * stride_an
        b_rows = b_base + row * stride_bn
        s_rows = s_base + row * stride_sn
        a_pair = a_base + rows0[:, None] * stride_an + 0 * v  # [HN, 128]: the pair's first entry, plane 0
        b_pair = b_base + rows0[:, None] * stride_bn + 0 * v
        step_bytes = tl.zeros(row.shape, tl.int64) + stride_aj * (a_base.dtype.element_ty.primitive_bitwidth // 8)
        odd = vblock & 1
        if PAIRS:
            tn_a, tn_b, tn_c = _step_tables(kb_lo, kb_hi, vblock, diag, row, vreg, a_rows, b_rows, s_rows, a_pair,
                                            b_pair, step_bytes, zero_ptr, stride_aj, stride_ag, stride_bg, stride_sg,
                                            stride_zg, PEQA, PAIRS, BITS, ONE_GROUP)
        w0n, w1n = _kmajor_codes(kb_lo, kb_hi, q0, q1, vblock)
        x0n, x1n, x2n, x3n = _kmajor_x(kb_lo, x_ptr, K, kb_hi, vblock, vword)
        if DEPTH == 2:
            w0m, w1m = _kmajor_codes(kb_lo + 8, kb_hi, q0, q1, vblock)
            x0m, x1m, x2m, x3m = _kmajor_x(kb_lo + 8, x_ptr, K, kb_hi, vblock, vword)
        for kb in range(kb_lo, kb_hi, 8):
            w0 = w0n
            w1 = w1n
            p0 = x0n
            p1 = x1n
            p2 = x2n
            p3 = x3n
            if DEPTH == 2:
                w0n = w0m
                w1n = w1m
                x0n = x0m
                x1n = x1m
                x2n = x2m
                x3n = x3m
                w0m, w1m = _kmajor_codes(kb + 16, kb_hi, q0, q1, vblock)
                x0m, x1m, x2m, x3m = _kmajor_x(kb + 16, x_ptr, K, kb_hi, vblock, vword)
            else:
                w0n, w1n = _kmajor_codes(kb + 8, kb_hi, q0, q1, vblock)
                x0n, x1n, x2n, x3n = _kmajor_x(kb + 8, x_ptr, K, kb_hi, vblock, vword)
            if PAIRS:  # pair tables one step ahead; per-element ones in their step (ahead, they cost ~70 registers)
                ta = tn_a
                tb = tn_b
                tc = tn_c
                tn_a, tn_b, tn_c = _step_tables(kb + 8, kb_hi, vblock, diag, row, vreg, a_rows, b_rows, s_rows,
                                                a_pair, b_pair, step_bytes, zero_ptr, stride_aj, stride_ag, stride_bg,
                                                stride_sg, stride_zg, PEQA, PAIRS, BITS, ONE_GROUP)
            else:
                ta, tb, tc = _step_tables(kb, kb_hi, vblock, diag, row, vreg, a_rows, b_rows, s_rows, a_pair, b_pair,
                                          step_bytes, zero_ptr, stride_aj, stride_ag, stride_bg, stride_sg, stride_zg,
                                          PEQA, PAIRS, BITS, ONE_GROUP)
            acc = _plane_step(acc, w0, w1, p0, p1, p2, p3, ta, tb, tc, odd, F16, STEP_ASM)
    else:
        a_rows0 = a_base + rows0[:, None] * stride_an
        a_rows1 = a_base + rows1[:, None] * stride_an
        b_rows0 = b_base + rows0[:, None] * stride_bn
        b_rows1 = b_base + rows1[:, None] * stride_bn
        s_rows0 = s_base + rows0[:, None] * stride_sn
        s_rows1 = s_base + rows1[:, None] * stride_sn
        kb = kb_lo
        while kb < kb_hi:
            ok = kb + vblock < kb_hi
            w0 = tl.load(q0 + kb * WORDS, mask=ok, other=0)
            w1 = tl.load(q1 + kb * WORDS, mask=ok, other=0)
            acc = _plain_plane_step(acc, kb, kb_hi, w0, w1, x_ptr, K, a_rows0, a_rows1, b_rows0, b_rows1, s_rows0,
                                    s_rows1, zero_ptr, rows0, rows1, stride_aj, stride_ag, stride_bg, stride_sg,
                                    stride_zg, vblock, vword, diag0, diag1, PEQA, BITS, ONE_GROUP)
            kb += 8
    return acc


@triton.jit(do_not_specialize=[*ROW_INDEX_ARGS, "alpha_idx_ptr"])
def _mma_alpha_kernel(
    x_ptr, y_ptr, bias_ptr,  # x [K] (one row), y [N], bias [N]
    q_ptr, zero_ptr,  # codes_t as int32 [N_pad, KW], zeros_t [G, N_pad] f32 (PEQA rows)
    chan_ptr, scale_ptr, alpha_ptr, beta_ptr,  # slab tables [Sc, N], [Sg, N, G], [Sa, BITS, N, G], [Sa, N, G]
    chan_idx_ptr, scale_idx_ptr, alpha_idx_ptr,  # the row's slots (one element each)
    ws_ptr, cnt_ptr,  # split-K workspace [SPLIT_K, N] f32, arrival counters (two per column tile, zero)
    N, K,
    stride_qn, stride_zg, stride_cs,
    stride_ss, stride_sn, stride_sg,
    stride_as, stride_aj, stride_an, stride_ag,
    stride_bs, stride_bn, stride_bg,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ZEROS: tl.constexpr,
    FAST: tl.constexpr, F16: tl.constexpr, PDL: tl.constexpr, PAIRS: tl.constexpr, STEP_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, DEPTH: tl.constexpr, X_AHEAD: tl.constexpr,
    STAGES: tl.constexpr, UNROLL: tl.constexpr,
):
    """y[n] for one column tile and one of SPLIT_K ranges of 8-block steps; row pairs (2i, 2i + 1) as in the mode-2
    GEMV. X_AHEAD, STAGES and UNROLL are the autotune list's keys: this kernel loads x one step ahead and takes
    STAGES 1, UNROLL 1 only."""
    tl.static_assert(STAGES == 1 and UNROLL == 1, "the alpha GEMV loads in registers (STAGES 1, UNROLL 1)")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HN: tl.constexpr = BLOCK_N // 2
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0
    rows0 = pid_n * BLOCK_N + 2 * tl.arange(0, HN)
    rows1 = rows0 + 1
    v = tl.arange(0, 8 * WORDS)[None, :]
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
    cidx = tl.load(chan_idx_ptr).to(tl.int64)
    sidx = tl.load(scale_idx_ptr).to(tl.int64)
    aidx = tl.load(alpha_idx_ptr)
    # rows past N (a tile's last pair where N is not a multiple of BLOCK_N) read row N - 2's tables, never stored
    t0 = tl.minimum(rows0, N - 2)
    t1 = t0 + 1
    a_base = alpha_ptr + tl.maximum(aidx, 0).to(tl.int64) * stride_as
    b_base = beta_ptr + tl.maximum(aidx, 0).to(tl.int64) * stride_bs
    s_base = scale_ptr + sidx * stride_ss
    acc = tl.zeros([HN, 8 * WORDS], dtype=tl.float32)
    if HAS_ZEROS:
        if aidx >= 0:
            acc = _plane_loop(acc, kb_lo, kb_hi, q0, q1, x_ptr, K, t0, t1, a_base, b_base, s_base, zero_ptr,
                              stride_aj, stride_an, stride_ag, stride_bn, stride_bg, stride_sn, stride_sg, stride_zg,
                              False, PAIRS, BITS, ONE_GROUP, F16, FAST, DEPTH, STEP_ASM)
        else:  # a PEQA row in a mode-3 call
            acc = _plane_loop(acc, kb_lo, kb_hi, q0, q1, x_ptr, K, t0, t1, a_base, b_base, s_base, zero_ptr,
                              stride_aj, stride_an, stride_ag, stride_bn, stride_bg, stride_sn, stride_sg, stride_zg,
                              True, False, BITS, ONE_GROUP, F16, FAST, DEPTH, STEP_ASM)
    else:  # a bcq base: every row is an alpha row
        acc = _plane_loop(acc, kb_lo, kb_hi, q0, q1, x_ptr, K, t0, t1, a_base, b_base, s_base, zero_ptr,
                          stride_aj, stride_an, stride_ag, stride_bn, stride_bg, stride_sn, stride_sg, stride_zg,
                          False, PAIRS, BITS, ONE_GROUP, F16, FAST, DEPTH, STEP_ASM)
    v, vblock, vword, vreg, diag, diag0, diag1 = _step_lanes()
    y0 = tl.sum(tl.where(vreg < 2, acc, 0.0), 1)  # [HN]: rows0
    y1 = tl.sum(tl.where(vreg < 2, 0.0, acc), 1)
    ok0 = rows0 < N
    ok1 = rows1 < N
    y0, y1, last = _split_sums(y0, y1, rows0, rows1, ok0, ok1, pid_n, pid_k, ws_ptr, cnt_ptr, N, SPLIT_K)
    if last:
        peqa = aidx < 0  # alpha rows take no channel factor
        c0 = tl.load(chan_ptr + cidx * stride_cs + rows0, mask=ok0 & peqa, other=1.0).to(tl.float32)
        c1 = tl.load(chan_ptr + cidx * stride_cs + rows1, mask=ok1 & peqa, other=1.0).to(tl.float32)
        y0 *= c0
        y1 *= c1
        if HAS_BIAS:
            y0 += tl.load(bias_ptr + rows0, mask=ok0, other=0.0).to(tl.float32)
            y1 += tl.load(bias_ptr + rows1, mask=ok1, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows0, y0.to(y_ptr.dtype.element_ty), mask=ok0)
        tl.store(y_ptr + rows1, y1.to(y_ptr.dtype.element_ty), mask=ok1)


_KEY = ["N", "K", "BITS", "GROUP_SIZE", "HAS_BIAS", "HAS_ZEROS", "F16", "PAIRS"]
# The MMA GEMV's list without its 32- and 64-row tiles at 4 warps: with four chains a lane those take 254-255
# registers (1 KB of spills at 64 rows, offline sm_90a, 4 bits), and the H100 picked 16 rows on every 7B shape (session
# 22). Fewer configs also shorten the server's warm-up, which autotunes each shape's.
CONFIGS = [c for c in MMA_GEMV_CONFIGS if c.kwargs["STAGES"] == 1 and c.kwargs["UNROLL"] == 1
           and not (c.num_warps == 4 and c.kwargs["BLOCK_N"] >= 32)]
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in CONFIGS)
_tuned = triton.autotune(configs=CONFIGS, key=_KEY, do_bench=quick_bench, cache_results=True)(_mma_alpha_kernel)


def _base_and_tables(w, chan, scales, alphas, betas):
    """The kernels' base and table arguments: (has_zeros, the codes as int32, the zero points (the codes where a bcq
    base has none), the scale table PEQA rows read (the alphas, unread, where there is none), the strides of the
    codes, zero points, chan, scales, alphas and betas in the kernels' order)."""
    has_zeros = w.zeros_t is not None
    q32 = w.codes_t.view(torch.int32)
    zeros = w.zeros_t if has_zeros else q32
    peqa = scales is not None and has_zeros  # (PEQA rows only: an rtn base has its scales)
    st = scales if peqa else alphas
    s_strides = (st.stride(0), st.stride(1), st.stride(-1)) if peqa else (0, 0, 0)
    strides = (q32.stride(0), zeros.stride(0) if has_zeros else 0, chan.stride(0), *s_strides, *alphas.stride(),
               *betas.stride())
    return has_zeros, q32, zeros, st, strides


def mma_alpha_fits(M: int, N: int, K: int, group_size: int, bits: int, dtype: torch.dtype, device_type: str) -> bool:
    """Whether this kernel takes a mode-3 call of these sizes (its x row must also be 16-byte aligned on CUDA)."""
    if not (M == 1 and N % 2 == 0 and N >= 2 and group_size in GROUP_SIZES and 2 <= bits <= 4):
        return False
    if device_type == "cpu":  # the interpreter computes in float32, from any float x
        return dtype in (torch.bfloat16, torch.float16, torch.float32)
    return dtype in (torch.bfloat16, torch.float16) and K % 8 == 0


def mma_alpha_supported(x: torch.Tensor, w, alphas: torch.Tensor | None) -> bool:
    M, K = x.shape
    return (alphas is not None and alphas.shape[1] == w.bits
            and mma_alpha_fits(M, w.N, K, w.group_size, w.bits, x.dtype, x.device.type)
            and (x.device.type == "cpu" or (x.stride(1) == 1 and x.data_ptr() % 16 == 0)))


def launch_mma_alpha(x, y, w, chan, scales, alphas, betas, chan_idx, scale_idx, alpha_idx, bias, config, ws, cnt):
    """y [1, N] = the mode-3 semantics (module docstring) for x [1, K]; ws: float32 workspace of at least
    MAX_SPLIT_K * N elements (SPLIT_K * N with a config), cnt: zeroed int32 counters (two per column tile).
    config: BLOCK_N, SPLIT_K, optional DEPTH / num_warps (else the device's pin or the autotuner; a fixed one in
    the interpreter)."""
    K = x.shape[1]
    N = w.N
    if not mma_alpha_supported(x, w, alphas) or betas is None:
        raise ValueError("the MMA alpha GEMV takes one row of x, an even N, 2-4 bit codes with group size -1 or 128, "
                         "alpha and beta tables with one plane a bit, and on CUDA 16-bit x with a 16-byte aligned row "
                         "and K a multiple of 8")
    if y.shape != (1, N) or y.stride(-1) != 1:
        raise ValueError(f"y must be [1, {N}] with unit stride")
    has_zeros, q32, zeros, st, strides = _base_and_tables(w, chan, scales, alphas, betas)
    args = (x, y, bias if bias is not None else x, q32, zeros, chan, st, alphas, betas, chan_idx, scale_idx, alpha_idx,
            ws, cnt, N, K, *strides)
    meta = dict(BITS=w.bits, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, HAS_ZEROS=has_zeros,
                FAST=x.device.type != "cpu", F16=x.dtype == torch.float16,
                PAIRS=TABLE_PAIRS and column_pairs_readable(alphas) and column_pairs_readable(betas),
                STEP_ASM=step_asm(x.dtype == torch.float16, w.bits), **launch_kwargs(x))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is None and x.device.type == "cpu":
        config = INTERPRET_CONFIG
    if config is None and x.dtype == torch.bfloat16:
        config = current_pin(x, pin_key(N, K, MODE_ALPHA, w.group_size, False))
    if config is None:
        _tuned[grid](*args, **meta)
        return y
    cfg = {"DEPTH": 1, "X_AHEAD": 1, "STAGES": 1, "UNROLL": 1, "num_stages": 1,
           **{k: v for k, v in config.items() if k != "MMA"}}
    if ws.numel() < cfg["SPLIT_K"] * N:
        raise ValueError("workspace too small for SPLIT_K")
    _mma_alpha_kernel[grid](*args, **meta, **cfg)
    return y


# --- small batches (2 <= M <= 16): the MMA batch kernel's layout, one chain per bit plane -------------------------


@triton.jit
def _batch_table(elem_ptrs, pair_ptrs, ok, vword, FAST: tl.constexpr, PAIRS: tl.constexpr, PAIR_ASM: tl.constexpr):
    """float32 [R, 16] of a slab table at each element's pointer where ok (else 0.0). PAIRS (GPU, a table whose rows
    pair up in one load): elements 0 / 1 of a lane read the (rows0, rows1) pair of their batch column at pair_ptrs
    with kernels.int4_mma_batch's pair asm (PAIR_ASM), unpredicated (every pointer is a real entry), and where not
    ok the value is left as read: such an element is a batch column past M (never stored) or one of the other kind,
    whose value _batch_tables replaces. Else one predicated load an element."""
    if PAIRS:
        return _scale_tile(pair_ptrs, vword, PAIR_ASM)
    return _load_if(elem_ptrs, ok, FAST)


@triton.jit
def _batch_tables(g, pair0, rowt, col, aidx, sidx, vword, M, N, alpha_ptr, beta_ptr, scale_ptr, zero_ptr,
                  stride_as, stride_aj, stride_an, stride_ag, stride_bs, stride_bn, stride_bg, stride_ss, stride_sn,
                  stride_sg, stride_zg, HAS_ZEROS: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr,
                  PAIRS: tl.constexpr, A_ASM: tl.constexpr, S_ASM: tl.constexpr):
    """(alpha_0..3, beta) [R, 16]: each element's (row rowt [R, 16], batch column col [1, 16], whose alpha and scale
    slots are aidx / sidx [1, 16]) plane alphas and beta in group g [R, 1] (planes past BITS: zeros). An AlphaTuning
    column reads its slot's tables; a PEQA column (an rtn base) makes them from its scale and the zero point
    (rtn_to_alphas), as the GEMV's PEQA rows do. PAIRS: the tables are read in (rows0, rows1) pairs from the tile
    row's first row pair0 [R] (A_ASM: the alpha and beta tables' pair asm, S_ASM: the scales')."""
    col_ok = col < M
    is_alpha = aidx >= 0
    a_ok = tl.broadcast_to(col_ok & is_alpha, rowt.shape)
    prow = tl.minimum(pair0[:, None], N - 2) + 0 * vword  # [R, 16] the pair's first row (pairs: N is even)
    aslot = tl.maximum(aidx, 0).to(tl.int64)
    arow = alpha_ptr + aslot * stride_as + rowt * stride_an + g * stride_ag
    apair = alpha_ptr + aslot * stride_as + prow * stride_an + g * stride_ag
    a0 = _batch_table(arow, apair, a_ok, vword, FAST, PAIRS, A_ASM)
    a1 = _batch_table(arow + stride_aj, apair + stride_aj, a_ok, vword, FAST, PAIRS, A_ASM)
    a2 = tl.zeros(rowt.shape, tl.float32)
    a3 = tl.zeros(rowt.shape, tl.float32)
    if BITS > 2:
        a2 = _batch_table(arow + 2 * stride_aj, apair + 2 * stride_aj, a_ok, vword, FAST, PAIRS, A_ASM)
    if BITS > 3:
        a3 = _batch_table(arow + 3 * stride_aj, apair + 3 * stride_aj, a_ok, vword, FAST, PAIRS, A_ASM)
    be = _batch_table(beta_ptr + aslot * stride_bs + rowt * stride_bn + g * stride_bg,
                      beta_ptr + aslot * stride_bs + prow * stride_bn + g * stride_bg, a_ok, vword, FAST, PAIRS, A_ASM)
    if HAS_ZEROS:
        p_ok = tl.broadcast_to(col_ok & (aidx < 0), rowt.shape)
        s = _batch_table(scale_ptr + sidx * stride_ss + rowt * stride_sn + g * stride_sg,
                         scale_ptr + sidx * stride_ss + prow * stride_sn + g * stride_sg, p_ok, vword, FAST, PAIRS,
                         S_ASM)
        if PAIRS:  # (the zero points are the float32 [G, N_pad] base table: pairs at any even row)
            z = _pair_tile(zero_ptr + g * stride_zg + pair0[:, None] + 0 * vword, vword)
        else:
            z = _load_if(zero_ptr + g * stride_zg + rowt, p_ok, FAST)
        a0 = tl.where(is_alpha, a0, 0.5 * s)
        a1 = tl.where(is_alpha, a1, s)
        if BITS > 2:
            a2 = tl.where(is_alpha, a2, 2.0 * s)
        if BITS > 3:
            a3 = tl.where(is_alpha, a3, 4.0 * s)
        be = tl.where(is_alpha, be, s * ((2**BITS - 1) / 2 - z))
    return a0, a1, a2, a3, be


@triton.jit
def _block_group(blk, num_kb, ONE_GROUP: tl.constexpr):
    """The group of each tile row's block blk [R, 1] (past the range: the last one; its block adds nothing)."""
    if ONE_GROUP:
        g = 0 * blk
    else:
        g = tl.minimum(blk, num_kb - 1)
    return g


@triton.jit
def _batch_plane_step(acc, w0, w1, p0, p1, p2, p3, a0, a1, a2, a3, be, F16: tl.constexpr, STEP_ASM: tl.constexpr):
    """acc [R, 16] += the blocks' plane dots of one chain of 8 batch columns, weighted (GPU; STEP_ASM: the launcher's
    batch_step_asm)."""
    xs = _ones_sums(p0, p1, p2, p3, F16)
    return tl.inline_asm_elementwise(STEP_ASM, _BSTEP_CONSTRAINTS,
                                     [w0, w1, p0, p1, p2, p3, xs, a0, a1, a2, a3, be, acc],
                                     dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _plain_batch_step(acc, blk, w0, w1, a0, a1, a2, a3, be, x_ptr, stride_xm, mb, M, K, vcol, BITS: tl.constexpr):
    """Interpreter: acc [R, 16] += sum_j alpha_j S_j + beta X of each element (row rows0 / rows1 by t >> 1, batch
    column mb + 2c + (t & 1)) over its tile row's block blk [R, 1], in plain float32 arithmetic."""
    R: tl.constexpr = w0.shape[0]
    nib = tl.arange(0, 8)[None, None, :] * 4
    rb = mb + tl.arange(0, 8)[None, :, None]  # [1, 8, 1] the chain's batch rows
    k = blk[:, :, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :]  # [R, 1, 128]
    xb = tl.load(x_ptr + rb * stride_xm + k, mask=(rb < M) & (k < K), other=0.0).to(tl.float32)  # [R, 8, 128]
    xs = tl.sum(xb, 2)  # [R, 8]
    t = vcol & 3
    pick = (2 * (vcol >> 2) + (t & 1))[:, None] == tl.arange(0, 8)[None, :]  # [16, 8] element -> batch column
    xe = tl.sum(tl.where(pick[None, :, :], xs[:, None, :], 0.0), 2)  # [R, 16]
    out = be * xe
    for j in tl.static_range(BITS):
        b0 = tl.reshape(((w0[:, :, None] >> (nib + j)) & 1).to(tl.float32), [R, BLOCK_K])  # [R, 128]: k = 8w + i
        b1 = tl.reshape(((w1[:, :, None] >> (nib + j)) & 1).to(tl.float32), [R, BLOCK_K])
        d0 = tl.sum(b0[:, None, :] * xb, 2)  # [R, 8] rows0 x batch
        d1 = tl.sum(b1[:, None, :] * xb, 2)
        e0 = tl.sum(tl.where(pick[None, :, :], d0[:, None, :], 0.0), 2)  # [R, 16]
        e1 = tl.sum(tl.where(pick[None, :, :], d1[:, None, :], 0.0), 2)
        if j == 0:
            a = a0
        elif j == 1:
            a = a1
        elif j == 2:
            a = a2
        else:
            a = a3
        out += a * (2.0 * tl.where(t[None, :] < 2, e0, e1) - xe)
    return acc + out


@triton.jit(do_not_specialize=[*ROW_INDEX_ARGS, "alpha_idx_ptr"])
def _mma_batch_alpha_kernel(
    x_ptr, y_ptr, bias_ptr,  # x [M, K], y [M, N], bias [N]
    q_ptr, zero_ptr,  # codes_t as int32 [N_pad, KW], zeros_t [G, N_pad] f32 (PEQA columns)
    chan_ptr, scale_ptr, alpha_ptr, beta_ptr,  # slab tables, read through strides
    chan_idx_ptr, scale_idx_ptr, alpha_idx_ptr,  # [M] the rows' slots
    ws_ptr, cnt_ptr,  # split-K workspace [SPLIT_K, M, N] f32, arrival counters (one per column tile, zero)
    M, N, K,
    stride_xm, stride_ym, stride_qn, stride_zg, stride_cs,
    stride_ss, stride_sn, stride_sg,
    stride_as, stride_aj, stride_an, stride_ag,
    stride_bs, stride_bn, stride_bg,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ZEROS: tl.constexpr,
    FAST: tl.constexpr, F16: tl.constexpr, PDL: tl.constexpr, MB2: tl.constexpr, EVEN_K: tl.constexpr,
    STEP_ASM: tl.constexpr, PAIRS: tl.constexpr, A_ASM: tl.constexpr, S_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BPS: tl.constexpr, DEPTH: tl.constexpr, X_AHEAD: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """y[:M, tile] in mode 3 for one column tile of BLOCK_N = 16 * num_warps rows and one of SPLIT_K ranges of steps,
    laid out as kernels/int4_mma_batch.py's kernel (its docstring): a step is BPS K blocks held as row bands of the
    [BPS * HN, 16] tiles, MB2 a second chain for batch rows 8..15. The codes and x are loaded one step ahead, the
    tables in their step (the autotune list's DEPTH, X_AHEAD and UNROLL: 1 only)."""
    tl.static_assert(DEPTH == 1 and X_AHEAD == 1 and UNROLL == 1, "the alpha batch kernel: DEPTH, X_AHEAD, UNROLL 1")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HN: tl.constexpr = BLOCK_N // 2
    R: tl.constexpr = BPS * HN
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0
    (rblk, pair0, vcol, vword, t, q0, q1, num_kb, s_lo, kb_hi, s_hi, x0p, x1p, xok0, xok1,
     colr) = _batch_setup(pid_n, pid_k, q_ptr, x_ptr, M, K, stride_qn, stride_xm, BLOCK_N, BPS, SPLIT_K, PDL)
    rowt = tl.minimum(pair0[:, None] + (t >> 1), N - 1)  # [R, 16] each element's row (past N: row N - 1, not stored)
    acc0 = tl.zeros([R, WORDS], dtype=tl.float32)
    acc1 = tl.zeros([R, WORDS], dtype=tl.float32)
    # each element's batch row's alpha and scale slots (chain 0, chain 1: rows 8..15), loaded once
    aidx0 = tl.load(alpha_idx_ptr + colr, mask=colr < M, other=0)  # [1, 16]
    sidx0 = tl.load(scale_idx_ptr + colr, mask=colr < M, other=0).to(tl.int64)
    aidx1 = tl.load(alpha_idx_ptr + colr + 8, mask=colr + 8 < M, other=0)
    sidx1 = tl.load(scale_idx_ptr + colr + 8, mask=colr + 8 < M, other=0).to(tl.int64)
    if FAST:  # the codes and x one step ahead in registers
        blk = s_lo * BPS + rblk
        w0n = tl.load(q0 + s_lo * (BPS * WORDS), mask=blk < kb_hi, other=0, eviction_policy="evict_first")
        w1n = tl.load(q1 + s_lo * (BPS * WORDS), mask=blk < kb_hi, other=0, eviction_policy="evict_first")
        a0n, a1n, a2n, a3n, b0n, b1n, b2n, b3n = _step_x(blk, blk < kb_hi, x0p, x1p, xok0, xok1, K, vword, MB2,
                                                         EVEN_K)
        for s in range(s_lo, s_hi):
            blk = s * BPS + rblk  # [R, 1]
            nxt = blk + BPS
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
            w0n = tl.load(q0 + (s + 1) * (BPS * WORDS), mask=nxt < kb_hi, other=0, eviction_policy="evict_first")
            w1n = tl.load(q1 + (s + 1) * (BPS * WORDS), mask=nxt < kb_hi, other=0, eviction_policy="evict_first")
            a0n, a1n, a2n, a3n, b0n, b1n, b2n, b3n = _step_x(nxt, nxt < kb_hi, x0p, x1p, xok0, xok1, K, vword, MB2,
                                                             EVEN_K)
            g = _block_group(blk, num_kb, ONE_GROUP)
            ta0, ta1, ta2, ta3, tb = _batch_tables(
                g, pair0, rowt, colr, aidx0, sidx0, vword, M, N, alpha_ptr, beta_ptr, scale_ptr, zero_ptr,
                stride_as, stride_aj, stride_an, stride_ag, stride_bs, stride_bn, stride_bg, stride_ss, stride_sn,
                stride_sg, stride_zg, HAS_ZEROS, BITS, FAST, PAIRS, A_ASM, S_ASM)
            acc0 = _batch_plane_step(acc0, w0, w1, a0, a1, a2, a3, ta0, ta1, ta2, ta3, tb, F16, STEP_ASM)
            if MB2:
                ua0, ua1, ua2, ua3, ub = _batch_tables(
                    g, pair0, rowt, colr + 8, aidx1, sidx1, vword, M, N, alpha_ptr, beta_ptr, scale_ptr, zero_ptr,
                    stride_as, stride_aj, stride_an, stride_ag, stride_bs, stride_bn, stride_bg, stride_ss, stride_sn,
                    stride_sg, stride_zg, HAS_ZEROS, BITS, FAST, PAIRS, A_ASM, S_ASM)
                acc1 = _batch_plane_step(acc1, w0, w1, b0, b1, b2, b3, ua0, ua1, ua2, ua3, ub, F16,
                                         STEP_ASM)
    else:
        s = s_lo
        while s < s_hi:
            blk = s * BPS + rblk
            w0 = tl.load(q0 + s * (BPS * WORDS), mask=blk < kb_hi, other=0)
            w1 = tl.load(q1 + s * (BPS * WORDS), mask=blk < kb_hi, other=0)
            g = _block_group(blk, num_kb, ONE_GROUP)
            ta0, ta1, ta2, ta3, tb = _batch_tables(
                g, pair0, rowt, colr, aidx0, sidx0, vword, M, N, alpha_ptr, beta_ptr, scale_ptr, zero_ptr,
                stride_as, stride_aj, stride_an, stride_ag, stride_bs, stride_bn, stride_bg, stride_ss, stride_sn,
                stride_sg, stride_zg, HAS_ZEROS, BITS, FAST, PAIRS, A_ASM, S_ASM)
            acc0 = _plain_batch_step(acc0, blk, w0, w1, ta0, ta1, ta2, ta3, tb, x_ptr, stride_xm, 0, M, K, vcol, BITS)
            if MB2:
                ua0, ua1, ua2, ua3, ub = _batch_tables(
                    g, pair0, rowt, colr + 8, aidx1, sidx1, vword, M, N, alpha_ptr, beta_ptr, scale_ptr, zero_ptr,
                    stride_as, stride_aj, stride_an, stride_ag, stride_bs, stride_bn, stride_bg, stride_ss, stride_sn,
                    stride_sg, stride_zg, HAS_ZEROS, BITS, FAST, PAIRS, A_ASM, S_ASM)
                acc1 = _plain_batch_step(acc1, blk, w0, w1, ua0, ua1, ua2, ua3, ub, x_ptr, stride_xm, 8, M, K, vcol,
                                         BITS)
            s += 1
    if BPS > 1:  # the step's blocks are row bands of the tile: add them up (within each thread)
        acc0 = tl.sum(tl.reshape(acc0, [BPS, HN, WORDS]), 0)
        acc1 = tl.sum(tl.reshape(acc1, [BPS, HN, WORDS]), 0)
    i = tl.arange(0, HN)
    rowe = pid_n * BLOCK_N + 2 * i[:, None] + (t >> 1)  # [HN, 16]
    _finish(acc0, rowe, colr, pid_n, pid_k, y_ptr, bias_ptr, chan_ptr, chan_idx_ptr, ws_ptr, cnt_ptr, M, N,
            stride_ym, stride_cs, acc1, MB2, HAS_BIAS, SPLIT_K, alpha_idx_ptr, True)


_BATCH_KEY = ["N", "K", "BITS", "GROUP_SIZE", "HAS_BIAS", "HAS_ZEROS", "F16", "MB2"]  # (K fixes EVEN_K)
# the MMA batch kernel's list, where this kernel takes the config (one step ahead, one step an iteration)
BATCH_CONFIGS = [c for c in MMA_BATCH_CONFIGS
                 if c.kwargs["DEPTH"] == 1 and c.kwargs["X_AHEAD"] == 1 and c.kwargs["UNROLL"] == 1]
BATCH_MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in BATCH_CONFIGS)


def _prune_alpha_batch(configs, named_args, **kwargs):
    """Two chains (M > 8) take one block a step: at two they spill ~0.5 KB (offline sm_90a, 4 bits, 255 registers)."""
    if kwargs.get("MB2", named_args.get("MB2")):
        return [c for c in configs if c.kwargs["BPS"] == 1]
    return configs


_tuned_batch = triton.autotune(configs=BATCH_CONFIGS, key=_BATCH_KEY, do_bench=quick_bench, cache_results=True,
                               prune_configs_by={"early_config_prune": _prune_alpha_batch})(_mma_batch_alpha_kernel)


def mma_batch_alpha_supported(x: torch.Tensor, w, alphas: torch.Tensor | None) -> bool:
    """Whether the batch kernel takes this mode-3 call: 1 <= M <= 16 rows, an even N, 2-4 bit codes at group size -1
    or 128; on the GPU 16-bit x read as 16-byte words (K a multiple of 8, rows 16-byte aligned)."""
    M, K = x.shape
    if not (1 <= M <= MMA_BATCH_MAX_M and w.N % 2 == 0 and w.group_size in GROUP_SIZES and 2 <= w.bits <= 4
            and alphas is not None and alphas.shape[1] == w.bits):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return (x.dtype in (torch.bfloat16, torch.float16) and K % 8 == 0 and x.stride(1) == 1
            and x.data_ptr() % 16 == 0 and (M == 1 or x.stride(0) % 8 == 0))


def launch_mma_batch_alpha(x, y, w, chan, scales, alphas, betas, chan_idx, scale_idx, alpha_idx, bias, config, ws,
                           cnt):
    """y [M, N] = the mode-3 semantics (module docstring, per row) for x [M, K], 1 <= M <= 16; ws: float32 workspace
    of at least BATCH_MAX_SPLIT_K * M * N elements (SPLIT_K * M * N with a config), cnt: zeroed int32 counters (one
    per column tile). config: BLOCK_N (16 x num_warps), SPLIT_K, optional BPS (else autotuned; fixed in the
    interpreter)."""
    M, K = x.shape
    N = w.N
    if not mma_batch_alpha_supported(x, w, alphas) or betas is None:
        raise ValueError("the MMA alpha batch kernel takes 1 to 16 rows of x, an even N, 2-4 bit codes with group "
                         "size -1 or 128, alpha and beta tables with one plane a bit, and on CUDA 16-bit x with "
                         "16-byte aligned rows and K a multiple of 8")
    has_zeros, q32, zeros, st, strides = _base_and_tables(w, chan, scales, alphas, betas)
    args = (x, y, bias if bias is not None else x, q32, zeros, chan, st, alphas, betas, chan_idx, scale_idx, alpha_idx,
            ws, cnt, M, N, K, x.stride(0), y.stride(0), *strides)
    interpret = x.device.type == "cpu"
    meta = dict(BITS=w.bits, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, HAS_ZEROS=has_zeros,
                FAST=not interpret, F16=x.dtype == torch.float16, MB2=M > 8, EVEN_K=K % 128 == 0,
                STEP_ASM=batch_step_asm(x.dtype == torch.float16, w.bits, FOLD_PLANE_SCALES),
                PAIRS=(not interpret and betas.dtype == alphas.dtype
                       and all(column_pairs_readable(t) for t in (alphas, betas, st))),
                A_ASM=_scales_asm(S_TYPE[alphas.dtype], True), S_ASM=_scales_asm(S_TYPE[st.dtype], True),
                **launch_kwargs(x))

    run_batch_kernel(_mma_batch_alpha_kernel, _tuned_batch, args, meta, config, ws, M, N, interpret)
    return y
