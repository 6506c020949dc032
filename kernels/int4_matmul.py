"""Triton int4 matmul with a per-row task adapter: one pass over the shared codes serves every row.

Semantics (kernels.reference.adapted_linear_ref is the oracle), per row i of x [M, K]:

  PEQA row  (alpha_idx[i] < 0):  W_i[n,k] = chan[chan_idx[i], n] * scales[scale_idx[i], n, g(k)] * (Q[n,k] - z[n, g(k)])
  alpha row (alpha_idx[i] >= 0): W_i[n,k] = sum_j alphas[a, j, n, g(k)] * (2*bit_j(Q[n,k]) - 1) + betas[a, n, g(k)],  a = alpha_idx[i]
  y[i, :] = x[i, :] @ W_i^T (+ bias)          y [M, N] in x.dtype, accumulated in float32

Everything a row needs is a linear combination of per-group dots that do not depend on the row's
adapter, so the kernel reads each weight tile once for all BLOCK_M rows and applies the adapters
as per-row, per-group multipliers of those dots:

  mode 1 (MODE_CHANNEL: every row base or per-channel PEQA; scale_idx must be 0 on all rows)
      D_g = x_g . Q_g - z_g X_g        one dot per group, shared by all rows (X_g = sum_{k in g} x_k)
      y   = chan[c_i, n] * sum_g s0[n, g] * D_g
  mode 2 (MODE_GROUP: PEQA rows with group-wise scales)
      y   = chan[c_i, n] * sum_g scales[s_i, n, g] * D_g      (scale gathered per row and group)
  mode 3 (MODE_ALPHA: any mix of AlphaTuning and PEQA rows; a bcq base has only alpha rows)
      S_jg = x_g . (2*bit_j(Q_g) - 1),  X_g = sum_{k in g} x_k
      alpha row: y = sum_g [ sum_j alphas[a, j, n, g] * S_jg + betas[a, n, g] * X_g ]
      PEQA row:  y = chan * sum_g scales[s_i, n, g] * [ sum_j 2**(j-1) S_jg + ((2**b - 1)/2 - z[n, g]) X_g ]
      (the PEQA line is rtn_to_alphas: the same bit-plane dots serve both kinds of row).

Zero points are floats (rtn puts the group minimum on code 0), so they never meet a 16-bit dtype:
dots take the integers Q, +-1 or bit_j as exact fp16/bf16 operands and z enters in float32 as
z * X_g; the only rounding is that of x itself and the float32 accumulation. 3-bit codes ride in the same 4-bit containers (the
planes j >= bits are simply not used).

Layout (built once per weight by `repack`, kept in QuantLinear._kernel_state):
  codes_t [N_pad, Kh_pad] uint8   the original packing (byte kk of row n holds Q[n, 2kk] in the low
                                  nibble, Q[n, 2kk+1] in the high one), zero padded so the hot loop
                                  needs no masks; a [BLOCK_N, BLOCK_K/2] tile of contiguous bytes is
                                  transposed for the dot, so each thread's k pairs are adjacent bytes.
  zeros_t, scales_t [G, N_pad]    base zero points / base scales, float32, N contiguous.
Slab tables are read in place through their strides (AdapterSlab allocates them N-contiguous);
adapted_linear copies a G-contiguous [S, N, G] table to N-contiguous (refreshed on writes).

Paths: M = 1 runs the decode GEMV below (CUDA cores, the codes viewed as int32 words, K blocks of
whole groups). Other M <= 64 (decode) uses BLOCK_M 16 / 32 and split-K; the splits add their partial
tiles in a float32 workspace and the last split of a tile (a per-tile arrival counter, reset by
that last split) finishes it, so one launch does all. Larger M uses larger tiles. All are
autotuned per (M bucket, N, K, mode, group size, bits, dtypes) by triton.autotune; the configs are
below. In the tensor-core kernel the group size fixes BLOCK_K (= group size, or 128 for
per-channel) so every K block lies in one group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .device import ROW_INDEX_ARGS, quick_bench
from .int4_gemm import int4_gemm_supported, launch_int4_gemm, workspace_numel
from .int4_mma_alpha import BATCH_MAX_SPLIT_K as MMA_BATCH_ALPHA_MAX_SPLIT_K
from .int4_mma_alpha import MAX_SPLIT_K as MMA_ALPHA_MAX_SPLIT_K
from .int4_mma_alpha import launch_mma_alpha, launch_mma_batch_alpha, mma_alpha_supported, mma_batch_alpha_supported
from .int4_mma_gemv import GROUP_SIZES as MMA_GROUP_SIZES
from .int4_mma_gemv import MAX_SPLIT_K as MMA_MAX_SPLIT_K
from .int4_mma_gemv import column_pairs_readable, launch_mma_gemv, mma_gemv_fits, mma_gemv_supported
from .int4_mma_gemv import load_f32 as _load_f32
from .int4_mma_batch import MAX_M as MMA_BATCH_MAX_M
from .int4_mma_batch import MAX_SPLIT_K as MMA_BATCH_MAX_SPLIT_K
from .int4_mma_batch import launch_mma_batch, mma_batch_supported
from .pdl import launch_kwargs, prefetch_l2, wait_for_producer
from .tile_epilogue import k_blocks, park_partial, store_rows, summed_partials

MODE_CHANNEL, MODE_GROUP, MODE_ALPHA = 1, 2, 3

# Padding of the repacked codes: any BLOCK_N <= N_ALIGN and BLOCK_K <= 2 * KH_ALIGN runs unmasked.
N_ALIGN = 256
KH_ALIGN = 128
MAX_SPLIT_K = 8
_COUNTER_SLOTS = 1 << 16


# --- autotune configs ------------------------------------------------------------------------


def _cfg(bm, bn, sk, warps=4, stages=3):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": sk}, num_warps=warps, num_stages=stages)


# decode (M <= 64): mma.sync tiles of 16-64 rows and split-K so that narrow outputs fill 132 SMs.
# Wider BLOCK_N re-reads x (from L2) fewer times: at BLOCK_N 64 and M = 16 the x re-reads equal
# the code bytes. BLOCK_M 64 would take wgmma, whose B operand must round-trip shared memory.
DECODE_CONFIGS = [
    _cfg(16, 64, 1), _cfg(16, 64, 2), _cfg(16, 64, 4), _cfg(16, 128, 1), _cfg(16, 128, 2), _cfg(16, 128, 4),
    _cfg(16, 128, 8), _cfg(16, 256, 2, warps=8), _cfg(16, 256, 4, warps=8),
    _cfg(32, 64, 2), _cfg(32, 128, 1), _cfg(32, 128, 2), _cfg(32, 128, 4, warps=8),
]
# prefill / larger batches: wider tiles; split-K only where the grid would be too small (M <= 64)
GEMM_CONFIGS = [
    _cfg(32, 64, 1), _cfg(64, 64, 1), _cfg(64, 128, 1, warps=8), _cfg(128, 128, 1, warps=8),
    _cfg(32, 64, 4), _cfg(64, 64, 2),
]
GEMM_SPLIT_MAX_M = 64
# the interpreter (CPU CI): one small config, chosen by the caller
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 1}


def _prune_gemm(configs, named_args, **kwargs):
    M = named_args["M"]
    return [c for c in configs if c.kwargs["SPLIT_K"] == 1 or M <= GEMM_SPLIT_MAX_M]


def _prune_decode(configs, named_args, **kwargs):
    """No row tile taller than the batch (its padding rows would cost MMAs and registers)."""
    tall = max(16, triton.next_power_of_2(named_args["M"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= tall]


# --- kernel ----------------------------------------------------------------------------------


@triton.jit
def _codes(nib, DT: tl.constexpr, FAST: tl.constexpr, MAGIC: tl.constexpr):
    """nib [HALF, BN] codes 0..15 -> Q [HALF, BN] in DT (exact integers).

    FAST (16-bit DT on a GPU): OR the code into the mantissa of a magic float (1024 + Q in fp16,
    128 + Q in bf16) and subtract the magic: no int->float conversion instructions, which run at
    a quarter of the ALU rate and would cap the decode well under the memory bandwidth.
    """
    if FAST:
        if DT == tl.float16:
            v = (nib.to(tl.uint16) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
        else:
            v = (nib.to(tl.uint16) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return (v - MAGIC).to(DT)
    else:
        return nib.to(tl.float32).to(DT)


@triton.jit
def _sign_plane(byte, BIT: tl.constexpr, DT: tl.constexpr, FAST: tl.constexpr):
    """byte [HALF, BN] uint8 -> +1 where bit BIT is set, -1 where clear, in DT.

    FAST: move the bit under the sign of the constant -1.0 and flip it (shift, and, xor).
    """
    if FAST:
        if DT == tl.float16:
            neg_one = 0xBC00
        else:
            neg_one = 0xBF80
        bits = ((byte.to(tl.uint16) << (15 - BIT)) & 0x8000) ^ neg_one
        return bits.to(tl.uint16).to(DT, bitcast=True)
    else:
        return (((byte >> BIT) & 1).to(tl.float32) * 2.0 - 1.0).to(DT)


@triton.jit
def _codes_sixteenths(byte, DT: tl.constexpr):
    """byte [HALF, BN] uint8 -> (1 + lo/16, 1 + hi/16) in DT (16-bit), exact; GPU only.

    Each nibble goes under the top of the mantissa of 1.0: a byte permute spreads two bytes into
    the halves of a 32-bit word, then a shift and one LOP3 ((a & mask) | ones) make two values,
    ~1.25 instructions per code and no float arithmetic (the 1 leaves through X_g).
    """
    if DT == tl.float16:  # 1.0 = 0x3C00, nibble at mantissa bits 6..9
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1, u0, u1;\n"
            "prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342;\n"
            "shl.b32 u0, t0, 6; shl.b32 u1, t1, 6;\n"
            "lop3.b32 $0, u0, 0x03C003C0, 0x3C003C00, 0xEA; lop3.b32 $1, u1, 0x03C003C0, 0x3C003C00, 0xEA;\n"
            "shl.b32 u0, t0, 2; shl.b32 u1, t1, 2;\n"
            "lop3.b32 $2, u0, 0x03C003C0, 0x3C003C00, 0xEA; lop3.b32 $3, u1, 0x03C003C0, 0x3C003C00, 0xEA; }",
            "=r,=r,=r,=r,r", [byte], dtype=(tl.int16, tl.int16), is_pure=True, pack=4)
    else:  # bf16: 1.0 = 0x3F80, nibble at mantissa bits 3..6
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1, u0, u1;\n"
            "prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342;\n"
            "shl.b32 u0, t0, 3; shl.b32 u1, t1, 3;\n"
            "lop3.b32 $0, u0, 0x00780078, 0x3F803F80, 0xEA; lop3.b32 $1, u1, 0x00780078, 0x3F803F80, 0xEA;\n"
            "shr.b32 u0, t0, 1; shr.b32 u1, t1, 1;\n"
            "lop3.b32 $2, u0, 0x00780078, 0x3F803F80, 0xEA; lop3.b32 $3, u1, 0x00780078, 0x3F803F80, 0xEA; }",
            "=r,=r,=r,=r,r", [byte], dtype=(tl.int16, tl.int16), is_pure=True, pack=4)
    return lo.to(DT, bitcast=True), hi.to(DT, bitcast=True)


@triton.jit
def _ones_like(byte, DT: tl.constexpr):
    """1.0 in DT in the layout of byte (16-bit DT, GPU only). A constant tensor would take a
    dot-operand layout of its own and make x be converted twice per K block."""
    if DT == tl.float16:
        return tl.inline_asm_elementwise("mov.b32 $0, 0x3C003C00; mov.b32 $1, 0x3C003C00;", "=r,=r,r", [byte],
                                         dtype=tl.int16, is_pure=True, pack=4).to(DT, bitcast=True)
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, 0x3F803F80; mov.b32 $1, 0x3F803F80;", "=r,=r,r", [byte],
                                         dtype=tl.int16, is_pure=True, pack=4).to(DT, bitcast=True)


@triton.jit
def _accumulate_block(
    acc, kb, z_g, s_g, num_kb, x_rows, q_cols, offs_j, offs_n, n_rows, m_ok, sidx, is_alpha, arow, K,
    zero_ptr, s0_ptr, scale_ptr, alpha_ptr, beta_ptr,
    stride_qk, stride_zg, stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
    stride_bs, stride_bn, stride_bg,
    MODE: tl.constexpr, BITS: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    FAST: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, MAGIC: tl.constexpr, CODE_MID: tl.constexpr,
    BLOCK_K: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """acc [BM, BN] += this K block's contribution (K block kb lies in group kb, or the one group).
    Returns (acc, the group tables of block kb + 1).

    z_g, s_g (modes 1/2): the group's zero points [1, BN] and scales ([1, BN] base, [BM, BN] per
    row; unused for one group), loaded one K block ahead (_group_tables): this block loads the next's.
    """
    if ONE_GROUP:
        z_nx, s_nx = z_g, s_g
    else:
        z_nx, s_nx = _group_tables(kb + 1, num_kb, offs_n, n_rows, sidx, zero_ptr, s0_ptr, scale_ptr,
                                   stride_zg, stride_ss, stride_sn, stride_sg, MODE, ONE_GROUP, FAST, PAIRS)
    # x tile [BM, BLOCK_K] in one contiguous (vectorized) load, then split into even / odd k
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    xt = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0).to(DT)
    xe, xo = tl.split(tl.reshape(xt, [BLOCK_M, HALF, 2]))  # [BM, HALF] each
    # [BN, HALF] rows of contiguous bytes, transposed for the dot: each thread's k-pairs sit in adjacent bytes
    byte = tl.trans(tl.load(q_cols + (kb * HALF + offs_j)[None, :], eviction_policy="evict_first"))
    if ONE_GROUP:
        g = 0
    else:
        g = kb  # BLOCK_K == GROUP_SIZE
    if FAST:
        # the one column X_g needs, as a dot with ones: it lands in the accumulator's layout, where a
        # row sum of the x tile would be a cross-warp reduction (shared memory, barriers) per K block
        ones = _ones_like(byte, DT)
        x_sum = tl.dot(xe, ones, input_precision=PREC)
        x_sum = tl.dot(xo, ones, x_sum, input_precision=PREC)  # [BM, BN] = X_g in every column
    else:
        x_sum = (tl.sum(xe.to(tl.float32), 1) + tl.sum(xo.to(tl.float32), 1))[:, None]  # [BM, 1] = X_g
    if MODE != 3:
        # dots with the codes themselves; the zero point is a float (rtn puts the group minimum on
        # code 0), so it enters in float32: x_g . (Q_g - z_g) = x_g . Q_g - z_g X_g
        if FAST:  # the codes as 1 + Q/16 (exact): x . Q = 16 (x . (1 + Q/16) - X)
            w_lo, w_hi = _codes_sixteenths(byte, DT)
            part = tl.dot(xe, w_lo, input_precision=PREC)
            part = tl.dot(xo, w_hi, part, input_precision=PREC)  # [BM, BN] = X_g + x_g . Q_g / 16
            part = part * 16.0 - x_sum * (z_g + 16.0)  # [BM, BN] = x_g . (Q_g - z_g)
        else:
            part = tl.dot(xe, _codes(byte & 0xF, DT, FAST, MAGIC), input_precision=PREC)
            part = tl.dot(xo, _codes(byte >> 4, DT, FAST, MAGIC), part, input_precision=PREC)
            part -= x_sum * z_g
        if ONE_GROUP:
            acc += part
        else:
            acc += part * s_g
    else:
        if HAS_ZEROS:  # PEQA rows take the zero point through X_g (their alpha-table reads are unused)
            s = _load_f32(scale_ptr + sidx[:, None] * stride_ss + n_rows[None, :] * stride_sn + g * stride_sg,
                          FAST)
            z = tl.load(zero_ptr + g * stride_zg + offs_n)
            peqa_x = s * (CODE_MID - z[None, :])
        else:  # bcq base: every row is an alpha row
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            peqa_x = s
        beta = _load_f32(beta_ptr + arow[:, None] * stride_bs + n_rows[None, :] * stride_bn + g * stride_bg, FAST)
        acc += x_sum * tl.where(is_alpha[:, None], beta, peqa_x)
        pow2 = 0.5  # 2**(j-1)
        for j in tl.static_range(BITS):
            s_lo = _sign_plane(byte, j, DT, FAST)
            s_hi = _sign_plane(byte, j + 4, DT, FAST)
            plane = tl.dot(xe, s_lo, input_precision=PREC)
            plane = tl.dot(xo, s_hi, plane, input_precision=PREC)  # [BM, BN] = S_jg
            a = _load_f32(alpha_ptr + arow[:, None] * stride_as + j * stride_aj + n_rows[None, :] * stride_an
                          + g * stride_ag, FAST)
            acc += plane * tl.where(is_alpha[:, None], a, s * pow2)
            pow2 = pow2 * 2.0
    return acc, z_nx, s_nx


@triton.jit
def _group_tables(kb, num_kb, offs_n, n_rows, sidx, zero_ptr, s0_ptr, scale_ptr, stride_zg, stride_ss, stride_sn,
                  stride_sg, MODE: tl.constexpr, ONE_GROUP: tl.constexpr, FAST: tl.constexpr, PAIRS: tl.constexpr):
    """(z [1, BN], s) of K block kb's group (kb clamped to the last block) for modes 1/2: s is the
    base scale [1, BN] (mode 1) or each row's task scale [BM, BN] (mode 2); one group: z only (its
    scale is an epilogue factor). Mode 3 reads its own tables per block: (0, 0).

    The caller loads them one K block ahead: issued in the block where they are used, their latency
    (~1 µs from DRAM) stood in every iteration (ncu: 5.8 of 10.4 cycles per instruction per warp
    waited on these loads at M = 16).
    """
    if ONE_GROUP:
        g = 0
    else:
        g = tl.minimum(kb, num_kb - 1)
    if MODE == 3:
        z = 0.0
        s = 0.0
    else:
        z = tl.load(zero_ptr + g * stride_zg + offs_n)[None, :]  # padded: no mask
        if ONE_GROUP:
            s = 0.0
        elif MODE == 1:
            s = tl.load(s0_ptr + g * stride_zg + offs_n)[None, :]
        else:
            s = _table_tile(scale_ptr + sidx[:, None] * stride_ss + g * stride_sg, n_rows, stride_sn, FAST, PAIRS)
    return z, s


@triton.jit
def _table_tile(rows, n_rows, stride_n, FAST: tl.constexpr, PAIRS: tl.constexpr):
    """float32 [BM, BN] tile of a slab table: rows [BM, 1] pointers to each row's (slot, group) entry,
    columns n_rows [BN] (always in bounds: slots are valid on every row, masked rows read slot 0,
    and columns past N are clamped). No mask, so the loads can take the accumulator's layout
    instead of a coalesced one plus a shared-memory conversion.

    PAIRS (16-bit table, unit stride along N, even N and 4-byte aligned pairs): one 32-bit load per
    two adjacent columns, split and joined back; the compiler keeps each pair in one thread, as the
    accumulator's layout holds it.
    """
    if PAIRS:
        BN: tl.constexpr = n_rows.shape[0]
        n_even, _ = tl.split(tl.reshape(n_rows, [BN // 2, 2]))  # [BN/2] first column of each pair
        v = _load_b32((rows + n_even[None, :]).to(tl.pointer_type(tl.int32)))  # [BM, BN/2]
        lo = v.to(tl.int16).to(rows.dtype.element_ty, bitcast=True)
        hi = (v >> 16).to(tl.int16).to(rows.dtype.element_ty, bitcast=True)
        return tl.reshape(tl.join(lo, hi), [rows.shape[0], BN]).to(tl.float32)
    else:
        return _load_f32(rows + n_rows[None, :] * stride_n, FAST)


@triton.jit
def _load_b32(ptrs):
    """int32 values, read-only path, in the pointers' layout (GPU)."""
    return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit(do_not_specialize=["M", "M_BUCKET", *ROW_INDEX_ARGS, "alpha_idx_ptr"])
