"""Batched int4 GEMM that folds each tile's scales into the dequantized weights ("fold GEMM").

Semantics (modes 1 and 2 of kernels.int4_matmul; kernels.reference.adapted_linear_ref is the oracle),
for x [M, K], codes Q [N, K], float zero points z [N, G], per-row slots c_i (chan) and s_i (scales):

  y[i, n] = chan[c_i, n] * sum_k x[i, k] * W_i[n, k]  (+ bias[n]),   W_i[n, k] = (Q[n, k] - z[n, g(k)]) * s_i[n, g(k)]
  s_i = s0 (mode 1: base and per-channel PEQA rows)  or  scales[s_i] (mode 2: group-wise PEQA rows)

Why a second tensor-core kernel: int4_matmul's tile keeps the group scale out of the dot (acc += s_g *
x_g . (Q_g - z_g), per row), so every group ends its MMA chain, waits for it and rescales, and the tile
is 16-64 rows. At M = 256 that ran at 3.5x bf16 cuBLAS. Here a tile's rows that share one scale row get
W = (Q - z) s dequantized in 16 bits (the rounding a bf16 / fp16 weight has anyway) and the dots chain
through all of K like a dense GEMM: x is the wgmma A operand (pipelined shared memory), the dequantized
weight tile goes to shared memory as B.

- Mode 1: every row of every tile shares s0; the per-row channel factor is an epilogue factor.
- Mode 2: a tile runs one pass over K per scale slot present among its rows, with x masked to that
  slot's rows. One adapter per tile (a prompt's prefill, a batch on one task) is one pass; T slots in a
  tile cost T passes, so int4_matmul sends mode 2 here only when the caller says every row uses one slot.
  On that promise (ONE_SLOT) the loop is mode 1's: no pass bookkeeping, and x's row mask is fixed, so the
  compiler's pipeline loads x blocks ahead (the multi-pass loop's mask hangs on the loop-carried slot).

Dequantization (~3 instructions per code): a code word holds 8 nibbles (codes_t viewed as int32, nibble
i = code 8w + i); each nibble is shifted to bits 16..19 and OR-ed under the exponent of 2**23 (one LOP3:
the float 2**23 + Q 2**16, exact), and one FFMA with s / 2**16 and -(128 + z) s gives (Q - z) s. The
scale row of the next K block is loaded one step ahead (a 16-bit row is 2 bytes a thread, which the
compiler's cp.async pipeline does not take).

SWAP (the codes as the MMA's A operand, from registers): acc^T [BN, BM] = W [BN, BK] @ x^T [BK, BM], with the
tokens as the MMA's narrow N dimension. The code tile is read as bytes [BN, BK/2] (byte j = codes 2j and 2j + 1,
the low and high nibble) and each byte's two codes become two adjacent K columns (join + reshape): in the
wgmma A fragment a thread owns K pairs (2c, 2c + 1), which is one byte, so the bytes go from the pipelined
shared-memory ring straight into the fragment's registers. Without SWAP the dequantized tile is wgmma's B operand,
which must be in shared memory: each block stores it there, passes a barrier and waits for its dots before the
next block (bench/NOTES-kernels.md, session 8). With SWAP Triton splits a block's dot into 16-column wgmmas and
leaves 7 in flight (3 at BLOCK_K 64), each slice's fragment in registers of its own; on most tiles ptxas keeps it
so, on some (16 and 32 tokens x 128 rows unsplit, 64 x 64 split, 128 tokens at BLOCK_K 64) it reuses one fragment's
registers and waits for each wgmma before writing the next (its info C7515, "serialized"), and the warp group then
alternates dequantization and MMA slice by slice. tests/kernels/test_int4_gemm.py checks four tiles. Words would not
do here: a word's 8 codes span four threads of the A fragment, and an 8-way join put the tile through shared
memory again (offline sm_90a TTGIR, session 30). Per byte: a shift, and per code one LOP3 (the nibble under the
exponent of 2**23, the low one at bits 15..18, the high one at 19..22) and one FFMA; an F2FP per two codes. SWAP
loads each block's scale row in its own step, where the pipeline stages it with the codes: a row carried over from
the step before fixes the layout of the dequantization, and the tile went through shared memory again.

BLOCK_K (64 or 128, autotuned; 32 at group size 32) divides the group size, so each K block lies in one
group.
Split-K (a float32 workspace and per-tile arrival counters, as in int4_matmul) keeps 132 SMs busy when
the tile grid is small. The interpreter (CPU CI) runs the same kernel, bit tricks included, in float32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .device import ROW_INDEX_ARGS, quick_bench
from .pdl import launch_kwargs, wait_for_producer
from .tile_epilogue import k_blocks, park_partial, store_rows, summed_partials

MODES = (1, 2)
GROUP_SIZES = (-1, 32, 64, 128)


def _cfg(bm, bn, sk, warps=4, stages=3, bk=128):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=warps,
                         num_stages=stages)


CONFIGS = [
    _cfg(64, 64, 1), _cfg(64, 64, 2), _cfg(64, 128, 1), _cfg(64, 128, 2), _cfg(64, 128, 4),
    _cfg(64, 128, 1, bk=64), _cfg(64, 128, 2, bk=64), _cfg(64, 256, 1, warps=8), _cfg(128, 64, 1),
    _cfg(128, 128, 1, warps=8), _cfg(128, 128, 2, warps=8), _cfg(128, 128, 1, warps=8, stages=2),
    _cfg(128, 128, 1, bk=64), _cfg(128, 128, 2, bk=64), _cfg(128, 128, 1, bk=64, stages=4),
    _cfg(128, 256, 1, warps=8), _cfg(128, 256, 1, warps=8, bk=64), _cfg(256, 64, 1, warps=8),
    _cfg(256, 128, 1, warps=8, bk=64),
]
# SWAP's own: BLOCK_N weight rows are the MMA's M (64 a warp group), BLOCK_M tokens its N (8-256): 16-32 token
# tiles for small batches of one adapter (the loop's cost hardly depends on the token count below 64: offline sm_90a,
# 389-400 instructions a 128 x 128 block at 16 / 32 tokens against 410 at 64).
SWAP_CONFIGS = [
    _cfg(16, 128, 1, warps=8), _cfg(16, 128, 2, warps=8), _cfg(16, 256, 1, warps=8), _cfg(16, 256, 2, warps=8),
    _cfg(32, 128, 1, warps=8), _cfg(32, 128, 2, warps=8), _cfg(32, 128, 4, warps=8),
    _cfg(64, 64, 1), _cfg(64, 64, 2), _cfg(64, 64, 4), _cfg(64, 128, 1, warps=8), _cfg(64, 128, 2, warps=8),
    _cfg(64, 128, 4, warps=8), _cfg(128, 128, 1, warps=8), _cfg(128, 128, 2, warps=8), _cfg(128, 64, 1),
    _cfg(128, 128, 1, warps=8, bk=64, stages=4), _cfg(128, 256, 1, warps=8, bk=64, stages=4),
    _cfg(256, 128, 1, warps=8), _cfg(256, 128, 1, warps=8, bk=64, stages=4),
]
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 1}  # BLOCK_K: the group size (128 at g -1)


def _split_kept(kw: dict, M: int, N: int) -> bool:
    """Split-K only where the tile grid is smaller than one wave of the H100's 132 SMs."""
    return kw["SPLIT_K"] == 1 or triton.cdiv(N, kw["BLOCK_N"]) * triton.cdiv(M, kw["BLOCK_M"]) < 132


