"""Transfers between pinned host memory and the GPU done by the SMs, not the copy engine.

A decode step's inputs (~1 KB at batch 1) and its sampled tokens (8 bytes) are tiny, but a cudaMemcpyAsync of either
hands the stream from the compute engine to a copy engine and back: on an H100 the upload before a batch-1 7B replay
and the tokens' copy home after it cost 18.5 µs a step against back-to-back replays (bench/decode_bounds.py `ops`,
session 28), ~1 % of the step. A kernel reads or writes mapped pinned memory over PCIe directly (a host pointer from
cudaHostAlloc is a device pointer too under unified addressing), stays on the compute engine, and can sit inside the
step's CUDA graph, so the graph itself takes its inputs from the host and leaves its tokens there.

  fetch_words(src, dst)   dst[w] = src[HEADER_WORDS + w] for src[0] <= w < len(dst)   (src pinned host int32)
  send_home(src, dst)     dst[i] = src[i]                                            (dst pinned host)

A pinned buffer is written by the host before the launch that reads it, and read by the host after an event
recorded after the kernel that wrote it: the usual zero-copy contract (server/graphs.py alternates two buffers
so the host never writes one a queued graph may still read). Loads bypass caches (.cv) and stores write through
(.wt): lines of host memory are not kept across launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HEADER_WORDS = 4  # int32 words before the payload (16 bytes: the payload stays 16-byte aligned); [0]: first word
FETCH_BLOCK = 1024


@triton.jit
def _fetch_words_kernel(src_ptr, dst_ptr, n_words, HEADER: tl.constexpr, BLOCK: tl.constexpr):
    # src: int32 [HEADER + n_words] host memory, src[0] the first payload word to copy; dst: int32 [n_words] device
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first = tl.load(src_ptr, cache_modifier=".cv")
    keep = (offs >= first) & (offs < n_words)
    words = tl.load(src_ptr + HEADER + offs, mask=keep, cache_modifier=".cv")
    tl.store(dst_ptr + offs, words, mask=keep)


@triton.jit
def _send_home_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m), mask=m, cache_modifier=".wt")


def fetch_words(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[w] = src[HEADER_WORDS + w] for every w from src[0] on (the words before it keep their values).
    src: int32 [HEADER_WORDS + n] (pinned host memory, or any tensor the kernel can read); dst: int32 [n]."""
    n = dst.numel()
    if src.dtype != torch.int32 or dst.dtype != torch.int32 or src.numel() != HEADER_WORDS + n:
        raise ValueError(f"fetch_words: int32 [{HEADER_WORDS} + n] into int32 [n], got {src.dtype} "
                         f"[{src.numel()}] into {dst.dtype} [{n}]")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("fetch_words: contiguous buffers only")
    _fetch_words_kernel[(triton.cdiv(n, FETCH_BLOCK),)](src, dst, n, HEADER=HEADER_WORDS, BLOCK=FETCH_BLOCK)


def send_home(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[:] = src (same dtype and size): a device tensor's values into pinned host memory by a kernel."""
    if src.dtype != dst.dtype or src.numel() != dst.numel() or not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError(f"send_home: contiguous {src.dtype} [{src.numel()}] into {dst.dtype} [{dst.numel()}]")
    n = src.numel()
    block = max(16, triton.next_power_of_2(min(n, 1024)))
    _send_home_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)