def _adapted_int4_kernel(
    x_ptr, y_ptr, bias_ptr,  # x [M, K], y [M, N], bias [N]
    q_ptr, zero_ptr, s0_ptr,  # codes_t [N_pad, Kh_pad] u8, zeros_t / scales_t [G, N_pad] f32
    chan_ptr, scale_ptr, alpha_ptr, beta_ptr,  # slab tables (any float dtype, read through strides)
    chan_idx_ptr, scale_idx_ptr, alpha_idx_ptr,  # [M] int32
    ws_ptr, cnt_ptr,  # split-K workspace [SPLIT_K, M, N] f32, per-tile arrival counters (zero)
    M, N, K, M_BUCKET,
    stride_xm, stride_ym, stride_qk, stride_zg,
    stride_cs,
    stride_ss, stride_sn, stride_sg,
    stride_as, stride_aj, stride_an, stride_ag,
    stride_bs, stride_bn, stride_bg,
    MODE: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ZEROS: tl.constexpr, FAST: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, MAGIC: tl.constexpr, CODE_MID: tl.constexpr,
    BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr, PAIRS: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: the programs that share a weight tile run together
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    HALF: tl.constexpr = BLOCK_K // 2
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    m_ok = offs_m < M
    n_ok = offs_n < N
    num_kb = tl.cdiv(K, BLOCK_K)
    kb_lo, kb_hi = k_blocks(pid_k, K, BLOCK_K, SPLIT_K)
    q_cols = q_ptr + offs_n[:, None] * stride_qk  # [BN, 1] rows of codes_t
    if PDL:  # while the previous kernel finishes: this program's first code blocks into L2 (two lines a row)
        line = kb_lo * HALF + tl.arange(0, 2)[None, :] * 128  # [1, 2] byte offsets in the (padded) row
        prefetch_l2(q_cols + line, (line < stride_qk) & (kb_lo < kb_hi))
    wait_for_producer(PDL)  # x, the slots and the tables below may come from the previous kernel

    # each row's slab slots
    cidx = tl.load(chan_idx_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    sidx = tl.load(scale_idx_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    aidx = tl.load(alpha_idx_ptr + offs_m, mask=m_ok, other=-1)
    is_alpha = aidx >= 0  # [BM]
    arow = tl.maximum(aidx, 0).to(tl.int64)

    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BM, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # slab-table columns clamped into N (padded columns are never stored) and slots valid on every
    # row (masked rows read slot 0): the table loads need no mask, so they can take the
    # accumulator's layout instead of a coalesced one plus a conversion
    n_rows = tl.where(n_ok, offs_n, 0)
    z_nx, s_nx = _group_tables(kb_lo, num_kb, offs_n, n_rows, sidx, zero_ptr, s0_ptr, scale_ptr, stride_zg,
                               stride_ss, stride_sn, stride_sg, MODE, ONE_GROUP, FAST, PAIRS)
    if INTERPRET:  # the interpreter (numpy >= 2.3) cannot range() over tensor bounds
        kb = kb_lo
        while kb < kb_hi:
            acc, z_nx, s_nx = _accumulate_block(acc, kb, z_nx, s_nx, num_kb, x_rows, q_cols, offs_j, offs_n, n_rows, m_ok, sidx, is_alpha, arow, K,
                zero_ptr, s0_ptr, scale_ptr, alpha_ptr, beta_ptr,
                stride_qk, stride_zg, stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
                stride_bs, stride_bn, stride_bg,
                MODE, BITS, ONE_GROUP, HAS_ZEROS, FAST, DT, PREC, MAGIC, CODE_MID, BLOCK_K, HALF, BLOCK_M, BLOCK_N,
                PAIRS)
            kb += 1
    else:  # a for loop: the compiler software-pipelines the code and x tiles (num_stages)
        for kb in range(kb_lo, kb_hi):
            acc, z_nx, s_nx = _accumulate_block(acc, kb, z_nx, s_nx, num_kb, x_rows, q_cols, offs_j, offs_n, n_rows, m_ok, sidx, is_alpha, arow, K,
                zero_ptr, s0_ptr, scale_ptr, alpha_ptr, beta_ptr,
                stride_qk, stride_zg, stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
                stride_bs, stride_bn, stride_bg,
                MODE, BITS, ONE_GROUP, HAS_ZEROS, FAST, DT, PREC, MAGIC, CODE_MID, BLOCK_K, HALF, BLOCK_M, BLOCK_N,
                PAIRS)

    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        acc = _row_factors(acc, offs_n, n_ok, cidx, sidx, is_alpha, s0_ptr, scale_ptr, chan_ptr, stride_cs,
                           stride_ss, stride_sn, MODE, ONE_GROUP)
        store_rows(acc, y_ptr, bias_ptr, offs_m, offs_n, out_mask, n_ok, stride_ym, HAS_BIAS)
    else:  # the last split to arrive finishes the tile (kernels/tile_epilogue.py)
        tile = pid_m * tl.num_programs(1) + pid_n
        if park_partial(acc, ws_ptr, cnt_ptr, tile, pid_k, offs_m, offs_n, M, N, out_mask, SPLIT_K):
            total = summed_partials(ws_ptr, cnt_ptr, tile, offs_m, offs_n, M, N, out_mask, SPLIT_K, BLOCK_M, BLOCK_N)
            total = _row_factors(total, offs_n, n_ok, cidx, sidx, is_alpha, s0_ptr, scale_ptr, chan_ptr, stride_cs,
                                 stride_ss, stride_sn, MODE, ONE_GROUP)
            store_rows(total, y_ptr, bias_ptr, offs_m, offs_n, out_mask, n_ok, stride_ym, HAS_BIAS)


@triton.jit
def _row_factors(acc, offs_n, n_ok, cidx, sidx, is_alpha, s0_ptr, scale_ptr, chan_ptr, stride_cs, stride_ss,
                 stride_sn, MODE: tl.constexpr, ONE_GROUP: tl.constexpr):
    """acc [BM, BN] times its linear epilogue factors: the base or row's scale when there is one group,
    and each row's per-channel multiplier. They commute with the split-K sum, so they are applied once,
    to the finished tile: per split they would be read again, and with many distinct adapters they are
    BM x BN scattered loads (comparable to the weight tile itself when K is small)."""
    if ONE_GROUP and MODE == 1:
        acc *= tl.load(s0_ptr + offs_n)[None, :]
    if ONE_GROUP and MODE == 2:
        s = tl.load(scale_ptr + sidx[:, None] * stride_ss + offs_n[None, :] * stride_sn, mask=n_ok[None, :], other=0.0)
        acc *= s.to(tl.float32)
    chan = tl.load(chan_ptr + cidx[:, None] * stride_cs + offs_n[None, :], mask=n_ok[None, :], other=0.0)
    chan = chan.to(tl.float32)
    if MODE == 3:
        chan = tl.where(is_alpha[:, None], 1.0, chan)
    return acc * chan


# --- decode GEMV (M = 1): CUDA cores, no tensor cores ---------------------------------------------
#
# codes_t viewed as int32 [N_pad, KW = Kh_pad/4]: word w of row n holds Q[n, 8w + i] in nibble i
# (the original little-endian packing). A program owns BLOCK_N rows and one of SPLIT_K K ranges and
# walks it in K blocks of BLOCK_K codes (GPI whole groups of GW words): the [BLOCK_N, BLOCK_K/8]
# word tile is loaded with the lanes of a warp along K (up to 512 contiguous bytes of a row per
# load instruction: DRAM sees long runs, not 64-byte pieces of 128 rows) and viewed as
# [BLOCK_N, GPI, GW] so each group's scale / zero point multiplies its own words. The next tile
# and its groups' scales / zero points are in flight while the current one is multiplied:
# registers one block ahead (STAGES 1, PREFETCH), or the compiler's cp.async pipeline (STAGES > 1).
#
# Nibble -> float32 with one LOP3 and nothing else: the word is shifted so that the nibble sits at
# bits p..p+3 with p = 15 (odd nibbles) or 19 (even ones); (w' & 0xF << p) | bits(2**(23-p)) is
# the float 2**(23-p) + Q, exactly (the nibble becomes the top of the mantissa of a small power of
# two). The offsets leave through the FFMA chain's initial value: per word
#   x . (Q - z) = sum_i x_i (off_i + Q_i) - (z X_w + c_w),  X_w = sum_i x_i,  c_w = sum_i off_i x_i
# (X_w, c_w depend on x only and are shared by every row), so a code costs one LOP3 and one FFMA,
# plus four shifts per word (w << 3: nibbles 3, 4; w << 11: 1, 2; w >> 5: 5, 6; rotate 19: 7, 0).
# Small offsets (256, 16) keep the float32 chain accurate (~3e-6 relative; the classic 2**23
# magic would leave nothing of the code without a subtraction per code). x for a word (8 values)
# is one 16-byte load. Mode 3 moves each nibble to bits 19..22 and reads bit j alone: 2**(4-j) + bit_j.
# Partial sums stay in the tile layout across K blocks and are reduced over K once, at the end.


def _gcfg(bn, bk, sk, stages=1, warps=4, prefetch=1, maxnreg=None):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "PREFETCH": prefetch, "STAGES": stages},
                         num_warps=warps, num_stages=1, maxnreg=maxnreg)


# measured on the H100 (bench/kernels.py --gemv-sweep, M = 1, g128): the register-prefetched long-K
# configs win for modes 1/2; mode 3 (more registers) prefers the compiler-pipelined code tile (STAGES 3)
GEMV_CONFIGS = [
    _gcfg(32, 512, 1), _gcfg(16, 1024, 1), _gcfg(16, 512, 1), _gcfg(32, 512, 2), _gcfg(32, 1024, 2),
    _gcfg(32, 256, 4), _gcfg(16, 256, 2), _gcfg(32, 512, 1, stages=4), _gcfg(16, 1024, 1, stages=4),
    # capped at 128 registers: 4 programs per SM instead of 3 (the GEMV is latency-bound at 163); they
    # spill 40 B of loop-invariant pointers. Not timed yet: the autotuner keeps them only if faster.
    _gcfg(32, 512, 1, maxnreg=128), _gcfg(16, 1024, 1, maxnreg=128),
]
GEMV_ALPHA_CONFIGS = [  # mode 3
    _gcfg(16, 512, 1, stages=3), _gcfg(16, 1024, 1, stages=3), _gcfg(16, 512, 1, stages=3, warps=8),
    _gcfg(16, 256, 2), _gcfg(16, 512, 1),
]
# M = 1 in modes 1/2 runs the MMA GEMV (kernels/int4_mma_gemv.py: the code words feed mma.sync from
# registers, ~2.2 instructions per code against this file's GEMV's ~4.2), under MMA_GEMV_POLICY: "auto"
# (group size -1 and 128: every call the kernel supports), "per-channel" (group size -1 only) or "never".
# Measured on the H100 in CUDA-graph replay over cold weights, same call (bench/NOTES-kernels.md, session
# 10), µs per 7B layer, MMA vs this file's GEMV: group 128 mode 2 55.7 vs 64.4 (each of the four shapes
# faster), group -1 49.7 vs 56.3. Until session 9 the group tables cost the MMA GEMV the shapes with many
# short rows (qkv, gate_up); a lane now reads its two adjacent rows' tables in one load each.
MMA_GEMV_POLICY = "auto"
# A gate / up projection asked for silu(gate) * up (int4_matmul's silu_gate) can get it from the MMA GEMV's
# epilogue, so decode at batch 1 launches no SiLU kernel. It does not pay yet: H200, random Llama-2-7B g128, batch
# 1 (`bench/decode_profile.py --silu-gate off,on`, bench/NOTES-kernels.md session 15), the SiLU launches' 35 µs
# a token go but the gate / up GEMV, whose row pairs then lie N / 2 apart (two code streams, tables in two loads
# each), takes 55 µs more; the graph is the same (2.380 / 2.382 ms). Off: the GEMV writes the projection and
# kernels.fused.silu_mul gates it. (Interleaving gate and up rows at load time would keep the pairs adjacent.)
FUSE_SILU_GATE = False
# Decode of one sequence with every projection on the MMA GEMV (server/model.py Transformer.fuses_norms) runs each
# RMSNorm inside the projections around it: the one before a norm adds its output into the residual stream and
# writes round(h * weight) (accumulate, norm_out), the one after scales its sums by rsqrt(mean(h^2) + eps) (norm_in),
# so no add + RMSNorm launch is left between them (64 a token on a 32-layer model). H100, random Llama-2-7B g128, batch
# 1, same call (`bench/decode_profile.py --fused-norms off,on`, bench/NOTES-kernels.md session 17): the norms' 122 µs
# a token go, the GEMVs that scale by the rsqrt take 54 µs more (each program sums the stream's squares first); graph
# 2.312 -> 2.275 ms back to back, 425.5 -> 434.2 tok/s overlapped (int4 head: 2.246 -> 2.206 ms, 437.8 -> 448.2).
# False: the add + RMSNorm kernel.
FUSE_NORMS = True


# M = 1 in mode 3 (an AlphaTuning row, or a bcq base) at group size -1 / 128 runs the MMA alpha GEMV
# (kernels/int4_mma_alpha.py: one mma.sync chain per bit plane over the mode-2 GEMV's loads) under MMA_ALPHA_POLICY
# "auto", this file's CUDA-core plane GEMV under "never". H100, g128, 4-bit planes, µs per 7B layer, same call
# (`bash bench/gpu_session.sh alpha_ab`, bench/NOTES-kernels.md session 22): 92.3 against 138.5 (qkv 23.5 / 31.9,
# o 8.9 / 16.9, gate_up 39.3 / 55.6, down 20.6 / 34.1); mode 2 58.3 in the same call.
MMA_ALPHA_POLICY = "auto"


def mma_alpha_chosen(M: int, mode: int, group_size: int) -> bool:
    """Whether MMA_ALPHA_POLICY sends this call (CUDA, inputs the kernel supports) to the MMA alpha GEMV."""
    return M == 1 and mode == MODE_ALPHA and group_size in MMA_GROUP_SIZES and MMA_ALPHA_POLICY == "auto"


# 2 <= M <= 16 in mode 3 at group size -1 / 128 runs kernels/int4_mma_alpha.py's batch kernel (the MMA batch
# kernel's layout, one chain per bit plane) under MMA_BATCH_ALPHA_POLICY "auto", this file's tile under "never".
# H100, g128, 4-bit planes, µs per 7B layer, same call (`bash bench/gpu_session.sh alpha_batch_ab`,
# bench/NOTES-kernels.md session 23): M = 4 114.1 against the tile's 247.1, M = 16 170.9 against 245.2 (16
# adapters: 214.3 against 315.0); mode 2 65.7 / 86.8 in the same call. Every shape wins at both M.
MMA_BATCH_ALPHA_POLICY = "auto"


def mma_batch_alpha_chosen(M: int, mode: int, group_size: int) -> bool:
    """Whether MMA_BATCH_ALPHA_POLICY sends this call (CUDA, inputs the kernel supports) to the MMA alpha batch
    kernel."""
    return (MMA_BATCH_ALPHA_POLICY == "auto" and 2 <= M <= MMA_BATCH_MAX_M and mode == MODE_ALPHA
            and group_size in MMA_GROUP_SIZES)


def mma_gemv_chosen(M: int, mode: int, group_size: int) -> bool:
    """Whether MMA_GEMV_POLICY sends this call (CUDA, inputs the kernel supports) to the MMA GEMV."""
    if M != 1 or mode not in (MODE_CHANNEL, MODE_GROUP) or MMA_GEMV_POLICY == "never":
        return False
    return MMA_GEMV_POLICY == "auto" or group_size == -1


# Batches in modes 1/2 on 16-bit x: kernels/int4_gemm.py folds a tile's scale row into the dequantized
# weights and chains its dots through K. It costs one pass per scale slot in a tile, so mode 2 goes there
# only when the caller promises one slot for all rows (scale_slots == 1: a prompt's prefill, a batch on
# one task). Measured on the H100 against this file's tile (bench/NOTES-kernels.md, session 8), µs per
# 7B layer, same call: g128 mode 1 M = 64 / 128 / 256: 148 / 216 / 324 vs 161 / 370 / 686; mode 2 one
# slot 168 / 261 / 428 vs 195 / 412 / 759. Per-channel mode 2 keeps its scale as an epilogue factor
# here, which wins at M = 64 (147 vs 172). M <= 16 stays on the mma.sync tile (75-90 vs 129-145).
# FOLD_POLICY: "auto" (the rule below), "always" (M >= 2) or "never".
FOLD_POLICY = "auto"
FOLD_MIN_M = 64
# Mode 2 on the one-slot promise runs the fold GEMM's mode-1 loop (kernels/int4_gemm.py ONE_SLOT) instead of its
# one-pass-per-slot loop, whose x row mask hangs on the loop-carried slot (mode 2 at one slot: 168 / 428 µs a 7B
# layer at M = 64 / 256 against mode 1's 148 / 326, H100). Interpreter-tested; off until a GPU session runs its tests
# and times it (`KAB_K=one_slot KAB_ARGS="--ms 64,256 --modes 2 --groups 128 --no-baselines" bash
# bench/gpu_session.sh kernels_ab` with this switch on and .carry/base the tree before it; session 29's device time
# ran out in refused starts).
FOLD_ONE_SLOT = False
# SWAP in the fold GEMM (kernels/int4_gemm.py): the code bytes as wgmma's A operand straight from registers, the
# tokens as its N: no shared-memory store of the dequantized tile in the loop, and on most tiles a block's wgmmas in
# flight while the next slices are dequantized (offline sm_90a, 8 warps, a 128 x 128 x 128 tile: 434 instructions a
# block against the fold GEMM's 393, which waits for its dots). Interpreter-tested; off until a GPU session runs its
# tests and times it (session 30: no device could be had).
FOLD_SWAP = False


def fold_gemm_chosen(M: int, mode: int, group_size: int, scale_slots: int = 0) -> bool:
    """Whether FOLD_POLICY sends this call (CUDA, inputs the kernel supports) to the fold GEMM."""
    if FOLD_POLICY == "never" or mode not in (MODE_CHANNEL, MODE_GROUP) or M < 2:
        return False
    if mode == MODE_GROUP and scale_slots != 1:
        return False
    if FOLD_POLICY == "always":
        return True
    return M >= (2 * FOLD_MIN_M if mode == MODE_GROUP and group_size == -1 else FOLD_MIN_M)


# 2 <= M <= 8 in modes 1/2 runs the MMA batch kernel (kernels/int4_mma_batch.py: the code words feed mma.sync
# from registers with the batch rows as B's columns) under MMA_BATCH_POLICY: "auto" (2 <= M <= MMA_BATCH_AUTO_MAX_M),
# "all" (1 <= M <= 16, everything it runs: for comparisons) or "never" (this file's tensor-core tile). Measured on
# the H100 (bench/NOTES-kernels.md, session 12), µs per 7B layer at g128, same call, modes 2 / 1: M = 4 68.5 / 70.0
# against the tile's 83.6 / 72.3; M = 16 (two chains) 114.1 / 108.2 against 86.8 / 73.9; M = 1 65.2 / 69.9 against
# the MMA GEMV's 59.7 / 61.3.
MMA_BATCH_POLICY = "auto"
MMA_BATCH_AUTO_MAX_M = 8


def mma_batch_chosen(M: int, mode: int, group_size: int) -> bool:
    """Whether MMA_BATCH_POLICY sends this call (CUDA, inputs the kernel supports) to the MMA batch kernel."""
    lo, hi = {"auto": (2, MMA_BATCH_AUTO_MAX_M), "all": (1, MMA_BATCH_MAX_M)}.get(MMA_BATCH_POLICY, (1, 0))
    return lo <= M <= hi and mode in (MODE_CHANNEL, MODE_GROUP) and group_size in (-1, 128)


GEMV_MAX_M = 1  # measured (session 2): at M = 4 the per-row x loads and FMAs make a GEMV 2x slower than mma


def autotuned_kernel(M: int, N: int, K: int, mode: int, group_size: int, scale_slots: int = 0) -> str:
    """The kernel int4_matmul runs on CUDA without a config, for inputs that kernel supports (else the next
    one): "mma gemv", "mma alpha", "mma batch", "mma alpha batch", "fold", "gemv" (this file's decode GEMV) or
    "tensor-core" (this file's tile)."""
    if mma_batch_chosen(M, mode, group_size):
        return "mma batch"
    if mma_alpha_chosen(M, mode, group_size):
        return "mma alpha"
    if mma_batch_alpha_chosen(M, mode, group_size):
        return "mma alpha batch"
    if mma_gemv_chosen(M, mode, group_size):
        return "mma gemv"
    if fold_gemm_chosen(M, mode, group_size, scale_slots):
        return "fold"
    return "gemv" if M <= GEMV_MAX_M else "tensor-core"
INTERPRET_GEMV_CONFIG = {"BLOCK_N": 16, "SPLIT_K": 1, "PREFETCH": 1, "STAGES": 1}


def _prune_gemv(configs, named_args, **kwargs):
    """The mode's list; K blocks that tile K exactly (x loads are 16-byte vectors only then), if any do."""
    mode = kwargs.get("MODE", named_args.get("MODE"))
    mine = GEMV_ALPHA_CONFIGS if mode == MODE_ALPHA else GEMV_CONFIGS
    configs = [c for c in configs if any(c is m for m in mine)]
    even = [c for c in configs if named_args["K"] % c.kwargs["BLOCK_K"] == 0]
    return even or configs


@triton.jit
def _lop3_f32(v, MASK: tl.constexpr, MAGIC: tl.constexpr, FAST: tl.constexpr):
    """(v & MASK) | MAGIC as float32 bits: one LOP3 on the GPU (ptxas emits two for the plain ops)."""
    if FAST:
        r = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
            [v, tl.full(v.shape, MASK, tl.int32), tl.full(v.shape, MAGIC, tl.int32)],
            dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = (v & MASK) | MAGIC
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _nibbles_offset(w, FAST: tl.constexpr):
    """w [BN, BKW] int32 -> v_i = off_i + Q_i (float32, exact), off = 16 (even i) / 256 (odd i)."""
    w3 = w << 3
    w11 = w << 11
    w5 = w >> 5
    rot = (w << 19) | (w.to(tl.uint32, bitcast=True) >> 13).to(tl.int32, bitcast=True)
    # 0x41800000 = bits of 16.0 (mantissa bit 19 weighs 1), 0x43800000 = bits of 256.0 (bit 15 weighs 1)
    v0 = _lop3_f32(rot, 0xF << 19, 0x41800000, FAST)
    v1 = _lop3_f32(w11, 0xF << 15, 0x43800000, FAST)
    v2 = _lop3_f32(w11, 0xF << 19, 0x41800000, FAST)
    v3 = _lop3_f32(w3, 0xF << 15, 0x43800000, FAST)
    v4 = _lop3_f32(w3, 0xF << 19, 0x41800000, FAST)
    v5 = _lop3_f32(w5, 0xF << 15, 0x43800000, FAST)
    v6 = _lop3_f32(w5, 0xF << 19, 0x41800000, FAST)
    v7 = _lop3_f32(rot, 0xF << 15, 0x43800000, FAST)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _bit_f32(u, J: tl.constexpr, FAST: tl.constexpr):
    """2**(4-J) + bit 19+J of u (float32, exact): the bit is the top of the mantissa of 2**(4-J)."""
    return _lop3_f32(u, 1 << (19 + J), (127 + 4 - J) << 23, FAST)


@triton.jit
def _x_words(x_ptr, k0, offs_w, K, EVEN_K: tl.constexpr, X_VEC: tl.constexpr):
    """x[k0 + 8w + i] for the tile's word indices w (any shape), i = 0..7 (float32, 0 past K).

    X_VEC (GPU, 16-byte aligned x, K a multiple of the block): the 8 values of a word are one
    16-byte load per word column (two for float32 x) instead of eight 2-byte gathers.
    """
    p = x_ptr + k0 + offs_w * 8
    if X_VEC:
        if x_ptr.dtype.element_ty == tl.float32:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(
                "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [p],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
            b0, b1, b2, b3 = tl.inline_asm_elementwise(
                "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [p + 4],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
            return (a0.to(tl.float32, bitcast=True), a1.to(tl.float32, bitcast=True),
                    a2.to(tl.float32, bitcast=True), a3.to(tl.float32, bitcast=True),
                    b0.to(tl.float32, bitcast=True), b1.to(tl.float32, bitcast=True),
                    b2.to(tl.float32, bitcast=True), b3.to(tl.float32, bitcast=True))
        else:
            h0, h1, h2, h3 = tl.inline_asm_elementwise(
                "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [p],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
            return (_half_f32(h0, 0, x_ptr.dtype.element_ty), _half_f32(h0, 1, x_ptr.dtype.element_ty),
                    _half_f32(h1, 0, x_ptr.dtype.element_ty), _half_f32(h1, 1, x_ptr.dtype.element_ty),
                    _half_f32(h2, 0, x_ptr.dtype.element_ty), _half_f32(h2, 1, x_ptr.dtype.element_ty),
                    _half_f32(h3, 0, x_ptr.dtype.element_ty), _half_f32(h3, 1, x_ptr.dtype.element_ty))
    else:
        return (_x_gather(p, k0, offs_w, K, 0, EVEN_K), _x_gather(p, k0, offs_w, K, 1, EVEN_K),
                _x_gather(p, k0, offs_w, K, 2, EVEN_K), _x_gather(p, k0, offs_w, K, 3, EVEN_K),
                _x_gather(p, k0, offs_w, K, 4, EVEN_K), _x_gather(p, k0, offs_w, K, 5, EVEN_K),
                _x_gather(p, k0, offs_w, K, 6, EVEN_K), _x_gather(p, k0, offs_w, K, 7, EVEN_K))


@triton.jit
def _half_f32(h, HI: tl.constexpr, DT: tl.constexpr):
    """16-bit value HI (0: low half, 1: high half) of the int32 h -> float32."""
    if DT == tl.bfloat16:  # bf16 is the top half of a float32
        if HI:
            return (h & -65536).to(tl.float32, bitcast=True)
        else:
            return (h << 16).to(tl.float32, bitcast=True)
    else:
        if HI:
            b = (h >> 16).to(tl.int16)
        else:
            b = h.to(tl.int16)
        return b.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _x_gather(p, k0, offs_w, K, I: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K:
        xv = tl.load(p + I)
    else:
        xv = tl.load(p + I, mask=k0 + offs_w * 8 + I < K, other=0.0)
    return xv.to(tl.float32)


@triton.jit
def _group_params(kb, num_kb, GPI: tl.constexpr, g_offs, G, z_rows, stride_zg, s_rows, stride_s_g,
                  FAST: tl.constexpr):
    """Zero points and scales [BN, GPI, 1] of K block kb's groups (kb clamped to the last block)."""
    g = (tl.minimum(tl.minimum(kb, num_kb - 1) * GPI + g_offs, G - 1))[None, :, None]
    return _load_f32(z_rows + g * stride_zg, FAST), _load_f32(s_rows + g * stride_s_g, FAST)


@triton.jit
def _nibble_step(acc, kb, w_nx, z_nx, s_nx, num_kb, q_tile, x_ptr, K, G, KW, words, g_offs, z_rows, stride_zg,
                 s_rows, stride_s_g,
                 GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, GPI: tl.constexpr, EVEN_K: tl.constexpr,
                 X_VEC: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr, PIPE: tl.constexpr):
    """K block kb (GPI whole groups): acc [BN, GPI, GW] += s_g * x . (Q - z_g) per word.

    w_nx / z_nx / s_nx: block kb's code tile and its groups' zero points / scales ([BN, GPI, 1]),
    loaded one block ahead (PREFETCH); returned for block kb + 1. PIPE: the compiler pipelines
    the code tile (w_nx is then unused).
    """
    BKW: tl.constexpr = BLOCK_K // 8
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0
    k0 = kb * BLOCK_K
    z = z_nx  # (one group: loaded once, before the loop)
    s = s_nx
    if PIPE:  # the code tile: a plain load, software-pipelined by the compiler (cp.async into shared
        # memory); zero points / scales: registers, one block ahead (as plain loads they would pull
        # the tile's arithmetic into their own, row-major layout)
        w = _code_tile(q_tile, kb, words, KW, BKW, EVEN_K)
        if not ONE_GROUP:
            z_nx, s_nx = _group_params(kb + 1, num_kb, GPI, g_offs, G, z_rows, stride_zg, s_rows, stride_s_g, FAST)
    elif PREFETCH:  # registers double-buffer the code tile and its groups' scales / zero points
        w = w_nx
        nxt = tl.minimum(kb + 1, num_kb - 1)
        w_nx = _code_tile(q_tile, nxt, words, KW, BKW, EVEN_K)
        if not ONE_GROUP:
            z_nx, s_nx = _group_params(nxt, num_kb, GPI, g_offs, G, z_rows, stride_zg, s_rows, stride_s_g, FAST)
    else:
        w = _code_tile(q_tile, kb, words, KW, BKW, EVEN_K)
        if not ONE_GROUP:
            z, s = _group_params(kb, num_kb, GPI, g_offs, G, z_rows, stride_zg, s_rows, stride_s_g, FAST)
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_words(x_ptr, k0, words, K, EVEN_K, X_VEC)  # [GPI, GW] each
    odd = (x1 + x3) + (x5 + x7)
    even = (x0 + x2) + (x4 + x6)
    x_sum = odd + even  # X_w
    c = odd * 256.0 + even * 16.0  # the offsets' share of x . v
    v0, v1, v2, v3, v4, v5, v6, v7 = _nibbles_offset(w, FAST)
    part = (-z) * x_sum[None, :, :] - c[None, :, :]  # [BN, GPI, GW]
    part += v0 * x0[None, :, :]
    part += v1 * x1[None, :, :]
    part += v2 * x2[None, :, :]
    part += v3 * x3[None, :, :]
    part += v4 * x4[None, :, :]
    part += v5 * x5[None, :, :]
    part += v6 * x6[None, :, :]
    part += v7 * x7[None, :, :]  # = x_w . (Q_w - z)
    if ONE_GROUP:
        acc += part
    else:
        acc += part * s
    return acc, w_nx, z_nx, s_nx


@triton.jit
def _code_tile(q_tile, kb, words, KW, BKW: tl.constexpr, EVEN_K: tl.constexpr):
    """The [BN, GPI, GW] int32 code tile of K block kb (masked past the padded row when K is ragged).

    Loaded as [BN, BKW] (the lanes of a warp run along K: up to 512 contiguous bytes of a row per
    load instruction) and viewed as [BN, GPI, GW] in registers.
    """
    BN: tl.constexpr = q_tile.shape[0]
    GPI: tl.constexpr = words.shape[0]
    GW: tl.constexpr = words.shape[1]
    if EVEN_K:
        w = tl.load(q_tile + kb * BKW, eviction_policy="evict_first")
    else:
        w = tl.load(q_tile + kb * BKW, mask=(kb * BKW + tl.arange(0, BKW) < KW)[None, :], other=0,
                    eviction_policy="evict_first")
    return tl.reshape(w, [BN, GPI, GW])


@triton.jit
def _gemv_nibble_loop(acc, kb_lo, kb_hi, num_kb, q_tile, x_ptr, K, G, KW, words, g_offs, offs_n, zero_ptr, stride_zg,
                      s_rows, stride_s_g,
                      GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, GPI: tl.constexpr, EVEN_K: tl.constexpr,
                      X_VEC: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr):
    """acc [BN, GPI, GW] += s_g * x_g . (Q_g - z_g) per word over K blocks [kb_lo, kb_hi).

    s_rows [BN, 1, 1]: the rows' scales of group 0 (group g at + g * stride_s_g; rows clamped into
    the table); unused for one group.
    """
    BKW: tl.constexpr = BLOCK_K // 8
    kb_first = tl.minimum(kb_lo, num_kb - 1)
    z_rows = zero_ptr + offs_n[:, None, None]  # [BN, 1, 1] (padded)
    if GROUP_SIZE <= 0:
        g = 0
    else:
        g = (tl.minimum(kb_first * GPI + g_offs, G - 1))[None, :, None]
    z_nx = _load_f32(z_rows + g * stride_zg, FAST)
    s_nx = _load_f32(s_rows + g * stride_s_g, FAST)
    if FAST and STAGES > 1:  # the compiler pipelines the loads, STAGES - 1 blocks ahead
        for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES):
            acc, _, z_nx, s_nx = _nibble_step(acc, kb, z_nx, z_nx, s_nx, num_kb, q_tile, x_ptr, K, G, KW, words,
                                              g_offs, z_rows, stride_zg, s_rows, stride_s_g,
                                              GROUP_SIZE, BLOCK_K, GPI, EVEN_K, X_VEC, FAST, PREFETCH, True)
        return acc
    w_nx = _code_tile(q_tile, kb_first, words, KW, BKW, EVEN_K)
    if FAST:  # a for loop: the compiler keeps the prefetched vectors in the tile's row layout
        for kb in range(kb_lo, kb_hi):
            acc, w_nx, z_nx, s_nx = _nibble_step(acc, kb, w_nx, z_nx, s_nx, num_kb, q_tile, x_ptr, K, G, KW, words,
                                                 g_offs, z_rows, stride_zg, s_rows, stride_s_g,
                                                 GROUP_SIZE, BLOCK_K, GPI, EVEN_K, X_VEC, FAST, PREFETCH, False)
    else:  # the interpreter (numpy >= 2.3) cannot range() over tensor bounds
        kb = kb_lo
        while kb < kb_hi:
            acc, w_nx, z_nx, s_nx = _nibble_step(acc, kb, w_nx, z_nx, s_nx, num_kb, q_tile, x_ptr, K, G, KW, words,
                                                 g_offs, z_rows, stride_zg, s_rows, stride_s_g,
                                                 GROUP_SIZE, BLOCK_K, GPI, EVEN_K, X_VEC, FAST, PREFETCH, False)
            kb += 1
    return acc


@triton.jit
def _plane_step(acc, kb, w_nx, num_kb, q_tile, x_ptr, K, G, KW, words, g_offs, a_rows, b_rows,
                stride_aj, stride_ag, stride_bg,
                BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, GPI: tl.constexpr,
                EVEN_K: tl.constexpr, X_VEC: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr):
    """K block kb, AlphaTuning row: acc [BN, GPI, GW] += sum_j 2 alpha_j B_j + (beta - sum_j alpha_j) X_w.

    B_j = x . bit_j(Q) per word: each nibble moved to bits 19..22, where bit j alone is the
    float 2**(4-j) + bit_j(Q) (exact); the offsets leave through the chain's initial value.
    """
    BKW: tl.constexpr = BLOCK_K // 8
    k0 = kb * BLOCK_K
    if GROUP_SIZE <= 0:
        g = 0
    else:
        g = (tl.minimum(kb * GPI + g_offs, G - 1))[None, :, None]
    if PREFETCH:
        w = w_nx
        w_nx = _code_tile(q_tile, tl.minimum(kb + 1, num_kb - 1), words, KW, BKW, EVEN_K)
    else:
        w = _code_tile(q_tile, kb, words, KW, BKW, EVEN_K)
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_words(x_ptr, k0, words, K, EVEN_K, X_VEC)
    x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    coef = _load_f32(b_rows + g * stride_bg, FAST)  # [BN, GPI, 1] -> beta - sum_j alpha_j
    u0 = w << 19  # nibble i at bits 19..22
    u1 = w << 15
    u2 = w << 11
    u3 = w << 7
    u4 = w << 3
    u5 = w >> 1
    u6 = w >> 5
    u7 = w >> 9
    for j in tl.static_range(BITS):  # bit 19+j of u_i, or-ed into 2**(4-j) (where that bit weighs 1)
        plane = _bit_f32(u0, j, FAST) * x0[None, :, :] - (x_sum * (2.0 ** (4 - j)))[None, :, :]
        plane += _bit_f32(u1, j, FAST) * x1[None, :, :]
        plane += _bit_f32(u2, j, FAST) * x2[None, :, :]
        plane += _bit_f32(u3, j, FAST) * x3[None, :, :]
        plane += _bit_f32(u4, j, FAST) * x4[None, :, :]
        plane += _bit_f32(u5, j, FAST) * x5[None, :, :]
        plane += _bit_f32(u6, j, FAST) * x6[None, :, :]
        plane += _bit_f32(u7, j, FAST) * x7[None, :, :]  # [BN, GPI, GW] = B_j per word
        a = _load_f32(a_rows + j * stride_aj + g * stride_ag, FAST)  # [BN, GPI, 1]
        coef -= a
        acc += plane * (2.0 * a)
    acc += coef * x_sum[None, :, :]
    return acc, w_nx


@triton.jit
def _gemv_plane_loop(acc, kb_lo, kb_hi, num_kb, q_tile, x_ptr, N, K, G, KW, words, g_offs, offs_n, arow,
                     alpha_ptr, beta_ptr, stride_as, stride_aj, stride_an, stride_ag, stride_bs, stride_bn, stride_bg,
                     BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, GPI: tl.constexpr,
                     EVEN_K: tl.constexpr, X_VEC: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr,
                     STAGES: tl.constexpr):
    """AlphaTuning row over K blocks [kb_lo, kb_hi) (see _plane_step)."""
    BKW: tl.constexpr = BLOCK_K // 8
    rows = tl.minimum(offs_n, N - 1)[:, None, None]  # rows past N read row N-1 (never stored): no masks
    a_rows = alpha_ptr + arow * stride_as + rows * stride_an  # [BN, 1, 1], plane 0, group 0
    b_rows = beta_ptr + arow * stride_bs + rows * stride_bn
    w_nx = _code_tile(q_tile, tl.minimum(kb_lo, num_kb - 1), words, KW, BKW, EVEN_K)
    if FAST and STAGES > 1:  # (no register prefetch: the compiler pipelines the code tile)
        for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES):
            acc, _ = _plane_step(acc, kb, w_nx, num_kb, q_tile, x_ptr, K, G, KW, words, g_offs, a_rows, b_rows,
                                 stride_aj, stride_ag, stride_bg, BITS, GROUP_SIZE, BLOCK_K, GPI, EVEN_K, X_VEC,
                                 FAST, False)
    elif FAST:
        for kb in range(kb_lo, kb_hi):
            acc, w_nx = _plane_step(acc, kb, w_nx, num_kb, q_tile, x_ptr, K, G, KW, words, g_offs, a_rows, b_rows,
                                    stride_aj, stride_ag, stride_bg, BITS, GROUP_SIZE, BLOCK_K, GPI, EVEN_K, X_VEC,
                                    FAST, PREFETCH)
    else:
        kb = kb_lo
        while kb < kb_hi:
            acc, w_nx = _plane_step(acc, kb, w_nx, num_kb, q_tile, x_ptr, K, G, KW, words, g_offs, a_rows, b_rows,
                                    stride_aj, stride_ag, stride_bg, BITS, GROUP_SIZE, BLOCK_K, GPI, EVEN_K, X_VEC,
                                    FAST, PREFETCH)
            kb += 1
    return acc


@triton.jit(do_not_specialize=[*ROW_INDEX_ARGS, "alpha_idx_ptr"])
def _gemv_int4_kernel(
    x_ptr, y_ptr, bias_ptr,  # x [K] (one row), y [N], bias [N]
    q_ptr, zero_ptr, s0_ptr,  # codes_t as int32 [N_pad, KW = Kh_pad/4], zeros_t / scales_t [G, N_pad] f32
    chan_ptr, scale_ptr, alpha_ptr, beta_ptr,
    chan_idx_ptr, scale_idx_ptr, alpha_idx_ptr,  # the row's slots (one element each)
    ws_ptr, cnt_ptr,  # split-K workspace [SPLIT_K, N] f32, per-column-tile arrival counters (zero)
    N, K, G,
    stride_qn, stride_zg, stride_cs,
    stride_ss, stride_sn, stride_sg,
    stride_as, stride_aj, stride_an, stride_ag,
    stride_bs, stride_bn, stride_bg,
    MODE: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ZEROS: tl.constexpr, X_ALIGNED: tl.constexpr, FAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
    STAGES: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
):
    """y[n] for the one row, one program per (column tile, K split); K blocks of GPI whole groups.

    EVEN_K (K % BLOCK_K == 0, set by the heuristic below) drops every mask; X_ALIGNED (16-byte
    aligned x) allows the x loads as 16-byte vectors where K is even too.
    """
    X_VEC: tl.constexpr = X_ALIGNED and EVEN_K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    GW: tl.constexpr = (GROUP_SIZE if GROUP_SIZE > 0 else 128) // 8  # words per group (per 128 codes for -1)
    GPI: tl.constexpr = BLOCK_K // (GW * 8)  # groups per K block
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    g_offs = tl.arange(0, GPI)
    words = g_offs[:, None] * GW + tl.arange(0, GW)[None, :]  # [GPI, GW] word index inside the block
    n_ok = offs_n < N
    q_tile = q_ptr + offs_n[:, None] * stride_qn + tl.arange(0, BLOCK_K // 8)[None, :]  # [BN, BKW] (rows padded)

    num_kb = tl.cdiv(K, BLOCK_K)
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)
    if PDL:  # while the previous kernel finishes: this program's first two code blocks into L2
        LINES: tl.constexpr = (BLOCK_K + 127) // 128  # 128-byte lines a row has in two blocks
        word = kb_lo * (BLOCK_K // 8) + tl.arange(0, LINES)[None, :] * 32  # [1, LINES]
        prefetch_l2(q_ptr + offs_n[:, None] * stride_qn + word, (word < stride_qn) & (kb_lo < kb_hi))
    wait_for_producer(PDL)  # x, the row's slots and its tables may come from the previous kernel

    cidx = tl.load(chan_idx_ptr).to(tl.int64)
    sidx = tl.load(scale_idx_ptr).to(tl.int64)
    aidx = tl.load(alpha_idx_ptr)
    is_alpha = aidx >= 0
    acc = tl.zeros([BLOCK_N, GPI, GW], dtype=tl.float32)
    if MODE == 1:
        s_rows = s0_ptr + offs_n[:, None, None]  # [BN, 1, 1] (padded)
        stride_s_g = stride_zg
    else:
        s_rows = scale_ptr + sidx * stride_ss + tl.minimum(offs_n, N - 1)[:, None, None] * stride_sn
        stride_s_g = stride_sg
    if MODE == 3:
        if is_alpha:
            acc = _gemv_plane_loop(acc, kb_lo, kb_hi, num_kb, q_tile, x_ptr, N, K, G, stride_qn, words, g_offs,
                                   offs_n, tl.maximum(aidx, 0).to(tl.int64), alpha_ptr, beta_ptr,
                                   stride_as, stride_aj, stride_an, stride_ag, stride_bs, stride_bn, stride_bg,
                                   BITS, GROUP_SIZE, BLOCK_K, GPI, EVEN_K, X_VEC, FAST, PREFETCH, STAGES)
        elif HAS_ZEROS:  # a PEQA row in a mode-3 batch: the group-scale (mode 2) math
            acc = _gemv_nibble_loop(acc, kb_lo, kb_hi, num_kb, q_tile, x_ptr, K, G, stride_qn, words, g_offs, offs_n,
                                    zero_ptr, stride_zg, s_rows, stride_s_g,
                                    GROUP_SIZE, BLOCK_K, GPI, EVEN_K, X_VEC, FAST, PREFETCH, STAGES)
    else:
        acc = _gemv_nibble_loop(acc, kb_lo, kb_hi, num_kb, q_tile, x_ptr, K, G, stride_qn, words, g_offs, offs_n,
                                zero_ptr, stride_zg, s_rows, stride_s_g,
                                GROUP_SIZE, BLOCK_K, GPI, EVEN_K, X_VEC, FAST, PREFETCH, STAGES)

    # reduce over K, then the linear epilogue factors (they commute with the split-K sum)
    y = tl.sum(tl.sum(acc, 2), 1)  # [BN]
    if MODE == 3:
        peqa_ok = n_ok & (aidx < 0)  # alpha rows take neither the group scale nor chan
    else:
        peqa_ok = n_ok
    if ONE_GROUP:
        if MODE == 1:
            y *= tl.load(s0_ptr + offs_n)
        else:
            s = tl.load(scale_ptr + sidx * stride_ss + offs_n * stride_sn, mask=peqa_ok, other=1.0)
            y *= s.to(tl.float32)
    chan = tl.load(chan_ptr + cidx * stride_cs + offs_n, mask=peqa_ok, other=1.0).to(tl.float32)
    y *= chan
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        # park the partial; the last split to arrive at this column tile sums them in fixed order
        tl.store(ws_ptr + pid_k * N + offs_n, y, mask=n_ok)
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + sk * N + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=n_ok)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next launch (and CUDA-graph replays)


_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "MODE", "GROUP_SIZE", "BITS", "HAS_BIAS", "HAS_ZEROS", "FAST", "INTERPRET"]  # + x dtype (added by triton)


# cache_results: the choice per key is kept on disk beside triton's compile cache
_decode_kernel = triton.autotune(configs=DECODE_CONFIGS, key=_AUTOTUNE_KEY, do_bench=quick_bench,
                                 cache_results=True,
                                 prune_configs_by={"early_config_prune": _prune_decode})(_adapted_int4_kernel)
_gemm_kernel = triton.autotune(configs=GEMM_CONFIGS, key=_AUTOTUNE_KEY, do_bench=quick_bench, cache_results=True,
                               prune_configs_by={"early_config_prune": _prune_gemm})(_adapted_int4_kernel)
DECODE_MAX_M = 64
_GEMV_KEY = ["N", "K", "MODE", "GROUP_SIZE", "BITS", "HAS_BIAS", "HAS_ZEROS", "X_ALIGNED"]  # + x dtype
_gemv_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_gemv_int4_kernel)
_gemv_kernel = triton.autotune(configs=GEMV_CONFIGS + GEMV_ALPHA_CONFIGS, key=_GEMV_KEY, do_bench=quick_bench,
                               cache_results=True,
                               prune_configs_by={"early_config_prune": _prune_gemv})(_gemv_even_k)


def autotuners() -> dict:
    """The int4 kernels' autotuners by the names autotuned_kernel gives them; "tensor-core" is this file's tile,
    whose M <= DECODE_MAX_M and larger launches tune apart ("decode", "gemm"). For benches that report picks."""
    from . import int4_gemm, int4_mma_alpha, int4_mma_batch, int4_mma_gemv

    return {"mma gemv": int4_mma_gemv._tuned, "mma gemv accum": int4_mma_gemv._tuned_accum,
            "mma alpha": int4_mma_alpha._tuned, "mma alpha batch": int4_mma_alpha._tuned_batch,
            "mma batch": int4_mma_batch._tuned, "fold": int4_gemm._tuned,
            "gemv": _gemv_kernel, "decode": _decode_kernel, "gemm": _gemm_kernel}


# --- host side -------------------------------------------------------------------------------


@dataclass
class Int4Weights:
    """The shared base of one linear in kernel layout (see the module docstring)."""

    codes_t: torch.Tensor  # [N_pad, Kh_pad] uint8
    zeros_t: torch.Tensor | None  # [G, N_pad] float32 (None on a bcq base)
    scales_t: torch.Tensor | None  # [G, N_pad] float32 base scales s0 (None on a bcq base)
    N: int
    K: int
    group_size: int
    bits: int

    @property
    def num_groups(self) -> int:
        return 1 if self.group_size == -1 else math.ceil(self.K / self.group_size)


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def repack(packed: torch.Tensor, K: int, zeros: torch.Tensor | None, scales: torch.Tensor | None,
           group_size: int, bits: int = 4) -> Int4Weights:
    """packed [N, ceil(K/2)] uint8 (quant.pack_int4), zeros/scales [N, G] -> Int4Weights."""
    N, Kh = packed.shape
    if Kh != (K + 1) // 2:
        raise ValueError(f"packed codes have {Kh} bytes per row; K={K} needs {(K + 1) // 2}")
    if group_size not in (-1, 32, 64, 128):
        raise ValueError(f"group size must be -1, 32, 64 or 128, got {group_size}")
    dev = packed.device
    codes_t = torch.zeros(_round_up(N, N_ALIGN), _round_up(Kh, KH_ALIGN), dtype=torch.uint8, device=dev)
    codes_t[:N, :Kh] = packed
    zeros_t = scales_t = None
    G = 1 if group_size == -1 else math.ceil(K / group_size)
    if zeros is not None:
        if zeros.shape != (N, G) or scales is None or scales.shape != (N, G):
            raise ValueError(f"zeros/scales must be [N, G] = [{N}, {G}]")
        zeros_t = torch.zeros(G, codes_t.shape[0], dtype=torch.float32, device=dev)
        scales_t = torch.zeros_like(zeros_t)
        zeros_t[:, :N] = zeros.t().float()
        scales_t[:, :N] = scales.t().float()
    return Int4Weights(codes_t, zeros_t, scales_t, N, K, group_size, bits)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_counters: dict[tuple[torch.device, str], torch.Tensor] = {}


def _tile_counters(device: torch.device, path: str = "tc") -> torch.Tensor:
    """Per-tile arrival counters for split-K, zero between launches (each launch resets its own).

    One array per kernel family ("tc", "gemv", "mma", "fold"), so none can ever see the other's counts.
    """
    key = (torch.device(device), path)
    if key not in _counters:
        _counters[key] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _counters[key]


def int4_matmul(
    x: torch.Tensor,  # [M, K] fp16 / bf16 / fp32
    w: Int4Weights,
    chan: torch.Tensor,  # [Sc, N]
    scales: torch.Tensor | None,  # [Sg, N, G]
    alphas: torch.Tensor | None,  # [Sa, b, N, G]
    betas: torch.Tensor | None,  # [Sa, N, G]
    chan_idx: torch.Tensor,  # [M] int32
    scale_idx: torch.Tensor,  # [M] int32
    alpha_idx: torch.Tensor,  # [M] int32, -1 = PEQA row
    mode: int,
    bias: torch.Tensor | None = None,  # [N]
    config: dict | None = None,
    out: torch.Tensor | None = None,  # [M, N] x.dtype, contiguous rows (written; read only to accumulate)
    scale_slots: int = 0,  # distinct scale_idx values among the rows, if the caller knows (0: unknown)
    silu_gate: bool = False,  # a fused gate / up projection: y [M, N / 2] = silu(y[:, :N/2]) * y[:, N/2:]
    norm_in: tuple[torch.Tensor, float] | None = None,  # (h [1, K], eps): x = round(h * g), y *= rsqrt(mean(h^2)+eps)
    accumulate: bool = False,  # out holds the residual stream: out = round(out + y)
    norm_out: tuple[torch.Tensor, torch.Tensor] | None = None,  # (g [N], xg [1, N]): also xg = round(y * g)
) -> torch.Tensor:
    """y [M, N] in x.dtype; the adapted_linear_ref semantics. Tables may have any strides.

    silu_gate: the first N / 2 output columns gate the rest, y [M, N / 2] = silu(gate) * up (each rounded to
    x.dtype first); the MMA GEMV does it in its epilogue, other paths through kernels.fused.silu_mul.

    norm_in, accumulate, norm_out: the RMSNorms around a projection, run in the one-row MMA GEMV's epilogue
    (kernels.int4_mma_gemv.launch_mma_gemv has their semantics); a call that asks for them must be one that
    kernel takes (mma_gemv_takes: M = 1, modes 1/2, ...; on CPU tensors the interpreter runs it).

    `mode` is the host hint (1 channel, 2 group, 3 alpha; see the module docstring); a bcq base
    (w.zeros_t is None) always runs mode 3. `config` (BLOCK_M, BLOCK_N, SPLIT_K, optional
    num_warps / num_stages) bypasses the autotuner; {"MMA": 1, BLOCK_N, SPLIT_K, DEPTH} forces the MMA
    GEMV (kernels/int4_mma_gemv.py); on CPU tensors (TRITON_INTERPRET=1) a small fixed config is the default.
    """
    M, K = x.shape
    N = w.N
    if K != w.K:
        raise ValueError(f"x has K={K}, the weight K={w.K}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if mode not in (MODE_CHANNEL, MODE_GROUP, MODE_ALPHA):
        raise ValueError(f"mode must be 1, 2 or 3, got {mode}")
    has_zeros = w.zeros_t is not None
    if not has_zeros:
        mode = MODE_ALPHA
    if mode == MODE_GROUP and scales is None:
        raise ValueError("mode 2 needs the group-scale table")
    if mode == MODE_ALPHA and (alphas is None or betas is None):
        raise ValueError("mode 3 needs the alpha and beta tables")
    if chan.shape[-1] != N or chan.stride(-1) != 1:
        raise ValueError("chan must be [Sc, N] with unit stride along N")
    for idx in (chan_idx, scale_idx, alpha_idx):
        if idx.shape != (M,) or idx.dtype != torch.int32:
            raise ValueError("row indices must be int32 [M]")
    # the kernels index the row slots as dense vectors (older callers may hand strided views)
    chan_idx, scale_idx, alpha_idx = chan_idx.contiguous(), scale_idx.contiguous(), alpha_idx.contiguous()
    x = x.contiguous()
    if silu_gate and N % 2:
        raise ValueError(f"silu_gate needs an even N (gate rows, then as many up rows), got {N}")
    n_out = N // 2 if silu_gate else N
    if out is not None:
        if out.shape != (M, n_out) or out.dtype != x.dtype or out.stride(1) != 1:
            raise ValueError(f"out must be [{M}, {n_out}] {x.dtype} with unit stride along N")
        y = out
    else:
        y = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    interpret = x.device.type == "cpu"
    fast = (not interpret) and x.dtype in (torch.float16, torch.bfloat16)
    block_k = 128 if w.group_size == -1 else w.group_size

    dummy = w.codes_t  # any tensor for unused pointers
    zeros_t = w.zeros_t if has_zeros else dummy
    scales_t = w.scales_t if has_zeros else dummy
    st = scales if scales is not None else None
    s_args = (st, st.stride(0), st.stride(1), st.stride(2)) if st is not None else (dummy, 0, 0, 0)
    if alphas is not None and betas is not None:
        a_args = (alphas, alphas.stride(0), alphas.stride(1), alphas.stride(2), alphas.stride(3))
        b_args = (betas, betas.stride(0), betas.stride(1), betas.stride(2))
    else:
        a_args = (dummy, 0, 0, 0, 0)
        b_args = (dummy, 0, 0, 0)
    kernel = autotuned_kernel(M, N, K, mode, w.group_size, scale_slots) if config is None and not interpret else None
    auto_mma = kernel == "mma gemv" and mma_gemv_supported(x, N, mode, w.group_size, has_zeros)
    forced_mma = config is not None and config.get("MMA")
    norms = norm_in is not None or accumulate or norm_out is not None
    if norms:
        if accumulate and out is None:
            raise ValueError("accumulate adds into out (the residual stream): pass it")
        if not (forced_mma or auto_mma or (interpret and config is None
                                           and mma_gemv_supported(x, N, mode, w.group_size, has_zeros))):
            raise ValueError("norm_in / accumulate / norm_out run in the one-row MMA GEMV's epilogue, which does not "
                             f"take this call (M={M}, N={N}, K={K}, mode {mode}, group size {w.group_size}, "
                             f"{x.dtype}): ask mma_gemv_takes first")
    if mode == MODE_ALPHA and not silu_gate and not norms and (
            forced_mma or (kernel == "mma alpha" and mma_alpha_supported(x, w, alphas))):
        ws = torch.empty((config.get("SPLIT_K", 1) if config else MMA_ALPHA_MAX_SPLIT_K) * N, dtype=torch.float32,
                         device=x.device)
        return launch_mma_alpha(x, y, w, chan, st, alphas, betas, chan_idx, scale_idx, alpha_idx, bias, config, ws,
                                _tile_counters(x.device, "mma alpha"))
    # (a forced MMA config takes the SiLU epilogue whatever FUSE_SILU_GATE says: that is how the tests reach it)
    if forced_mma or ((auto_mma or norms) and (FUSE_SILU_GATE or not silu_gate)):
        ws = torch.empty((config.get("SPLIT_K", 1) if config else MMA_MAX_SPLIT_K) * N, dtype=torch.float32,
                         device=x.device)
        return launch_mma_gemv(x, y, w, chan, st, chan_idx, scale_idx, mode, bias, config, ws,
                               _tile_counters(x.device, "mma"), silu=silu_gate, norm_in=norm_in,
                               accumulate=accumulate, norm_out=norm_out)
    if silu_gate:  # the other paths write the projection, then one row-wise kernel gates it
        from .fused import silu_mul

        full = int4_matmul(x, w, chan, scales, alphas, betas, chan_idx, scale_idx, alpha_idx, mode, bias, config,
                           scale_slots=scale_slots, norm_in=norm_in)
        return silu_mul(full, out=y)
    if mode == MODE_ALPHA and ((config is not None and config.get("MMA_BATCH")) or (
            kernel == "mma alpha batch" and mma_batch_alpha_supported(x, w, alphas))):
        ws = torch.empty((config["SPLIT_K"] if config else MMA_BATCH_ALPHA_MAX_SPLIT_K) * M * N, dtype=torch.float32,
                         device=x.device)
        return launch_mma_batch_alpha(x, y, w, chan, st, alphas, betas, chan_idx, scale_idx, alpha_idx, bias, config,
                                      ws, _tile_counters(x.device, "mma alpha batch"))
    if (config is not None and config.get("MMA_BATCH")) or (
            kernel == "mma batch" and mma_batch_supported(x, N, mode, w.group_size, has_zeros)):
        ws = torch.empty((config["SPLIT_K"] if config else MMA_BATCH_MAX_SPLIT_K) * M * N, dtype=torch.float32,
                         device=x.device)
        return launch_mma_batch(x, y, w, chan, st, chan_idx, scale_idx, mode, bias, config, ws,
                                _tile_counters(x.device, "mma batch"))
    if (config is not None and config.get("FOLD")) or (
            kernel == "fold" and int4_gemm_supported(x, mode, w.group_size, has_zeros)):
        ws = torch.empty(workspace_numel(M, N, config), dtype=torch.float32, device=x.device)
        return launch_int4_gemm(x, y, w, chan, st, chan_idx, scale_idx, mode, bias, config, ws,
                                _tile_counters(x.device, "fold"), one_slot=FOLD_ONE_SLOT and scale_slots == 1,
                                swap=FOLD_SWAP)
    gemv = (config is None and M <= GEMV_MAX_M) or (config is not None and "BLOCK_M" not in config)
    if gemv:
        return _launch_gemv(x, y, w, chan, st, alphas, betas, chan_idx, scale_idx, alpha_idx, mode, bias, config,
                            has_zeros, interpret, s_args, a_args, b_args, dummy)
    max_split = MAX_SPLIT_K if M <= GEMM_SPLIT_MAX_M else 1
    if config is not None:
        max_split = config["SPLIT_K"]
    ws = torch.empty(max_split * M * N if max_split > 1 else 1, dtype=torch.float32, device=x.device)
    cnt = _tile_counters(x.device)

    args = (
        x, y, bias if bias is not None else dummy,
        w.codes_t, zeros_t, scales_t,
        chan, s_args[0], a_args[0], b_args[0],
        chan_idx, scale_idx, alpha_idx,
        ws, cnt,
        M, N, K, min(triton.next_power_of_2(M), 1024),
        x.stride(0), y.stride(0), w.codes_t.stride(0), w.zeros_t.stride(0) if has_zeros else 0,
        chan.stride(0),
        *s_args[1:], *a_args[1:], *b_args[1:],
    )
    dot_f32 = interpret or x.dtype == torch.float32  # the interpreter has no bf16 arithmetic
    meta = dict(MODE=mode, BITS=w.bits, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, HAS_ZEROS=has_zeros,
                FAST=fast, DT=tl.float32 if dot_f32 else _TL_DTYPE[x.dtype], PREC="ieee" if dot_f32 else None,
                MAGIC=(1024.0 if x.dtype == torch.float16 else 128.0) if fast else 0.0,
                CODE_MID=((1 << w.bits) - 1) / 2, BLOCK_K=block_k,
                INTERPRET=interpret, PAIRS=fast and mode == MODE_GROUP and _pairs_ok(st, N), **launch_kwargs(x))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is None and interpret:
        config = INTERPRET_CONFIG
    if config is not None:
        cfg = dict(config)
        if cfg["SPLIT_K"] > 1 and triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]) > _COUNTER_SLOTS:
            raise ValueError("too many tiles for the split-K counters")
        _adapted_int4_kernel[grid](*args, **meta, **cfg)
    elif M <= DECODE_MAX_M:
        _decode_kernel[grid](*args, **meta)
    else:
        _gemm_kernel[grid](*args, **meta)
    return y