def workspace_numel(M: int, N: int, config: dict | None = None) -> int:
    """float32 elements of split-K workspace a launch needs (1 when no kept config splits K)."""
    split = config["SPLIT_K"] if config is not None else _autotuned_max_split(M, N)
    return split * M * N if split > 1 else 1


@functools.lru_cache(maxsize=4096)
def _autotuned_max_split(M: int, N: int) -> int:
    """The largest SPLIT_K the autotuner may pick for (M, N): asked on every launch, computed once."""
    return max(c.kwargs["SPLIT_K"] for c in CONFIGS + SWAP_CONFIGS if _split_kept(c.kwargs, M, N))


def _prune(configs, named_args, **kwargs):
    """SWAP's configs or the others; no token tile much taller than the batch, split-K only where the grid
    is small, and K blocks that lie in one group (a group of 32 takes BLOCK_K 32)."""
    M, N = named_args["M"], named_args["N"]
    gs = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    swap = kwargs.get("SWAP", named_args.get("SWAP"))
    tall = max(64, triton.next_power_of_2(M))
    out, seen = [], set()
    for c in configs:
        if any(c is sc for sc in SWAP_CONFIGS) != bool(swap):
            continue
        kw = dict(c.kwargs)
        if gs > 0:
            kw["BLOCK_K"] = min(kw["BLOCK_K"], gs)
        if kw["BLOCK_M"] > tall or not _split_kept(kw, M, N):
            continue
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


