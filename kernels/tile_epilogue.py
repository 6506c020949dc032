"""What the tensor-core tiles (int4_matmul's and int4_gemm's) share around their K loop: split-K and the store.

Split-K: each split takes a contiguous share of the K blocks and parks its float32 partial tile in a
workspace; the last split of a tile to arrive (a per-tile counter) sums the partials in a fixed order and
finishes the tile. One launch does all, the result is deterministic, and the counter is reset by that
last split, so the same counters serve the next launch and every CUDA-graph replay."""

import triton
import triton.language as tl


@triton.jit
def park_partial(acc, ws_ptr, cnt_ptr, tile, pid_k, offs_m, offs_n, M, N, out_mask, SPLIT_K: tl.constexpr):
    """Store split pid_k's acc [BM, BN] in ws [SPLIT_K, M, N]; True in the split that arrived last."""
    tl.store(ws_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)
    tl.debug_barrier()  # every thread's partial is written before the arrival is published
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    return arrived == SPLIT_K - 1


@triton.jit
def summed_partials(ws_ptr, cnt_ptr, tile, offs_m, offs_n, M, N, out_mask, SPLIT_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's sum over its splits (in split order), read by the last split; resets the tile's counter."""
    ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for sk in tl.static_range(SPLIT_K):
        total += tl.load(ws_tile + sk * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
    tl.atomic_xchg(cnt_ptr + tile, 0)
    return total


@triton.jit
def k_blocks(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """(kb_lo, kb_hi): the K blocks of split pid_k, a contiguous share of the cdiv(K, BLOCK_K) blocks."""
    num_kb = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * per_split
    return kb_lo, tl.minimum(kb_lo + per_split, num_kb)


@triton.jit
def store_rows(acc, y_ptr, bias_ptr, offs_m, offs_n, out_mask, n_ok, stride_ym, HAS_BIAS: tl.constexpr):
    """y[offs_m, offs_n] = acc (+ bias[offs_n]) in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