def _pairs_ok(table: torch.Tensor | None, N: int) -> bool:
    """A group-scale table the tensor-core kernel may read two columns at a time (_table_tile)."""
    return table is not None and table.element_size() == 2 and N % 2 == 0 and column_pairs_readable(table)


def _launch_gemv(x, y, w, chan, scales, alphas, betas, chan_idx, scale_idx, alpha_idx, mode, bias, config,
                 has_zeros, interpret, s_args, a_args, b_args, dummy):
    """The decode GEMV: M = 1 by default; up to 4 rows (one launch each) when a GEMV config is forced."""
    M, K = x.shape
    N = w.N
    if M > 4:
        raise ValueError(f"the GEMV path takes at most 4 rows, got {M}")
    if config is None and interpret:
        config = INTERPRET_GEMV_CONFIG
    if config is not None and "BLOCK_K" not in config:  # two groups (or 256 codes) per K block
        config = {**config, "BLOCK_K": 2 * (w.group_size if w.group_size > 0 else 128)}
    max_split = config["SPLIT_K"] if config is not None else max(
        c.kwargs["SPLIT_K"] for c in GEMV_CONFIGS + GEMV_ALPHA_CONFIGS)
    if config is not None and config["SPLIT_K"] > 1 and triton.cdiv(N, config["BLOCK_N"]) > _COUNTER_SLOTS:
        raise ValueError("too many tiles for the split-K counters")
    ws = torch.empty(max_split * N if max_split > 1 else 1, dtype=torch.float32, device=x.device)
    cnt = _tile_counters(x.device, "gemv")
    q32 = w.codes_t.view(torch.int32)  # [N_pad, Kh_pad/4]: word w holds codes 8w..8w+7 (nibble i = code 8w+i)
    meta = dict(MODE=mode, BITS=w.bits, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, HAS_ZEROS=has_zeros,
                FAST=not interpret, **launch_kwargs(x))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    for m in range(M):  # rows run one after the other (stream order): ws and the counters are reused
        xm, ym = x[m], y[m]
        meta["X_ALIGNED"] = (not interpret) and xm.data_ptr() % 16 == 0  # for the 16-byte x loads
        args = (
            xm, ym, bias if bias is not None else dummy,
            q32, w.zeros_t if has_zeros else dummy, w.scales_t if has_zeros else dummy,
            chan, s_args[0], a_args[0], b_args[0],
            chan_idx[m:m + 1], scale_idx[m:m + 1], alpha_idx[m:m + 1],
            ws, cnt,
            N, K, w.num_groups,
            q32.stride(0), w.zeros_t.stride(0) if has_zeros else 0, chan.stride(0),
            *s_args[1:], *a_args[1:], *b_args[1:],
        )
        if config is not None:
            _gemv_even_k[grid](*args, **meta, **{"PREFETCH": 1, "STAGES": 1, **config})
        else:
            _gemv_kernel[grid](*args, **meta)
    return y


