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

Paths: M = 1 runs the decode GEMV below (CUDA cores, the codes viewed as int32 words). Other
small M (decode) uses BLOCK_M = 16 and split-K; the splits add their partial tiles in a
float32 workspace and the last split of a tile (a per-tile arrival counter, reset by that last
split) finishes it, so one launch does all. Larger M uses larger tiles. Both are autotuned per
(M bucket, N, K, mode, group size, bits, dtypes) by triton.autotune; the configs are below.
The group size fixes BLOCK_K (= group size, or 128 for per-channel) so every K block lies in one group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing

MODE_CHANNEL, MODE_GROUP, MODE_ALPHA = 1, 2, 3

# Padding of the repacked codes: any BLOCK_N <= N_ALIGN and BLOCK_K <= 2 * KH_ALIGN runs unmasked.
N_ALIGN = 256
KH_ALIGN = 128
MAX_SPLIT_K = 8
_COUNTER_SLOTS = 1 << 16


# --- autotune configs ------------------------------------------------------------------------


def _cfg(bm, bn, sk, warps=4, stages=3):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": sk}, num_warps=warps, num_stages=stages)


# decode: a 16-row tile (tensor cores need 16) and split-K so that a 4096-wide output fills 132 SMs
DECODE_CONFIGS = [
    _cfg(16, 64, 1), _cfg(16, 64, 2), _cfg(16, 32, 4), _cfg(16, 64, 4), _cfg(16, 128, 4), _cfg(16, 64, 8),
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
def _accumulate_block(
    acc, kb, x_rows, q_cols, offs_j, offs_n, m_ok, n_ok, sidx, is_alpha, arow, K,
    zero_ptr, s0_ptr, scale_ptr, alpha_ptr, beta_ptr,
    stride_qk, stride_zg, stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
    stride_bs, stride_bn, stride_bg,
    MODE: tl.constexpr, BITS: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    FAST: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, MAGIC: tl.constexpr, CODE_MID: tl.constexpr,
    BLOCK_K: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """acc [BM, BN] += this K block's contribution (K block kb lies in group kb, or the one group)."""
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
    if MODE != 3:
        # dots with the codes Q themselves (exact in any dtype); the zero point is a float (rtn puts
        # the group minimum on code 0), so it enters in float32: x_g . (Q_g - z_g) = x_g . Q_g - z_g X_g
        w_lo = _codes(byte & 0xF, DT, FAST, MAGIC)
        w_hi = _codes(byte >> 4, DT, FAST, MAGIC)
        part = tl.dot(xe, w_lo, input_precision=PREC)
        part = tl.dot(xo, w_hi, part, input_precision=PREC)  # [BM, BN] = x_g . Q_g
        x_sum = tl.sum(xe.to(tl.float32), 1) + tl.sum(xo.to(tl.float32), 1)  # [BM] = X_g
        z = tl.load(zero_ptr + g * stride_zg + offs_n)  # [BN], padded
        part -= x_sum[:, None] * z[None, :]  # [BM, BN] = x_g . (Q_g - z_g)
        if ONE_GROUP:
            acc += part
        elif MODE == 1:
            s0 = tl.load(s0_ptr + g * stride_zg + offs_n)
            acc += part * s0[None, :]
        else:
            s = tl.load(scale_ptr + sidx[:, None] * stride_ss + offs_n[None, :] * stride_sn + g * stride_sg,
                        mask=n_ok[None, :], other=0.0)
            acc += part * s.to(tl.float32)
    else:
        x_sum = tl.sum(xe.to(tl.float32), 1) + tl.sum(xo.to(tl.float32), 1)  # [BM] = X_g
        peqa_tile = (~is_alpha)[:, None] & n_ok[None, :]
        alpha_tile = is_alpha[:, None] & n_ok[None, :]
        if HAS_ZEROS:
            s = tl.load(scale_ptr + sidx[:, None] * stride_ss + offs_n[None, :] * stride_sn + g * stride_sg,
                        mask=peqa_tile, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + g * stride_zg + offs_n)
            peqa_x = s * (CODE_MID - z[None, :])
        else:  # bcq base: every row is an alpha row
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            peqa_x = s
        beta = tl.load(beta_ptr + arow[:, None] * stride_bs + offs_n[None, :] * stride_bn + g * stride_bg,
                       mask=alpha_tile, other=0.0).to(tl.float32)
        acc += x_sum[:, None] * tl.where(is_alpha[:, None], beta, peqa_x)
        pow2 = 0.5  # 2**(j-1)
        for j in tl.static_range(BITS):
            s_lo = _sign_plane(byte, j, DT, FAST)
            s_hi = _sign_plane(byte, j + 4, DT, FAST)
            plane = tl.dot(xe, s_lo, input_precision=PREC)
            plane = tl.dot(xo, s_hi, plane, input_precision=PREC)  # [BM, BN] = S_jg
            a = tl.load(alpha_ptr + arow[:, None] * stride_as + j * stride_aj + offs_n[None, :] * stride_an
                        + g * stride_ag, mask=alpha_tile, other=0.0).to(tl.float32)
            acc += plane * tl.where(is_alpha[:, None], a, s * pow2)
            pow2 = pow2 * 2.0
    return acc


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
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
    BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
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

    # each row's slab slots
    cidx = tl.load(chan_idx_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    sidx = tl.load(scale_idx_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    aidx = tl.load(alpha_idx_ptr + offs_m, mask=m_ok, other=-1)
    is_alpha = aidx >= 0  # [BM]
    arow = tl.maximum(aidx, 0).to(tl.int64)

    num_kb = tl.cdiv(K, BLOCK_K)
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)

    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BM, 1]
    q_cols = q_ptr + offs_n[:, None] * stride_qk  # [BN, 1] rows of codes_t
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if INTERPRET:  # the interpreter (numpy >= 2.3) cannot range() over tensor bounds
        kb = kb_lo
        while kb < kb_hi:
            acc = _accumulate_block(acc, kb, x_rows, q_cols, offs_j, offs_n, m_ok, n_ok, sidx, is_alpha, arow, K,
                zero_ptr, s0_ptr, scale_ptr, alpha_ptr, beta_ptr,
                stride_qk, stride_zg, stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
                stride_bs, stride_bn, stride_bg,
                MODE, BITS, ONE_GROUP, HAS_ZEROS, FAST, DT, PREC, MAGIC, CODE_MID, BLOCK_K, HALF, BLOCK_M, BLOCK_N)
            kb += 1
    else:
        for kb in range(kb_lo, kb_hi):
            acc = _accumulate_block(acc, kb, x_rows, q_cols, offs_j, offs_n, m_ok, n_ok, sidx, is_alpha, arow, K,
                zero_ptr, s0_ptr, scale_ptr, alpha_ptr, beta_ptr,
                stride_qk, stride_zg, stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
                stride_bs, stride_bn, stride_bg,
                MODE, BITS, ONE_GROUP, HAS_ZEROS, FAST, DT, PREC, MAGIC, CODE_MID, BLOCK_K, HALF, BLOCK_M, BLOCK_N)

    # linear epilogue factors (they commute with the split-K sum)
    if ONE_GROUP and MODE == 1:
        acc *= tl.load(s0_ptr + offs_n)[None, :]
    if ONE_GROUP and MODE == 2:
        s = tl.load(scale_ptr + sidx[:, None] * stride_ss + offs_n[None, :] * stride_sn, mask=n_ok[None, :], other=0.0)
        acc *= s.to(tl.float32)
    chan = tl.load(chan_ptr + cidx[:, None] * stride_cs + offs_n[None, :], mask=n_ok[None, :], other=0.0)
    chan = chan.to(tl.float32)
    if MODE == 3:
        chan = tl.where(is_alpha[:, None], 1.0, chan)
    acc *= chan

    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        _store_rows(acc, y_ptr, bias_ptr, offs_m, offs_n, out_mask, n_ok, stride_ym, HAS_BIAS)
    else:
        # park the partial tile; the last split to arrive sums them (fixed order) and finishes the tile
        ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_tile + pid_k * M * N, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        tile = pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                total += tl.load(ws_tile + sk * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch (and CUDA-graph replays)
            _store_rows(total, y_ptr, bias_ptr, offs_m, offs_n, out_mask, n_ok, stride_ym, HAS_BIAS)


@triton.jit
def _store_rows(acc, y_ptr, bias_ptr, offs_m, offs_n, out_mask, n_ok, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)



# --- decode GEMV (M <= GEMV_MAX_M): CUDA cores, no tensor cores, no shared-memory operands -----
#
# codes_t viewed as int32 [N_pad, Kh_pad/4]: word w of row n holds Q[n, 8w + i] in nibble i (the
# original little-endian packing), so a [BLOCK_N, BK/8] tile is 16-byte loads of contiguous words.
# Nibble i is turned into a float without shifts or int->float converts: OR-ing the nibble, kept
# in place at bit 4p, into the mantissa of 2**23 gives exactly 2**23 + Q * 16**p (p <= 4; nibbles
# 5..7 come from the word shifted right by 12), and one FMA, * 16**-p - (2**(23-4p) + z), leaves
# Q - z exactly: three instructions per code (LOP3, FFMA, and the FFMA with x).
# Partial sums stay in the [BLOCK_N, BK/8] tile layout across groups (per-group scales multiply
# the tile elementwise) and are reduced over K once, at the end.


def _gcfg(bn, sk, warps=4, prefetch=1):
    return triton.Config({"BLOCK_N": bn, "SPLIT_K": sk, "PREFETCH": prefetch}, num_warps=warps, num_stages=1)


# split-K so that even a 4096-wide output gives >= 256 programs (132 SMs)
GEMV_CONFIGS = [
    _gcfg(128, 8, prefetch=0),  # (v1 had no register prefetch)
    _gcfg(64, 8), _gcfg(64, 16), _gcfg(128, 8), _gcfg(128, 16), _gcfg(256, 8), _gcfg(256, 16, warps=8),
    _gcfg(128, 8, warps=8),
]
GEMV_MAX_M = 1  # measured: at M = 4 the per-row x loads and FMAs make the GEMV 2x slower than mma
INTERPRET_GEMV_CONFIG = {"BLOCK_N": 16, "SPLIT_K": 1, "PREFETCH": 1}


@triton.jit
def _and_or(w, MASK: tl.constexpr, FAST: tl.constexpr):
    """(w & MASK) | 0x4B000000 (the bits of 2**23): one LOP3 on the GPU (ptxas emits two for the plain ops)."""
    if FAST:
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
            [w, tl.full(w.shape, MASK, tl.int32), tl.full(w.shape, 0x4B000000, tl.int32)],
            dtype=tl.int32, is_pure=True, pack=1)
    else:
        return (w & MASK) | 0x4B000000


@triton.jit
def _nibble_f32(w, w_hi, I: tl.constexpr, FAST: tl.constexpr):
    """w, w_hi = w >> 12: [BN, BKW] int32 -> Q_i float32 (nibble I of each word), exact.

    P = I for nibbles 0..4 (read in place from w), I - 3 for nibbles 5..7 (from w_hi): the bits
    OR-ed into the mantissa of 2**23 make 2**23 + Q * 16**P, and one FMA by 16**-P (exact) minus
    2**(23-4P) leaves Q (an integer: no rounding).
    """
    if I <= 4:
        v = _and_or(w, 0xF << (4 * I), FAST)
        inv: tl.constexpr = 1.0 / (16 ** I)
        off: tl.constexpr = 2.0 ** (23 - 4 * I)
    else:
        v = _and_or(w_hi, 0xF << (4 * (I - 3)), FAST)
        inv: tl.constexpr = 1.0 / (16 ** (I - 3))
        off: tl.constexpr = 2.0 ** (23 - 4 * (I - 3))
    return v.to(tl.float32, bitcast=True) * inv - off


@triton.jit
def _bit_f32(w, w_hi, POS: tl.constexpr, FAST: tl.constexpr):
    """w, w_hi = w >> 12: [BN, BKW] int32 -> bit POS of each word as 0.0 / 1.0 (the nibble trick on one bit)."""
    if POS <= 22:
        v = _and_or(w, 1 << POS, FAST)
        inv: tl.constexpr = 1.0 / (2 ** POS)
        off: tl.constexpr = 2.0 ** (23 - POS)
    else:
        v = _and_or(w_hi, 1 << (POS - 12), FAST)
        inv: tl.constexpr = 1.0 / (2 ** (POS - 12))
        off: tl.constexpr = 2.0 ** (23 - (POS - 12))
    return v.to(tl.float32, bitcast=True) * inv - off


@triton.jit
def _x_nibble(x_row, k0, offs_w, K, I: tl.constexpr, EVEN_K: tl.constexpr):
    """x[k0 + 8w + I] for the tile's word columns w (0 past K), float32."""
    offs_k = k0 + offs_w * 8 + I
    if EVEN_K:
        xv = tl.load(x_row + offs_k)
    else:
        xv = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0)
    return xv.to(tl.float32)


@triton.jit
def _gemv_row_block(acc, corr, w, wq0, wq1, wq2, wq3, wq4, wq5, wq6, wq7, k0, offs_w, offs_n, n_ok, x_row, K, g,
                    sidx, is_alpha, arow, s0_ptr, scale_ptr, alpha_ptr, beta_ptr, zc,
                    stride_zg, stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
                    stride_bs, stride_bn, stride_bg,
                    MODE: tl.constexpr, BITS: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                    CODE_MID: tl.constexpr, EVEN_K: tl.constexpr, FAST: tl.constexpr):
    """One row, one K block (inside group g): acc [BN, BKW] and corr [BN] updated.

    Modes 1/2: y = sum_g s_g (x_g . Q_g - z_g X_g): acc gathers s_g * (x . Q) per word column,
    corr gathers s_g z_g X_g (X_g = sum of x over the block), so no per-column value is needed
    in the tile's layout but the one group scale. Mode 3: bit planes, corr unused.
    """
    x0 = _x_nibble(x_row, k0, offs_w, K, 0, EVEN_K)
    x1 = _x_nibble(x_row, k0, offs_w, K, 1, EVEN_K)
    x2 = _x_nibble(x_row, k0, offs_w, K, 2, EVEN_K)
    x3 = _x_nibble(x_row, k0, offs_w, K, 3, EVEN_K)
    x4 = _x_nibble(x_row, k0, offs_w, K, 4, EVEN_K)
    x5 = _x_nibble(x_row, k0, offs_w, K, 5, EVEN_K)
    x6 = _x_nibble(x_row, k0, offs_w, K, 6, EVEN_K)
    x7 = _x_nibble(x_row, k0, offs_w, K, 7, EVEN_K)
    x_cols = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))  # [BKW]
    if MODE != 3:
        part = wq0 * x0[None, :]
        part += wq1 * x1[None, :]
        part += wq2 * x2[None, :]
        part += wq3 * x3[None, :]
        part += wq4 * x4[None, :]
        part += wq5 * x5[None, :]
        part += wq6 * x6[None, :]
        part += wq7 * x7[None, :]
        x_sum = tl.sum(x_cols, 0)
        if ONE_GROUP:
            acc += part
            corr += zc * x_sum
        else:
            if MODE == 1:
                s = tl.load(s0_ptr + g * stride_zg + offs_n)
            else:
                s = tl.load(scale_ptr + sidx * stride_ss + offs_n * stride_sn + g * stride_sg, mask=n_ok,
                            other=0.0).to(tl.float32)
            acc += part * s[:, None]
            corr += (s * zc) * x_sum
    else:
        # bit planes B_j = sum_k x_k bit_j(Q_k); with X_g = sum_k x_k (kept per word column):
        #   alpha row: sum_j alpha_j (2 B_j - X) + beta X = sum_j 2 alpha_j B_j + (beta - sum_j alpha_j) X
        #   PEQA row:  s (x . (Q - z))                  = sum_j 2**j s B_j    - s z X
        a_ok = n_ok & is_alpha
        p_ok = n_ok & (~is_alpha)
        if HAS_ZEROS:
            s = tl.load(scale_ptr + sidx * stride_ss + offs_n * stride_sn + g * stride_sg, mask=p_ok,
                        other=0.0).to(tl.float32)
        else:  # bcq base: every row is an alpha row
            s = tl.zeros_like(zc)
        x_coef = tl.load(beta_ptr + arow * stride_bs + offs_n * stride_bn + g * stride_bg, mask=a_ok,
                         other=0.0).to(tl.float32)
        w_hi = w >> 12
        pow2 = 1.0  # 2**j: a PEQA row's plane weight
        for j in tl.static_range(BITS):
            plane = _bit_f32(w, w_hi, j, FAST) * x0[None, :]
            plane += _bit_f32(w, w_hi, 4 + j, FAST) * x1[None, :]
            plane += _bit_f32(w, w_hi, 8 + j, FAST) * x2[None, :]
            plane += _bit_f32(w, w_hi, 12 + j, FAST) * x3[None, :]
            plane += _bit_f32(w, w_hi, 16 + j, FAST) * x4[None, :]
            plane += _bit_f32(w, w_hi, 20 + j, FAST) * x5[None, :]
            plane += _bit_f32(w, w_hi, 24 + j, FAST) * x6[None, :]
            plane += _bit_f32(w, w_hi, 28 + j, FAST) * x7[None, :]
            a = tl.load(alpha_ptr + arow * stride_as + j * stride_aj + offs_n * stride_an + g * stride_ag,
                        mask=a_ok, other=0.0).to(tl.float32)
            x_coef -= a
            acc += plane * tl.where(is_alpha, 2.0 * a, s * pow2)[:, None]
            pow2 = pow2 * 2.0
        acc += tl.where(is_alpha, x_coef, -s * zc)[:, None] * x_cols[None, :]
    return acc, corr