@triton.jit
def _under_exponent(ws, MASK: tl.constexpr, FAST: tl.constexpr):
    """float32 of (ws & MASK) | 0x4B000000: bits under MASK (within 0..22) under the exponent of 2**23. One LOP3
    on the GPU (inline asm: the compiler splits the and-or of two constants in two)."""
    if FAST:
        v = tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {MASK}, 0x4B000000, 0xEA;", "=r,r", [ws], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        v = (ws & MASK) | 0x4B000000
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _nibble(words, I: tl.constexpr, s_q, c_q, FAST: tl.constexpr):
    """float32 (Q - z) s of nibble I of each word [BN, W] (s_q = s / 2**16, c_q = -(128 + z) s, [BN, 1]).

    Shifted to bits 16..19 and OR-ed under the exponent of 2**23, the nibble reads 2**23 + Q 2**16 exactly
    (a shift and one LOP3: the compiler splits the and-or of two constants in two, so it is inline asm on
    the GPU); one FFMA scales it and removes the offset. |c_q| <= 144 s, so its float32 rounding (below
    2**-17 s) is far below the 16-bit rounding of the result."""
    if I < 4:
        ws = words << (16 - 4 * I)
    elif I > 4:
        ws = words >> (4 * I - 16)  # arithmetic: the sign only fills bits above 19
    else:
        ws = words
    return _under_exponent(ws, 0xF0000, FAST) * s_q + c_q


@triton.jit
def _dequant(words, s, z, FAST: tl.constexpr):
    """words [BN, W] int32 (nibble i of word w = code 8w + i), s / z [BN] float32 -> [BN, 8W] float32
    (Q - z) * s, column 8w + i = nibble i of word w (~3 instructions per code)."""
    BN: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    s_q = (s * (1.0 / 65536))[:, None]
    c_q = (-(128.0 + z) * s)[:, None]
    n0 = _nibble(words, 0, s_q, c_q, FAST)
    n1 = _nibble(words, 1, s_q, c_q, FAST)
    n2 = _nibble(words, 2, s_q, c_q, FAST)
    n3 = _nibble(words, 3, s_q, c_q, FAST)
    n4 = _nibble(words, 4, s_q, c_q, FAST)
    n5 = _nibble(words, 5, s_q, c_q, FAST)
    n6 = _nibble(words, 6, s_q, c_q, FAST)
    n7 = _nibble(words, 7, s_q, c_q, FAST)
    # nested joins: the first axis made separates i from i + 4, the next i from i + 2, the last i from i + 1
    a = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    return tl.reshape(a, [BN, 8 * W])  # [BN, W, 2, 2, 2] -> nibble 4a + 2b + c of word w