# --- QuantLinear entry point ------------------------------------------------------------------


@dataclass
class _KernelState:
    weights: Int4Weights
    device: torch.device
    n_major: dict  # table name -> (key, N-contiguous copy)


def _n_major(state: _KernelState, name: str, table: torch.Tensor | None) -> torch.Tensor | None:
    """[..., N, G] table -> the same values with unit stride along N (cached copy, or the table itself).

    The copy is keyed by the tensor's storage, shape and version counter: every in-place write
    (AdapterSlab.copy_into) bumps the version, so a new adapter in a slot is picked up at the next
    call. A slab allocated N-contiguous (stride 1 along N) is used as is, with no copy.
    """
    if table is None or table.stride(-2) == 1 or table.shape[-1] == 1:
        return table
    key = (table.data_ptr(), tuple(table.shape), table._version)
    hit = state.n_major.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    copy = table.transpose(-1, -2).contiguous().transpose(-1, -2)
    state.n_major[name] = (key, copy)
    return copy


def kernel_state(layer) -> _KernelState:
    """The layer's repacked base, built at first use (QuantLinear.invalidate_caches drops it)."""
    st = layer._kernel_state
    if st is None or st.device != layer.packed.device:
        rtn = layer.method == "rtn"
        w = repack(layer.packed, layer.in_features, layer.zeros if rtn else None, layer.scales if rtn else None,
                   layer.group_size, layer.bits)
        st = _KernelState(w, layer.packed.device, {})
        layer._kernel_state = st
    return st