@triton.jit
def _gemv_row_out(acc, corr, m, M, offs_n, n_ok, sidx, is_alpha, pid_k, y_ptr, bias_ptr, ws_ptr, s0_ptr, chan_ptr,
                  scale_ptr, chan_idx_ptr, N, stride_ym, stride_cs, stride_ss, stride_sn,
                  MODE: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Row m: reduce acc over K, apply the epilogue factors, store y (or park the split's partial)."""
    row_ok = m < M
    y_m = tl.sum(acc, 1) - corr  # [BN]
    if ONE_GROUP and MODE == 1:
        y_m *= tl.load(s0_ptr + offs_n)
    if ONE_GROUP and MODE == 2:
        s = tl.load(scale_ptr + sidx * stride_ss + offs_n * stride_sn, mask=n_ok, other=0.0)
        y_m *= s.to(tl.float32)
    cidx = tl.load(chan_idx_ptr + m, mask=row_ok, other=0).to(tl.int64)
    chan = tl.load(chan_ptr + cidx * stride_cs + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if MODE == 3:
        chan = tl.where(is_alpha, 1.0, chan)
    y_m *= chan
    out_ok = n_ok & row_ok
    if SPLIT_K == 1:
        if HAS_BIAS:
            y_m += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, y_m.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(ws_ptr + (pid_k * M + m) * N + offs_n, y_m, mask=out_ok)


@triton.jit
def _gemv_row_finish(m, M, offs_n, n_ok, y_ptr, bias_ptr, ws_ptr, N, stride_ym,
                     HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr):
    out_ok = n_ok & (m < M)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for sk in tl.static_range(SPLIT_K):
        total += tl.load(ws_ptr + (sk * M + m) * N + offs_n, mask=out_ok, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, total.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit(do_not_specialize=["M"])
def _gemv_int4_kernel(
    x_ptr, y_ptr, bias_ptr,  # x [M, K], y [M, N], bias [N]
    q_ptr, zero_ptr, s0_ptr,  # codes_t as int32 [N_pad, Kh_pad/4], zeros_t / scales_t [G, N_pad] f32
    chan_ptr, scale_ptr, alpha_ptr, beta_ptr,
    chan_idx_ptr, scale_idx_ptr, alpha_idx_ptr,
    ws_ptr, cnt_ptr,
    M, N, K, G,
    stride_xm, stride_ym, stride_qn, stride_zg,
    stride_cs,
    stride_ss, stride_sn, stride_sg,
    stride_as, stride_aj, stride_an, stride_ag,
    stride_bs, stride_bn, stride_bg,
    MODE: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ZEROS: tl.constexpr, CODE_MID: tl.constexpr,
    BLOCK_K: tl.constexpr, ROWS: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, FAST: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
):
    """y[m, n] for every row m < M <= ROWS (1, 2 or 4) in one program per (column tile, K split)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BKW: tl.constexpr = BLOCK_K // 8
    ONE_GROUP: tl.constexpr = GROUP_SIZE <= 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BKW)
    n_ok = offs_n < N
    q_rows = q_ptr + offs_n[:, None] * stride_qn + offs_w[None, :]  # [BN, BKW] (padded: unmasked)

    num_kb = tl.cdiv(K, BLOCK_K)
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)

    # rows 0..3 (ROWS is 1, 2 or 4; a row m >= M reads row M-1's x and is never stored)
    sidx0 = tl.load(scale_idx_ptr + 0).to(tl.int64)
    aidx0 = tl.load(alpha_idx_ptr + 0)
    sidx1 = tl.load(scale_idx_ptr + 1, mask=1 < M, other=0).to(tl.int64)
    aidx1 = tl.load(alpha_idx_ptr + 1, mask=1 < M, other=-1)
    sidx2 = tl.load(scale_idx_ptr + 2, mask=2 < M, other=0).to(tl.int64)
    aidx2 = tl.load(alpha_idx_ptr + 2, mask=2 < M, other=-1)
    sidx3 = tl.load(scale_idx_ptr + 3, mask=3 < M, other=0).to(tl.int64)
    aidx3 = tl.load(alpha_idx_ptr + 3, mask=3 < M, other=-1)
    acc0 = tl.zeros([BLOCK_N, BKW], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BKW], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BKW], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BKW], dtype=tl.float32)
    corr0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    corr1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    corr2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    corr3 = tl.zeros([BLOCK_N], dtype=tl.float32)

    if PREFETCH:
        w_next = tl.load(q_rows + tl.minimum(kb_lo, num_kb - 1) * BKW, eviction_policy="evict_first")
    kb = kb_lo
    while kb < kb_hi:  # (a while loop: the interpreter cannot range() over tensor bounds)
        k0 = kb * BLOCK_K
        if ONE_GROUP:
            g = 0
        else:
            g = tl.minimum(k0 // GROUP_SIZE, G - 1)  # BLOCK_K == GROUP_SIZE
        if PREFETCH:  # registers double-buffer the code tile: the next block's load overlaps this math
            w = w_next
            w_next = tl.load(q_rows + tl.minimum(kb + 1, num_kb - 1) * BKW, eviction_policy="evict_first")
        else:
            w = tl.load(q_rows + kb * BKW, eviction_policy="evict_first")  # [BN, BKW] int32
        if HAS_ZEROS:
            zc = tl.load(zero_ptr + g * stride_zg + offs_n)  # [BN] (padded)
        else:
            zc = tl.zeros([BLOCK_N], dtype=tl.float32)
        if MODE != 3:  # the 8 nibble tiles Q (float32), shared by every row
            w_hi = w >> 12
            wq0 = _nibble_f32(w, w_hi, 0, FAST)
            wq1 = _nibble_f32(w, w_hi, 1, FAST)
            wq2 = _nibble_f32(w, w_hi, 2, FAST)
            wq3 = _nibble_f32(w, w_hi, 3, FAST)
            wq4 = _nibble_f32(w, w_hi, 4, FAST)
            wq5 = _nibble_f32(w, w_hi, 5, FAST)
            wq6 = _nibble_f32(w, w_hi, 6, FAST)
            wq7 = _nibble_f32(w, w_hi, 7, FAST)
        else:
            wq0 = acc0  # unused: mode 3 works on the sign planes of w
            wq1 = acc0
            wq2 = acc0
            wq3 = acc0
            wq4 = acc0
            wq5 = acc0
            wq6 = acc0
            wq7 = acc0
        acc0, corr0 = _gemv_row_block(acc0, corr0, w, wq0, wq1, wq2, wq3, wq4, wq5, wq6, wq7, k0, offs_w, offs_n, n_ok,
                               x_ptr, K, g, sidx0, aidx0 >= 0, tl.maximum(aidx0, 0).to(tl.int64),
                               s0_ptr, scale_ptr, alpha_ptr, beta_ptr, zc, stride_zg,
                               stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
                               stride_bs, stride_bn, stride_bg, MODE, BITS, ONE_GROUP, HAS_ZEROS, CODE_MID, EVEN_K, FAST)
        if ROWS > 1:
            acc1, corr1 = _gemv_row_block(acc1, corr1, w, wq0, wq1, wq2, wq3, wq4, wq5, wq6, wq7, k0, offs_w, offs_n, n_ok,
                                   x_ptr + tl.minimum(1, M - 1) * stride_xm, K, g, sidx1, aidx1 >= 0,
                                   tl.maximum(aidx1, 0).to(tl.int64),
                                   s0_ptr, scale_ptr, alpha_ptr, beta_ptr, zc, stride_zg,
                                   stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
                                   stride_bs, stride_bn, stride_bg, MODE, BITS, ONE_GROUP, HAS_ZEROS, CODE_MID, EVEN_K, FAST)
        if ROWS > 2:
            acc2, corr2 = _gemv_row_block(acc2, corr2, w, wq0, wq1, wq2, wq3, wq4, wq5, wq6, wq7, k0, offs_w, offs_n, n_ok,
                                   x_ptr + tl.minimum(2, M - 1) * stride_xm, K, g, sidx2, aidx2 >= 0,
                                   tl.maximum(aidx2, 0).to(tl.int64),
                                   s0_ptr, scale_ptr, alpha_ptr, beta_ptr, zc, stride_zg,
                                   stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
                                   stride_bs, stride_bn, stride_bg, MODE, BITS, ONE_GROUP, HAS_ZEROS, CODE_MID, EVEN_K, FAST)
            acc3, corr3 = _gemv_row_block(acc3, corr3, w, wq0, wq1, wq2, wq3, wq4, wq5, wq6, wq7, k0, offs_w, offs_n, n_ok,
                                   x_ptr + tl.minimum(3, M - 1) * stride_xm, K, g, sidx3, aidx3 >= 0,
                                   tl.maximum(aidx3, 0).to(tl.int64),
                                   s0_ptr, scale_ptr, alpha_ptr, beta_ptr, zc, stride_zg,
                                   stride_ss, stride_sn, stride_sg, stride_as, stride_aj, stride_an, stride_ag,
                                   stride_bs, stride_bn, stride_bg, MODE, BITS, ONE_GROUP, HAS_ZEROS, CODE_MID, EVEN_K, FAST)
        kb += 1

    _gemv_row_out(acc0, corr0, 0, M, offs_n, n_ok, sidx0, aidx0 >= 0, pid_k, y_ptr, bias_ptr, ws_ptr, s0_ptr, chan_ptr,
                  scale_ptr, chan_idx_ptr, N, stride_ym, stride_cs, stride_ss, stride_sn,
                  MODE, ONE_GROUP, HAS_BIAS, SPLIT_K)
    if ROWS > 1:
        _gemv_row_out(acc1, corr1, 1, M, offs_n, n_ok, sidx1, aidx1 >= 0, pid_k, y_ptr, bias_ptr, ws_ptr, s0_ptr,
                      chan_ptr, scale_ptr, chan_idx_ptr, N, stride_ym, stride_cs, stride_ss, stride_sn,
                      MODE, ONE_GROUP, HAS_BIAS, SPLIT_K)
    if ROWS > 2:
        _gemv_row_out(acc2, corr2, 2, M, offs_n, n_ok, sidx2, aidx2 >= 0, pid_k, y_ptr, bias_ptr, ws_ptr, s0_ptr,
                      chan_ptr, scale_ptr, chan_idx_ptr, N, stride_ym, stride_cs, stride_ss, stride_sn,
                      MODE, ONE_GROUP, HAS_BIAS, SPLIT_K)
        _gemv_row_out(acc3, corr3, 3, M, offs_n, n_ok, sidx3, aidx3 >= 0, pid_k, y_ptr, bias_ptr, ws_ptr, s0_ptr,
                      chan_ptr, scale_ptr, chan_idx_ptr, N, stride_ym, stride_cs, stride_ss, stride_sn,
                      MODE, ONE_GROUP, HAS_BIAS, SPLIT_K)
    if SPLIT_K > 1:
        # the last split to arrive at this column tile sums the partials in fixed order and stores y
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            _gemv_row_finish(0, M, offs_n, n_ok, y_ptr, bias_ptr, ws_ptr, N, stride_ym, HAS_BIAS, SPLIT_K, BLOCK_N)
            if ROWS > 1:
                _gemv_row_finish(1, M, offs_n, n_ok, y_ptr, bias_ptr, ws_ptr, N, stride_ym, HAS_BIAS, SPLIT_K,
                                 BLOCK_N)
            if ROWS > 2:
                _gemv_row_finish(2, M, offs_n, n_ok, y_ptr, bias_ptr, ws_ptr, N, stride_ym, HAS_BIAS, SPLIT_K,
                                 BLOCK_N)
                _gemv_row_finish(3, M, offs_n, n_ok, y_ptr, bias_ptr, ws_ptr, N, stride_ym, HAS_BIAS, SPLIT_K,
                                 BLOCK_N)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next launch (and CUDA-graph replays)


_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "MODE", "GROUP_SIZE", "BITS", "HAS_BIAS", "HAS_ZEROS", "FAST", "INTERPRET"]  # + x dtype (added by triton)


def _quick_bench(kernel_call, quantiles):
    """Shorter autotuning runs than triton's default (25 ms warm-up, 100 ms): ~40 keys per model."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# cache_results: the choice per key is kept on disk beside triton's compile cache
_decode_kernel = triton.autotune(configs=DECODE_CONFIGS, key=_AUTOTUNE_KEY, do_bench=_quick_bench,
                                 cache_results=True)(_adapted_int4_kernel)
_gemm_kernel = triton.autotune(configs=GEMM_CONFIGS, key=_AUTOTUNE_KEY, do_bench=_quick_bench, cache_results=True,
                               prune_configs_by={"early_config_prune": _prune_gemm})(_adapted_int4_kernel)
DECODE_MAX_M = 16
_GEMV_KEY = ["ROWS", "EVEN_K", "N", "K", "MODE", "GROUP_SIZE", "BITS", "HAS_BIAS", "HAS_ZEROS"]  # + x dtype
_gemv_kernel = triton.autotune(configs=GEMV_CONFIGS, key=_GEMV_KEY, do_bench=_quick_bench,
                               cache_results=True)(_gemv_int4_kernel)


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

    One array per kernel family ("tc", "gemv"), so neither can ever see the other's counts.
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
    out: torch.Tensor | None = None,  # [M, N] x.dtype, contiguous rows (written, never read)
) -> torch.Tensor:
    """y [M, N] in x.dtype; the adapted_linear_ref semantics. Tables may have any strides.

    `mode` is the host hint (1 channel, 2 group, 3 alpha; see the module docstring); a bcq base
    (w.zeros_t is None) always runs mode 3. `config` (BLOCK_M, BLOCK_N, SPLIT_K, optional
    num_warps / num_stages) bypasses the autotuner; on CPU tensors (TRITON_INTERPRET=1) a small
    fixed config is the default.
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
    x = x.contiguous()
    if out is not None:
        if out.shape != (M, N) or out.dtype != x.dtype or out.stride(1) != 1:
            raise ValueError(f"out must be [{M}, {N}] {x.dtype} with unit stride along N")
        y = out
    else:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
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
                INTERPRET=interpret)

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


def _launch_gemv(x, y, w, chan, scales, alphas, betas, chan_idx, scale_idx, alpha_idx, mode, bias, config,
                 has_zeros, interpret, s_args, a_args, b_args, dummy):
    """The decode GEMV (every row in one program per column tile and K split): M <= 4 (default: M = 1)."""
    M, K = x.shape
    N = w.N
    if M > 4:
        raise ValueError(f"the GEMV path takes at most 4 rows, got {M}")
    rows = 1 if M == 1 else (2 if M == 2 else 4)
    block_k = 128 if w.group_size in (-1, 128) else w.group_size
    if config is None and interpret:
        config = INTERPRET_GEMV_CONFIG
    max_split = config["SPLIT_K"] if config is not None else max(c.kwargs["SPLIT_K"] for c in GEMV_CONFIGS)
    ws = torch.empty(max_split * M * N if max_split > 1 else 1, dtype=torch.float32, device=x.device)
    q32 = w.codes_t.view(torch.int32)  # [N_pad, Kh_pad/4]: word w holds codes 8w..8w+7 (nibble i = code 8w+i)
    args = (
        x, y, bias if bias is not None else dummy,
        q32, w.zeros_t if has_zeros else dummy, w.scales_t if has_zeros else dummy,
        chan, s_args[0], a_args[0], b_args[0],
        chan_idx, scale_idx, alpha_idx,
        ws, _tile_counters(x.device, "gemv"),
        M, N, K, w.num_groups,
        x.stride(0), y.stride(0), q32.stride(0), w.zeros_t.stride(0) if has_zeros else 0,
        chan.stride(0),
        *s_args[1:], *a_args[1:], *b_args[1:],
    )
    meta = dict(MODE=mode, BITS=w.bits, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, HAS_ZEROS=has_zeros,
                CODE_MID=((1 << w.bits) - 1) / 2, BLOCK_K=block_k, ROWS=rows, EVEN_K=K % block_k == 0,
                INTERPRET=interpret, FAST=not interpret)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is not None:
        if config["SPLIT_K"] > 1 and triton.cdiv(N, config["BLOCK_N"]) > _COUNTER_SLOTS:
            raise ValueError("too many tiles for the split-K counters")
        _gemv_int4_kernel[grid](*args, **meta, **{"PREFETCH": 1, **config})
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


def adapted_linear(layer, x: torch.Tensor, rows) -> torch.Tensor:
    """QuantLinear's CUDA path: x [M, K] -> y [M, N] in x.dtype (+ layer.bias), per-row adapters.

    rows: RowAdapters (chan_idx, scale_idx, alpha_idx [M] int32, mode). Mode 1 assumes every
    row has scale_idx 0 and alpha_idx -1; mode 2 that every alpha_idx is -1 (the scheduler knows).
    """
    layer.ensure_slab()
    st = kernel_state(layer)
    mode = rows.mode if layer.method == "rtn" else MODE_ALPHA
    scales = _n_major(st, "scales", layer.slab_scales) if mode != MODE_CHANNEL else None
    alphas = betas = None
    if mode == MODE_ALPHA:
        alphas = _n_major(st, "alphas", layer.slab_alphas)
        betas = _n_major(st, "betas", layer.slab_betas)
    chan = layer.slab_chan if layer.slab_chan.stride(-1) == 1 else layer.slab_chan.contiguous()
    return int4_matmul(x, st.weights, chan, scales, alphas, betas, rows.chan_idx.int(), rows.scale_idx.int(),
                       rows.alpha_idx.int(), mode, layer.bias)
