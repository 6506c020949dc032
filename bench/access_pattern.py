"""How fast an M = 1 kernel can read int4 codes in the MMA GEMV's access pattern, with no arithmetic.

    python bench/access_pattern.py [--json PATH]

Each program owns BLOCK_N rows of an [N, KW] int32 code matrix and walks K in steps of 128 words (8 K
blocks), loading the next step(s) while it folds the current one (xor) into a register tile, like
kernels/int4_mma_gemv.py. Two layouts of the same bytes:
  rows    a step reads 512 contiguous bytes of each of the BLOCK_N rows (the codes_t layout: rows KW
          words apart);
  tiled   a step reads BLOCK_N * 512 contiguous bytes (a tile's rows of one step stored together).
and two structures: one program per tile (as the GEMV), or one wave of persistent programs whose next load
crosses tile boundaries. If "tiled" reads much faster than "rows", the code layout caps the GEMV; if the
persistent wave reads much faster, the programs' start and end (and gate_up's 1.7 waves) do.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl


@triton.jit
def _read_kernel(q_ptr, out_ptr, KW, steps, TILED: tl.constexpr, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)[:, None]
    v = tl.arange(0, 128)[None, :]  # steps: KW // 128
    if TILED:  # [tiles, steps, BLOCK_N, 128]
        base = q_ptr + pid * BLOCK_N * KW + rows * 128 + v
        step_words = BLOCK_N * 128
    else:  # [N, KW]
        base = q_ptr + (pid * BLOCK_N + rows) * KW + v
        step_words = 128
    acc = tl.zeros([BLOCK_N, 128], tl.int32)
    nxt = tl.load(base, eviction_policy="evict_first")
    if DEPTH == 2:
        nxt2 = tl.load(base + step_words, mask=steps > 1, other=0, eviction_policy="evict_first")
    s = 0
    while s < steps:  # (a while loop: the interpreter cannot range over a runtime bound)
        cur = nxt
        if DEPTH == 2:
            nxt = nxt2
            nxt2 = tl.load(base + (s + 2) * step_words, mask=s + 2 < steps, other=0, eviction_policy="evict_first")
        else:
            nxt = tl.load(base + (s + 1) * step_words, mask=s + 1 < steps, other=0, eviction_policy="evict_first")
        acc ^= cur
        s += 1
    tl.store(out_ptr + pid * BLOCK_N * 128 + rows * 128 + v, acc)


@triton.jit
def _step_ptrs(q_ptr, tile, s, KW, rows, v, TILED: tl.constexpr, BLOCK_N: tl.constexpr):
    if TILED:
        return q_ptr + tile * BLOCK_N * KW + s * BLOCK_N * 128 + rows * 128 + v
    return q_ptr + (tile * BLOCK_N + rows) * KW + s * 128 + v


@triton.jit
def _read_persistent_kernel(q_ptr, out_ptr, KW, steps, tiles, TILED: tl.constexpr, BLOCK_N: tl.constexpr):
    """One wave of programs; program p reads tiles p, p + P, ... as one flat loop over (tile, step) whose
    next load crosses tile boundaries (no restart per tile; a tile's xor is stored when it ends)."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_N)[:, None]
    v = tl.arange(0, 128)[None, :]
    acc = tl.zeros([BLOCK_N, 128], tl.int32)
    tile = pid
    s = 0
    nxt = tl.load(_step_ptrs(q_ptr, tile, s, KW, rows, v, TILED, BLOCK_N), mask=(rows >= 0) & (tile < tiles),
                  other=0, eviction_policy="evict_first")
    while tile < tiles:
        cur = nxt
        s1 = s + 1
        t1 = tile
        if s1 == steps:
            s1 = 0
            t1 = tile + P
        nxt = tl.load(_step_ptrs(q_ptr, t1, s1, KW, rows, v, TILED, BLOCK_N), mask=(rows >= 0) & (t1 < tiles),
                      other=0, eviction_policy="evict_first")
        acc ^= cur
        if s1 == 0:
            tl.store(out_ptr + tile * BLOCK_N * 128 + rows * 128 + v, acc)
            acc = tl.zeros([BLOCK_N, 128], tl.int32)
        tile = t1
        s = s1


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=100)
    return 2 * nbytes / (ms * 1e-3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    # the 7B layer's large shapes (down's K rounded up to whole steps); do_bench clears L2 between calls
    for name, N, K in (("qkv", 12288, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11264)):
        KW = K // 8
        q = torch.randint(-2**31, 2**31 - 1, (N * KW,), dtype=torch.int32, device="cuda")
        out = torch.empty(N * 128, dtype=torch.int32, device="cuda")
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        # depth 0: the persistent kernel, one wave of `per_sm` programs per SM
        for (bn, warps, depth), tiled in itertools.product(((16, 4, 1), (32, 4, 1), (16, 4, 2), (32, 8, 1),
                                                            (16, 4, 0), (32, 4, 0)), (False, True)):
            def call():
                if depth == 0:
                    per_sm = 5 if bn == 16 else 3
                    _read_persistent_kernel[(min(N // bn, per_sm * sms),)](
                        q, out, KW, KW // 128, N // bn, TILED=tiled, BLOCK_N=bn, num_warps=warps, num_stages=1)
                else:
                    _read_kernel[(N // bn,)](q, out, KW, KW // 128, TILED=tiled, BLOCK_N=bn, DEPTH=depth,
                                             num_warps=warps, num_stages=1)

            ms = triton.testing.do_bench(call, warmup=10, rep=100)
            nbytes = N * KW * 4
            r = dict(shape=name, N=N, K=K, block_n=bn, warps=warps, depth=depth, persistent=depth == 0,
                     layout="tiled" if tiled else "rows", us=ms * 1e3, tb_s=nbytes / (ms * 1e-3) / 1e12,
                     floor_us=nbytes / bw * 1e6)
            rows.append(r)
            kind = "persistent" if depth == 0 else f"d{depth}"
            print(f"{name:8s} {r['layout']:5s} BN {bn:2d} w{warps} {kind:10s}: {r['us']:6.1f} µs  {r['tb_s']:.2f} TB/s "
                  f"(floor {r['floor_us']:.1f} µs)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
