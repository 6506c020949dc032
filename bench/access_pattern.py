"""How fast an M = 1 kernel can read the int4 codes of a 7B layer, with no arithmetic: the ceiling the
MMA GEMV's loads put on it, timed like bench/kernels.py (CUDA-graph replay over enough copies that L2
cannot hold them, median).

    python bench/access_pattern.py [--json PATH]

Each kernel folds the codes ([N, KW] int32 words) into a register tile with xor and stores one tile per
program. Variants, per 7B shape:
  regs BN w d     the MMA GEMV's pattern: a program owns BLOCK_N rows and walks K in steps of 128 words
                  (512 bytes of each row), the next DEPTH steps loaded into registers ahead of the fold;
  smem BN w sS    the same steps in a `tl.range(num_stages=S)` loop: Triton's pipeliner streams them
                  through shared memory (cp.async), S - 1 steps in flight, no registers held for them;
  tma BN w sS     the same steps as TMA loads (a tensor descriptor per code matrix), pipelined the same way;
  stream sS       the ideal read: each program reads one contiguous range in 16 KB blocks, pipelined the
                  same way, two programs per SM; last, once over all four shapes' codes in one kernel;
  copy            torch's device-to-device copy of the same bytes (reads and writes them).
"pdl": launched with programmatic dependent launch like our kernels (regs: the first step prefetched into L2
before the wait, as the GEMV does). If "smem" reads much faster than "regs", the GEMV's register prefetch
is what caps it; "stream" and "copy" show what launch, ramp and tail cost a kernel of this size whatever
it does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import torch
import triton
import triton.language as tl

from scaleserve.kernels.pdl import launch_kwargs, prefetch_l2, wait_for_producer

# bench/kernels.py's timing (a script beside this one, not a package)
_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)

SHAPES = (("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11264))


@triton.jit
def _regs_kernel(q_ptr, out_ptr, KW, steps, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)[:, None]
    v = tl.arange(0, 128)[None, :]
    base = q_ptr + (pid * BLOCK_N + rows) * KW + v  # [BLOCK_N, 128]
    if PDL:  # as the GEMV: the first step into L2, then wait for the previous kernel
        prefetch_l2(base, (v % 32) == 0)
    wait_for_producer(PDL)
    acc = tl.zeros([BLOCK_N, 128], tl.int32)
    nxt = tl.load(base, eviction_policy="evict_first")
    if DEPTH == 2:
        nxt2 = tl.load(base + 128, mask=steps > 1, other=0, eviction_policy="evict_first")
    for s in range(0, steps):
        cur = nxt
        if DEPTH == 2:
            nxt = nxt2
            nxt2 = tl.load(base + (s + 2) * 128, mask=s + 2 < steps, other=0, eviction_policy="evict_first")
        else:
            nxt = tl.load(base + (s + 1) * 128, mask=s + 1 < steps, other=0, eviction_policy="evict_first")
        acc ^= cur
    tl.store(out_ptr + pid * BLOCK_N * 128 + rows * 128 + v, acc)


@triton.jit
def _smem_kernel(q_ptr, out_ptr, KW, steps, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)[:, None]
    v = tl.arange(0, 128)[None, :]
    base = q_ptr + (pid * BLOCK_N + rows) * KW + v
    acc = tl.zeros([BLOCK_N, 128], tl.int32)
    for s in tl.range(0, steps, num_stages=STAGES):
        acc ^= tl.load(base + s * 128, eviction_policy="evict_first")
    tl.store(out_ptr + pid * BLOCK_N * 128 + rows * 128 + v, acc)


@triton.jit
def _tma_kernel(q_desc, out_ptr, steps, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)[:, None]
    v = tl.arange(0, 128)[None, :]
    acc = tl.zeros([BLOCK_N, 128], tl.int32)
    for s in tl.range(0, steps, num_stages=STAGES):
        acc ^= q_desc.load([pid * BLOCK_N, s * 128])
    tl.store(out_ptr + pid * BLOCK_N * 128 + rows * 128 + v, acc)


@triton.jit
def _stream_kernel(q_ptr, out_ptr, n_words, chunk, BLOCK: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    start = pid * chunk
    wait_for_producer(PDL)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.range(0, chunk, BLOCK, num_stages=STAGES):
        k = start + i + offs
        acc ^= tl.load(q_ptr + k, mask=k < n_words, other=0, eviction_policy="evict_first")
    tl.store(out_ptr + pid * BLOCK + offs, acc)


_descriptors = {}


def _descriptor(q: torch.Tensor, N: int, KW: int, bn: int):
    """A host-side TMA descriptor of q as [N, KW] with [bn, 128] boxes (built once per tensor, outside the graph)."""
    key = (q.data_ptr(), bn)
    if key not in _descriptors:
        from triton.tools.tensor_descriptor import TensorDescriptor

        _descriptors[key] = TensorDescriptor(q, [N, KW], [KW, 1], [bn, 128])
    return _descriptors[key]


def _pdl(on: bool, t: torch.Tensor) -> dict:
    """Launch arguments with or without programmatic dependent launch (as our kernels get them)."""
    return launch_kwargs(t) if on else {"PDL": False}


def stream_variants(words: int, sms: int) -> list:
    """(label, launch(q, out)): two programs per SM, each reading one contiguous range of the words."""
    block = 4096  # words: 16 KB a load
    programs = 2 * sms
    chunk = triton.cdiv(triton.cdiv(words, programs), block) * block
    return [(f"stream x2/SM s{stages}" + (" pdl" if pdl else ""),
             lambda q, o, s=stages, p=pdl: _stream_kernel[(programs,)](q, o, words, chunk, BLOCK=block, STAGES=s,
                                                                      num_warps=8, **_pdl(p, q)))
            for stages, pdl in ((3, False), (4, False), (4, True))]


def variants(N: int, KW: int, sms: int) -> list:
    """(label, launch(q, out)) for one shape."""
    steps = KW // 128
    out = []
    for bn, warps, depth, pdl in ((16, 4, 1, False), (32, 4, 1, False), (16, 4, 2, False), (32, 8, 1, False),
                                  (16, 4, 1, True), (16, 4, 2, True)):
        out.append((f"regs BN {bn} w{warps} d{depth}" + (" pdl" if pdl else ""),
                    lambda q, o, bn=bn, w=warps, d=depth, p=pdl: _regs_kernel[(N // bn,)](
                        q, o, KW, steps, BLOCK_N=bn, DEPTH=d, num_warps=w, num_stages=1, **_pdl(p, q))))
    for bn, warps, stages in ((16, 4, 3), (16, 4, 4), (32, 4, 3), (32, 8, 4)):
        out.append((f"smem BN {bn} w{warps} s{stages}", lambda q, o, bn=bn, w=warps, s=stages: _smem_kernel[(N // bn,)](
            q, o, KW, steps, BLOCK_N=bn, STAGES=s, num_warps=w)))
    for bn, warps, stages in ((16, 4, 4), (32, 4, 3), (32, 4, 4)):
        out.append((f"tma BN {bn} w{warps} s{stages}", lambda q, o, bn=bn, w=warps, s=stages: _tma_kernel[(N // bn,)](
            _descriptor(q, N, KW, bn), o, steps, BLOCK_N=bn, STAGES=s, num_warps=w)))
    out += stream_variants(N * KW, sms)
    out.append(("copy", lambda q, o: o.copy_(q)))
    return out


def measure(name: str, N: int, K: int, launches: list, bw: float, match: str) -> list[dict]:
    """Times each (label, launch) whose label matches over enough copies of [N, K // 8] int32 codes."""
    words = N * (K // 8)
    nbytes = 4 * words
    qs = [torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device="cuda")
          for _ in range(bench_kernels.n_copies(nbytes))]
    sink = torch.empty(words, dtype=torch.int32, device="cuda")  # (big enough for every variant's output)
    floor = nbytes / bw * 1e6
    rows = []
    for label, launch in launches:
        if not re.search(match, label):
            continue
        try:
            us = bench_kernels.graph_us([lambda q=q: launch(q, sink) for q in qs])
        except Exception as e:  # a variant that does not compile here is reported, not fatal
            print(f"{name:8s} {label:22s}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        moved = 2 * nbytes if label == "copy" else nbytes  # (a copy reads and writes them)
        rows.append(dict(shape=name, N=N, K=K, variant=label, us=us, tb_s=moved / (us * 1e-6) / 1e12, floor_us=floor))
        print(f"{name:8s} {label:22s}: {us:6.1f} µs  {rows[-1]['tb_s']:.2f} TB/s  (floor {floor:.1f} µs)", flush=True)
    _descriptors.clear()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--match", default="", help="only the variants whose label matches this regular expression")
    a = ap.parse_args(argv)
    bw = bench_kernels.copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for name, N, K in SHAPES:  # (down's K rounded up to whole steps)
        rows += measure(name, N, K, variants(N, K // 8, sms), bw, a.match)
    # the four shapes' codes as one kernel's read (shape "layer"): what the per-kernel ramp costs a layer
    words = sum(N * (K // 8) for _, N, K in SHAPES)
    rows += measure("layer", words, 8, stream_variants(words, sms), bw, a.match)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