# Mode 1 rows (base and per-channel adapters: scale_idx 0 by contract) on the MMA kernels run as mode 2 on the
# slab's slot 0, the base scales in its 16-bit dtype: a lane loads its two rows' scales as one 4-byte pair
# there, and mode 1's float32 base table costs 2 more bytes per 128 codes and row. H100, µs per 7B layer at
# g128 (bench/NOTES-kernels.md, session 12, one call): M = 1 mode 1 58.0 against mode 2 55.5; M = 4 70.0
# against 68.5. In the engine (H200, random Llama-2-7B g128, batch 1, session 15, `bench/decode_profile.py
# --mode1-slab off,on`): the GEMVs 2,168 -> 2,074 µs a token, 391.8 -> 422.3 tok/s overlapped. The base rows
# then also see the same (fp16) scales alone as in a batch beside group-wise adapters. False: mode 1 as asked.
MODE1_FROM_SLAB = True


def _mode1_from_slab(layer, M: int, N: int, K: int) -> bool:
    tab = layer.slab_scales
    return (MODE1_FROM_SLAB and tab is not None and tab.element_size() == 2 and tab.stride(1) == 1
            and layer.group_size in MMA_GROUP_SIZES
            and autotuned_kernel(M, N, K, MODE_GROUP, layer.group_size, 1) in ("mma gemv", "mma batch"))