@triton.jit
def _dequant_bytes(b, s, z, FAST: tl.constexpr):
    """b [BN, J] uint8 (byte j = codes 2j (low nibble) and 2j + 1), s / z [BN] float32 -> [BN, 2J] float32
    (Q - z) * s, column 2j + t = nibble t of byte j. Shifted 15 up, the low nibble reads 2**23 + Q 2**15 and the
    high one 2**23 + Q 2**19 under the exponent (bit 23 is the exponent's), and one FFMA each scales and removes
    the offset (256 or 16 codes; |offset + z| s rounds in float32 below 2**-15 s, far below the 16-bit rounding
    of the result)."""
    BN: tl.constexpr = b.shape[0]
    J: tl.constexpr = b.shape[1]
    ws = b.to(tl.int32) << 15
    lo = _under_exponent(ws, 0x78000, FAST) * (s * (1.0 / 32768))[:, None] - ((256.0 + z) * s)[:, None]
    hi = _under_exponent(ws, 0x780000, FAST) * (s * (1.0 / 524288))[:, None] - ((16.0 + z) * s)[:, None]
    return tl.reshape(tl.join(lo, hi), [BN, 2 * J])  # [BN, J, 2] -> column 2j + t


@triton.jit(do_not_specialize=["M", "M_BUCKET", *ROW_INDEX_ARGS])
def _int4_gemm_kernel(
    x_ptr, y_ptr, bias_ptr,  # x [M, K], y [M, N], bias [N]
    q_ptr, zero_ptr, s0_ptr,  # codes_t as int32 words [N_pad, KW] (SWAP: bytes), zeros_t / scales_t [G, N_pad] f32
    chan_ptr, scale_ptr,  # slab tables: chan [Sc, N], scales [Sg, N, G] (any strides)
    chan_idx_ptr, scale_idx_ptr,  # [M] int32
    ws_ptr, cnt_ptr,  # split-K workspace [SPLIT_K, M, N] f32, per-tile arrival counters (zero)
    M, N, K, M_BUCKET,
    stride_xm, stride_ym, stride_qn, stride_zg, stride_cs, stride_ss, stride_sn, stride_sg,
    MODE: tl.constexpr, ONE_SLOT: tl.constexpr, SWAP: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, FAST: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: the programs that share a weight tile run together
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    kb_lo, kb_hi = k_blocks(pid_k, K, BLOCK_K, SPLIT_K)
    if SWAP:
        q_rows = q_ptr + offs_n[:, None] * stride_qn + tl.arange(0, BLOCK_K // 2)[None, :]  # [BN, BK/2] bytes
        x_rows = x_ptr + offs_m[None, :] * stride_xm  # [1, BM]
    else:
        q_rows = q_ptr + offs_n[:, None] * stride_qn + tl.arange(0, BLOCK_K // 8)[None, :]  # [BN, BK/8] (padded)
        x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BM, 1]
    wait_for_producer(PDL)

    cidx = tl.load(chan_idx_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    sidx = tl.load(scale_idx_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    # Mode 1: every row on the base scales s0, one pass over K. Mode 2: one pass per scale slot present among
    # the tile's rows (ascending), x masked to that slot's rows; a tile of one adapter is one pass. The slot's
    # scale row goes into the dequantized weights, so the dots chain through K. The passes and K blocks are
    # one flat loop: a loop around the pipelined K loop doubled the registers (255 against 104 at 64 x 64).
    # ONE_SLOT (mode 2, every row on one slot): one pass on the first row's slot.
    NONE: tl.constexpr = 1 << 40
    if MODE == 1:
        passes = 1
        slot = tl.zeros([], dtype=tl.int64)
        s_table, s_slot_stride, s_stride = s0_ptr, 0, stride_zg
    elif ONE_SLOT:
        passes = 1
        slot = tl.load(scale_idx_ptr).to(tl.int64)
        s_table, s_slot_stride, s_stride = scale_ptr, stride_ss, stride_sg
    else:
        earlier = tl.arange(0, BLOCK_M)[None, :] < tl.arange(0, BLOCK_M)[:, None]  # [BM, BM]: j < i
        seen = tl.max(((sidx[:, None] == sidx[None, :]) & earlier & m_ok[None, :]).to(tl.int32), 1)  # [BM]
        passes = tl.sum((m_ok & (seen == 0)).to(tl.int32))  # distinct slots among the rows
        slot = tl.min(tl.where(m_ok, sidx, NONE))
        s_table, s_slot_stride, s_stride = scale_ptr, stride_ss, stride_sg
    s_cols = s_table + offs_n * stride_sn if MODE == 2 else s_table + offs_n  # [BN] (+ slot, group offsets)
    n_kb = kb_hi - kb_lo
    s_nx = _scale_row(s_cols, slot, s_slot_stride, kb_lo, s_stride, offs_n, N, GROUP_SIZE, BLOCK_K)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y^T
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FAST:  # a for loop: the compiler software-pipelines the code and x tiles (num_stages)
        for it in range(0, passes * n_kb):
            acc, slot, s_nx = _step(acc, it, slot, s_nx, kb_lo, kb_hi, n_kb, sidx, m_ok, q_rows, x_rows, offs_n,
                                    s_cols, s_slot_stride, s_stride, N, K, zero_ptr, stride_zg, MODE, ONE_SLOT,
                                    SWAP, GROUP_SIZE, FAST, DT, PREC, BLOCK_K)
    else:  # the interpreter (numpy >= 2.3) cannot range() over tensor bounds
        it = 0
        while it < passes * n_kb:
            acc, slot, s_nx = _step(acc, it, slot, s_nx, kb_lo, kb_hi, n_kb, sidx, m_ok, q_rows, x_rows, offs_n,
                                    s_cols, s_slot_stride, s_stride, N, K, zero_ptr, stride_zg, MODE, ONE_SLOT,
                                    SWAP, GROUP_SIZE, FAST, DT, PREC, BLOCK_K)
            it += 1
    if SWAP:
        acc = tl.trans(acc)  # [BM, BN], once a tile

    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        _store(acc, y_ptr, bias_ptr, chan_ptr, cidx, offs_m, offs_n, out_mask, n_ok, stride_ym, stride_cs, HAS_BIAS)
    else:  # the last split to arrive finishes the tile (kernels/tile_epilogue.py)
        tile = pid_n * tl.num_programs(0) + pid_m
        if park_partial(acc, ws_ptr, cnt_ptr, tile, pid_k, offs_m, offs_n, M, N, out_mask, SPLIT_K):
            total = summed_partials(ws_ptr, cnt_ptr, tile, offs_m, offs_n, M, N, out_mask, SPLIT_K, BLOCK_M, BLOCK_N)
            _store(total, y_ptr, bias_ptr, chan_ptr, cidx, offs_m, offs_n, out_mask, n_ok, stride_ym, stride_cs,
                   HAS_BIAS)


@triton.jit
def _step(acc, it, slot, s_nx, kb_lo, kb_hi, n_kb, sidx, m_ok, q_rows, x_rows, offs_n, s_cols, s_slot_stride,
          s_stride, N, K, zero_ptr, stride_zg, MODE: tl.constexpr, ONE_SLOT: tl.constexpr, SWAP: tl.constexpr,
          GROUP_SIZE: tl.constexpr, FAST: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """K block kb_lo + it % n_kb of the pass for `slot`: acc [BM, BN] += x[slot's rows] @ ((Q - z) s)^T
    (SWAP: acc [BN, BM] += (Q - z) s @ x[slot's rows]^T).
    Returns (acc, the next step's slot, its scale row).

    The scale row of the next step is loaded in this one: a 16-bit table row is 2 bytes a thread, which
    the compiler's cp.async pipeline does not take, and its latency would stand in every block."""
    MULTI: tl.constexpr = MODE == 2 and not ONE_SLOT
    if MULTI:
        kb = kb_lo + it % n_kb
        rows_ok = m_ok & (sidx == slot)
    else:  # one pass
        kb = kb_lo + it
        rows_ok = m_ok
    last = kb + 1 == kb_hi
    if MULTI:  # branch-free: an `if last:` around this reduction made mode 2 40 % slower (H100)
        NONE: tl.constexpr = 1 << 40
        later = tl.min(tl.where(m_ok & (sidx > slot), sidx, NONE))
        slot_nx = tl.where(last & (later < NONE), later, slot)  # past the last pass: any valid slot
    else:
        slot_nx = slot
    if SWAP:  # this block's row, staged by the pipeline with the codes (see the module's docstring)
        s = _scale_row(s_cols, slot, s_slot_stride, kb, s_stride, offs_n, N, GROUP_SIZE, BLOCK_K)
    else:
        s = s_nx
        s_nx = _scale_row(s_cols, slot_nx, s_slot_stride, tl.where(last, kb_lo, kb + 1), s_stride, offs_n, N,
                          GROUP_SIZE, BLOCK_K)
    z = tl.load(zero_ptr + _group(kb, GROUP_SIZE, BLOCK_K) * stride_zg + offs_n)  # [BN] (padded: no mask)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    if SWAP:
        w = _dequant_bytes(tl.load(q_rows + kb * (BLOCK_K // 2)), s, z, FAST)  # [BN, BK] = (Q - z) s
        xt = tl.load(x_rows + offs_k[:, None], mask=rows_ok[None, :] & (offs_k < K)[:, None], other=0.0).to(DT)
        acc = tl.dot(w.to(DT), xt, acc, input_precision=PREC)
    else:
        w = _dequant(tl.load(q_rows + kb * (BLOCK_K // 8)), s, z, FAST)  # [BN, BK] = (Q - z) s
        xt = tl.load(x_rows + offs_k[None, :], mask=rows_ok[:, None] & (offs_k < K)[None, :], other=0.0).to(DT)
        acc = tl.dot(xt, tl.trans(w.to(DT)), acc, input_precision=PREC)
    return acc, slot_nx, s_nx


@triton.jit
def _scale_row(s_cols, slot, s_slot_stride, kb, s_stride, offs_n, N, GROUP_SIZE: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """float32 [BN] scale row of (slot, K block kb's group)."""
    g = _group(kb, GROUP_SIZE, BLOCK_K)
    return tl.load(s_cols + slot * s_slot_stride + g * s_stride, mask=offs_n < N, other=0.0).to(tl.float32)


@triton.jit
def _group(kb, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The group of K block kb (BLOCK_K divides the group size)."""
    if GROUP_SIZE <= 0:
        return 0
    else:
        return kb // (GROUP_SIZE // BLOCK_K)


@triton.jit
def _store(acc, y_ptr, bias_ptr, chan_ptr, cidx, offs_m, offs_n, out_mask, n_ok, stride_ym, stride_cs,
           HAS_BIAS: tl.constexpr):
    """y = acc * chan[c_m, n] (+ bias)."""
    acc *= tl.load(chan_ptr + cidx[:, None] * stride_cs + offs_n[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
    store_rows(acc, y_ptr, bias_ptr, offs_m, offs_n, out_mask, n_ok, stride_ym, HAS_BIAS)


_KEY = ["M_BUCKET", "N", "K", "MODE", "ONE_SLOT", "SWAP", "GROUP_SIZE", "HAS_BIAS"]  # + x dtype (added by triton)


_tuned = triton.autotune(configs=CONFIGS + SWAP_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                         do_bench=quick_bench, cache_results=True)(_int4_gemm_kernel)


def int4_gemm_supported(x: torch.Tensor, mode: int, group_size: int, has_zeros: bool) -> bool:
    """Whether the inputs fit this kernel: modes 1/2 on an rtn base; on CUDA 16-bit x (the codes become
    fp16 / bf16 MMA operands; float32 x takes int4_matmul's tile)."""
    if not (mode in MODES and has_zeros and group_size in GROUP_SIZES):
        return False
    if x.device.type == "cpu":  # the interpreter computes in float32
        return x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return x.dtype in (torch.bfloat16, torch.float16)


def launch_int4_gemm(x, y, w, chan, scales, chan_idx, scale_idx, mode, bias, config, ws, cnt, one_slot=False,
                     swap=False):
    """y [M, N] = the modes 1/2 semantics for x [M, K] (contiguous rows); w: int4_matmul.Int4Weights.
    one_slot: the caller's promise that every row has the same scale_idx (mode 2: one pass, mode 1's loop).
    swap: the codes as the MMA's A operand (SWAP; a config's "SWAP" key decides where a config is given).

    ws: float32 workspace of at least workspace_numel(M, N, config) elements, cnt:
    zeroed int32 counters, one per output tile. config: BLOCK_M, BLOCK_N, SPLIT_K, optional BLOCK_K (default
    the group size, 128 per-channel) / num_warps / num_stages (else autotuned; a fixed small one in the
    interpreter)."""
    M, K = x.shape
    N = w.N
    if not int4_gemm_supported(x, mode, w.group_size, w.zeros_t is not None):
        raise ValueError("the fold GEMM takes modes 1/2 on an rtn base with group size -1, 32, 64 or 128, "
                         "and on CUDA fp16 / bf16 x")
    interpret = x.device.type == "cpu"
    if config is not None:
        swap = bool(config.get("SWAP"))
    # [N_pad, Kh_pad/4] words: word w holds codes 8w..8w+7 (nibble i = code 8w+i); SWAP reads the same bytes
    codes = w.codes_t if swap else w.codes_t.view(torch.int32)
    st = scales if scales is not None else w.zeros_t
    s_strides = (st.stride(0), st.stride(1), st.stride(2)) if scales is not None else (0, 0, 0)
    args = (x, y, bias if bias is not None else x, codes, w.zeros_t, w.scales_t, chan, st, chan_idx, scale_idx, ws, cnt,
            M, N, K, min(triton.next_power_of_2(M), 1024),
            x.stride(0), y.stride(0), codes.stride(0), w.zeros_t.stride(0), chan.stride(0), *s_strides)
    dt = tl.float32 if interpret else (tl.float16 if x.dtype == torch.float16 else tl.bfloat16)
    meta = dict(MODE=mode, ONE_SLOT=bool(one_slot) and mode == 2, SWAP=swap, GROUP_SIZE=w.group_size,
                HAS_BIAS=bias is not None,
                FAST=not interpret, DT=dt, PREC="ieee" if interpret else None, **launch_kwargs(x))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is None and interpret:
        config = INTERPRET_CONFIG
    if config is None:
        if ws.numel() < workspace_numel(M, N):
            raise ValueError("workspace too small for the autotuned split-K")
        _tuned[grid](*args, **meta)
        return y
    cfg = {"BLOCK_K": w.group_size if w.group_size > 0 else 128,
           **{k: v for k, v in config.items() if k not in ("FOLD", "SWAP")}}
    if w.group_size > 0 and w.group_size % cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {cfg['BLOCK_K']} must divide the group size {w.group_size}")
    if cfg["SPLIT_K"] > 1 and (ws.numel() < cfg["SPLIT_K"] * M * N
                               or triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]) > cnt.numel()):
        raise ValueError("workspace or counters too small for this SPLIT_K")
    _int4_gemm_kernel[grid](*args, **meta, **cfg)
    return y