def _kernel_mode(layer, M: int, mode: int) -> int:
    """The mode adapted_linear runs rows of this mode in."""
    if layer.method != "rtn":
        return MODE_ALPHA
    if mode == MODE_CHANNEL and _mode1_from_slab(layer, M, layer.out_features, layer.in_features):
        return MODE_GROUP
    return mode


def mma_gemv_takes(layer, M: int, mode: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether adapted_linear(layer, x, rows) runs the one-row MMA GEMV, whose epilogue alone has the RMSNorms
    (norm_in / accumulate / norm_out), for x [M, K] of this dtype on this device (its row 16-byte aligned, as
    torch allocates) and rows of this mode; on CPU tensors the interpreter takes every call the kernel can run."""
    layer.ensure_slab()
    N, K, gs = layer.out_features, layer.in_features, layer.group_size
    kmode = _kernel_mode(layer, M, mode)
    if not mma_gemv_fits(M, N, K, kmode, gs, layer.method == "rtn", dtype, torch.device(device).type):
        return False
    return torch.device(device).type == "cpu" or autotuned_kernel(M, N, K, kmode, gs) == "mma gemv"


def adapted_linear(layer, x: torch.Tensor, rows, silu_gate: bool = False, **norms) -> torch.Tensor:
    """QuantLinear's CUDA path: x [M, K] -> y [M, N] in x.dtype (+ layer.bias), per-row adapters
    (silu_gate: [M, N / 2], int4_matmul's; norms: int4_matmul's out / norm_in / accumulate / norm_out).

    rows: RowAdapters (chan_idx, scale_idx, alpha_idx [M] int32, mode). Mode 1 assumes every
    row has scale_idx 0 and alpha_idx -1; mode 2 that every alpha_idx is -1 (the scheduler knows).
    """
    layer.ensure_slab()
    st = kernel_state(layer)
    mode = _kernel_mode(layer, x.shape[0], rows.mode)
    scales = _n_major(st, "scales", layer.slab_scales) if mode != MODE_CHANNEL else None
    alphas = betas = None
    if mode == MODE_ALPHA:
        alphas = _n_major(st, "alphas", layer.slab_alphas)
        betas = _n_major(st, "betas", layer.slab_betas)
    chan = layer.slab_chan if layer.slab_chan.stride(-1) == 1 else layer.slab_chan.contiguous()
    return int4_matmul(x, st.weights, chan, scales, alphas, betas, rows.chan_idx.int(), rows.scale_idx.int(),
                       rows.alpha_idx.int(), mode, layer.bias, scale_slots=rows.scale_slots, silu_gate=silu_gate,
                       **norms)
