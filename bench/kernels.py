"""Benchmark: int4 adapted matmul (ours) vs bf16 F.linear vs tinygemm, per Llama-2-7B layer.

One GPU, one run. For each of the 4 linear shapes of a Llama-2-7B layer (qkv 4096->12288,
o 4096->4096, gate_up 4096->22016, down 11008->4096), M in {1,4,16,64,256}, T in {1, min(M,64)}
distinct adapters, group size -1 / 128 and each mode, the median time of one call, measured by
CUDA-graph replay over enough copies of the weights (and adapter tables) that the 50 MB L2 cannot
hold them. The floor is the int4 code bytes over the measured device-to-device copy bandwidth.

  python bench/kernels.py --json out.json --png out.png

Prints one table (µs per 7B layer = sum of the 4 shapes) and writes JSON rows
{shape,K,N,M,T,group_size,mode,us,bf16_us,tinygemm_us,tinygemm_loop_us,floor_us} (+ floor_t_us:
the codes plus the T adapters' fp16 tables, and the autotuned config).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
# SmolLM2-135M's four linears (K -> N), for `--shapes sm_qkv,sm_o,sm_gate_up,sm_down --groups 32`: small K,
# where each row's adapter factors weigh as much as the weight tile (the 64-adapter serving ratio)
SHAPES.update({"sm_qkv": (576, 960), "sm_o": (576, 576), "sm_gate_up": (576, 3072), "sm_down": (1536, 576)})
LLAMA_SHAPES = ("qkv", "o", "gate_up", "down")
MS = (1, 4, 16, 64, 256)
L2_BYTES = 50 * 2**20
MIN_FOOTPRINT = 4 * L2_BYTES  # bytes a timed graph cycles through


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e-3)
    del a, b
    return 2 * n / statistics.median(ts)


def graph_us(calls, replays: int = 15) -> float:
    """Median µs per call of a CUDA graph that runs `calls` (a list of thunks) once each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in calls:  # warm-up (autotuning and compilation happen here, outside the graph)
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e3 / len(calls))
    del g
    return statistics.median(ts)


def n_copies(bytes_per_copy: int) -> int:
    return max(2, math.ceil(MIN_FOOTPRINT / bytes_per_copy))


def n_major(t: torch.Tensor) -> torch.Tensor:
    """[..., N, G] with unit stride along N: the layout adapted_linear hands the kernel."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def make_rows(M: int, T: int, mode: int):
    """Rows spread round-robin over T non-base adapters (slots 1..T) of the mode's table."""
    slot = (torch.arange(M) % T + 1).to(torch.int32).cuda()
    zero = torch.zeros(M, dtype=torch.int32, device="cuda")
    minus = torch.full((M,), -1, dtype=torch.int32, device="cuda")
    if mode == 1:
        return slot, zero, minus
    if mode == 2:
        return zero, slot, minus
    return zero, zero, slot


def bench_ours(K, N, gs, mode, M, T, copies_cache, scale_slots, config=None):
    return graph_us(ours_calls(K, N, gs, mode, M, T, copies_cache, scale_slots, config))


def ours_calls(K, N, gs, mode, M, T, copies_cache, scale_slots, config=None) -> list:
    """One thunk per weight copy (enough copies that L2 cannot hold them), each our kernel on that copy."""
    from scaleserve.kernels.int4_matmul import int4_matmul, repack

    G = 1 if gs == -1 else math.ceil(K / gs)
    key = (K, N, gs)
    if key not in copies_cache:
        copies_cache.clear()
        torch.cuda.empty_cache()
        nbytes = N * K // 2 + 8 * N * G
        ws = []
        for _ in range(n_copies(nbytes)):
            packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
            zeros = torch.randint(0, 16, (N, G), device="cuda").float()
            scales = (torch.rand(N, G, device="cuda") + 0.5) * 0.01
            ws.append(repack(packed, K, zeros, scales, gs, 4))
        copies_cache[key] = ws
    weights = copies_cache[key]
    S = T + 1
    calls = []
    x = torch.randn(M, K, device="cuda").bfloat16()
    cidx, sidx, aidx = make_rows(M, T, mode)
    for w in weights:
        # fp16 tables, N-contiguous: what AdapterSlab hands the kernel on CUDA
        chan = (torch.rand(S, N, device="cuda") + 0.5).half()
        scales = n_major(torch.rand(S, N, G, device="cuda") * 0.01).half() if mode >= 2 else None
        alphas = n_major(torch.rand(S, 4, N, G, device="cuda") * 0.01).half() if mode == 3 else None
        betas = n_major(torch.rand(S, N, G, device="cuda") * 0.01).half() if mode == 3 else None
        calls.append(lambda w=w, c=chan, s=scales, a=alphas, b=betas:
                     int4_matmul(x, w, c, s, a, b, cidx, sidx, aidx, mode, config=config,
                                 scale_slots=scale_slots))
    return calls


def chosen_config(M: int, N: int, K: int, mode: int, gs: int, scale_slots: int) -> str:
    """The config the autotuner picked for the shape just timed (its kernel's last key), for the JSON."""
    from scaleserve.kernels import int4_matmul as im

    kind = im.autotuned_kernel(M, N, K, mode, gs, scale_slots)
    tuners = im.autotuners()
    tuner = tuners.get(kind, tuners["decode" if M <= im.DECODE_MAX_M else "gemm"])
    best = getattr(tuner, "best_config", None)
    return "" if best is None else f"{kind}: {best}"


def adapter_bytes(K, N, gs, mode, T, bits=4) -> int:
    """Bytes of the T distinct adapters' fp16 tables one call must read besides the codes.

    They are physical: at group size 128 one adapter's group scales are 1/32 of the int4 codes, so
    64 distinct adapters in mode 2 read twice the codes' bytes in scales alone.
    """
    G = 1 if gs == -1 else math.ceil(K / gs)
    per_adapter = {1: N, 2: N * G, 3: (bits + 1) * N * G}[mode]
    return 2 * T * per_adapter


def bench_bf16(K, N, M):
    ws = [torch.randn(N, K, device="cuda").bfloat16() for _ in range(n_copies(2 * N * K))]
    x = torch.randn(M, K, device="cuda").bfloat16()
    us = graph_us([lambda w=w: F.linear(x, w) for w in ws])
    del ws
    return us


def tinygemm_pack(K, N):
    """Random int4 weight in tinygemm's layout (torch >= 2.5 takes [N, K/2] uint8)."""
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    return torch.ops.aten._convert_weight_to_int4pack(packed, 8)


def bench_tinygemm(K, N, M, gs, T):
    """(one call for all M rows, T calls of M/T rows each with its own scales) in µs."""
    gs = 128 if gs == -1 else gs  # tinygemm has no per-channel mode: per-channel rows use its 128
    G = K // gs
    nbytes = N * K // 2
    ws = [tinygemm_pack(K, N) for _ in range(n_copies(nbytes))]
    sz = [[(torch.rand(G, N, 2, device="cuda") * 0.01).bfloat16() for _ in range(T)] for _ in ws]
    x = torch.randn(M, K, device="cuda").bfloat16()
    once = graph_us([lambda w=w, s=s: torch.ops.aten._weight_int4pack_mm(x, w, gs, s[0]) for w, s in zip(ws, sz)])
    if T == 1:
        return once, once
    rows = [x[t::T].contiguous() for t in range(T)]

    def loop(w, s):
        for t in range(T):
            torch.ops.aten._weight_int4pack_mm(rows[t], w, gs, s[t])

    looped = graph_us([lambda w=w, s=s: loop(w, s) for w, s in zip(ws, sz)], replays=7)
    return once, looped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--modes", default="1,2,3")
    ap.add_argument("--groups", default="-1,128")
    ap.add_argument("--shapes", default=",".join(LLAMA_SHAPES))
    ap.add_argument("--gemv-max-m", type=int, default=None,
                    help="largest M sent to the decode GEMV (0: tensor-core path only); default: the kernel's")
    ap.add_argument("--mma-policy", choices=("auto", "per-channel", "never"), default=None,
                    help="where M = 1 takes the MMA GEMV: auto (the default: every mode 1/2 call it supports), "
                         "per-channel layers only, or never")
    ap.add_argument("--mma-alpha-policy", choices=("auto", "never"), default=None,
                    help="whether M = 1 in mode 3 takes the MMA alpha GEMV (kernels/int4_mma_alpha.py: auto) or the "
                         "CUDA-core plane GEMV (never); default: the kernel's MMA_ALPHA_POLICY")
    ap.add_argument("--alpha-table-pairs", choices=("on", "off"), default=None,
                    help="whether the MMA alpha GEMV reads its alpha and beta tables in row pairs, one step ahead "
                         "(kernels/int4_mma_alpha.py TABLE_PAIRS); default: the kernel's")
    ap.add_argument("--alpha-fold-planes", choices=("on", "off"), default=None,
                    help="whether the MMA alpha batch kernel's plane operands carry K_j (kernels/int4_mma_alpha.py "
                         "FOLD_PLANE_SCALES); default: the kernel's")
    ap.add_argument("--mma-batch-alpha-policy", choices=("auto", "never"), default=None,
                    help="whether mode 3 at 2 <= M <= 16 takes the MMA alpha batch kernel (kernels/int4_mma_alpha.py: "
                         "auto) or the tensor-core tile (never); default: the kernel's MMA_BATCH_ALPHA_POLICY")
    ap.add_argument("--mma-batch-policy", choices=("auto", "all", "never"), default=None,
                    help="where modes 1/2 take the MMA batch kernel (kernels/int4_mma_batch.py): 2 <= M <= 8 (auto), "
                         "1 <= M <= 16 (all) or never (the tensor-core tile)")
    ap.add_argument("--fold-policy", choices=("auto", "always", "never"), default=None,
                    help="where batches in modes 1/2 take the fold GEMM (kernels/int4_gemm.py): auto (M >= "
                         "FOLD_MIN_M), always (M >= 2) or never")
    ap.add_argument("--fold-swap", choices=("on", "off"), default=None,
                    help="whether the fold GEMM takes the code bytes as the MMA's A operand (kernels/int4_matmul.py "
                         "FOLD_SWAP); default: the kernel's")
    ap.add_argument("--fold-one-slot", choices=("on", "off"), default=None,
                    help="whether the fold GEMM runs mode 2 on one promised slot as mode 1's loop (kernels/"
                         "int4_matmul.py FOLD_ONE_SLOT); default: the kernel's")
    ap.add_argument("--t1-only", action="store_true",
                    help="only T = 1 (one adapter): skips the T = min(M, 64) points, for A/Bs of the one-adapter paths")
    ap.add_argument("--no-baselines", action="store_true", help="skip bf16 / tinygemm (NaN in the JSON)")
    ap.add_argument("--gemv-sweep", action="store_true",
                    help="M = 1 only: time each GEMV config of SWEEP_CONFIGS per shape / mode / group (no autotune)")
    ap.add_argument("--mma-sweep", action="store_true",
                    help="M = 1 only: time each MMA GEMV config (int4_mma_gemv's autotune list and "
                         "candidates) per shape / mode / group (no autotune)")
    ap.add_argument("--mma-batch-sweep", action="store_true",
                    help="at the first M of --ms (2-16): time each MMA batch kernel config (int4_mma_batch's "
                         "autotune list and candidates) per shape / mode / group (no autotune)")
    ap.add_argument("--sweep-match", default=None, metavar="REGEX",
                    help="the sweeps time only the configs whose label (as printed, e.g. 16/sk1/d1/w4/xa1/s8) "
                         "REGEX matches: fewer compiles where a device call's minutes are few")
    ap.add_argument("--timing-check", action="store_true",
                    help="M = 1: time the MMA GEMV's autotune list three ways (graph replay over weight "
                         "copies, the autotuners' quick_bench, device.busy_bench) and report each one's pick")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch our kernels without programmatic dependent launch (each waits for the last to drain)")
    ap.add_argument("--merge", default=None,
                    help="earlier JSON: its rows for points not measured in this run are kept (table, JSON, PNG)")
    ap.add_argument("--device-pins", action="store_true",
                    help="the MMA GEMV's configs from kernels/pins/<this GPU>.json where it has them, as the server "
                         "runs them (picked inside the decode graph); default: the autotuner's, timed alone")
    args = ap.parse_args(argv)
    import triton

    torch.manual_seed(0)
    from scaleserve.kernels.pdl import set_pdl

    set_pdl(not args.no_pdl)
    from scaleserve.kernels import int4_matmul as im

    if args.gemv_max_m is not None:
        im.GEMV_MAX_M = args.gemv_max_m
    if args.mma_policy is not None:
        im.MMA_GEMV_POLICY = args.mma_policy
    if args.mma_alpha_policy is not None:
        im.MMA_ALPHA_POLICY = args.mma_alpha_policy
    if args.mma_batch_alpha_policy is not None:
        im.MMA_BATCH_ALPHA_POLICY = args.mma_batch_alpha_policy
    from scaleserve.kernels import int4_mma_alpha

    if args.alpha_table_pairs is not None:
        int4_mma_alpha.TABLE_PAIRS = args.alpha_table_pairs == "on"
    if args.alpha_fold_planes is not None:
        int4_mma_alpha.FOLD_PLANE_SCALES = args.alpha_fold_planes == "on"
    if args.mma_batch_policy is not None:
        im.MMA_BATCH_POLICY = args.mma_batch_policy
    if args.fold_policy is not None:
        im.FOLD_POLICY = args.fold_policy
    if args.fold_swap is not None:
        im.FOLD_SWAP = args.fold_swap == "on"
    if args.fold_one_slot is not None:
        im.FOLD_ONE_SLOT = args.fold_one_slot == "on"
    from scaleserve.kernels import int4_mma_gemv

    int4_mma_gemv.USE_DEVICE_PINS = args.device_pins
    dev = torch.cuda.get_device_name()
    print(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    ms = [int(v) for v in args.ms.split(",")]
    modes = [int(v) for v in args.modes.split(",")]
    groups = [int(v) for v in args.groups.split(",")]
    shapes = args.shapes.split(",")
    rows: list[dict] = []
    t0 = time.time()

    if args.timing_check:
        return timing_check(args, shapes, modes, groups)
    if args.gemv_sweep or args.mma_sweep or args.mma_batch_sweep:
        return gemv_sweep(args, shapes, modes, groups, bw, ms[0] if args.mma_batch_sweep else 1)

    kept: list[dict] = []
    if args.merge:
        with open(args.merge) as f:
            kept = json.load(f)["rows"]

    def key(r):
        return (r["shape"], r["group_size"], r["mode"], r["M"], r["T"])

    def all_rows():
        now = {key(r) for r in rows}
        return [r for r in kept if key(r) not in now] + rows

    def dump():
        if args.json:
            meta = {"device": dev, "torch": torch.__version__, "copy_bw": bw, "pdl": not args.no_pdl}
            if args.merge:
                meta["merged_from"] = args.merge
                meta["measured_now"] = sorted({f"g{r['group_size']} mode {r['mode']} M {r['M']}" for r in rows})
            with open(args.json, "w") as f:
                json.dump({**meta, "rows": all_rows()}, f, indent=1)

    def task_counts(M: int) -> list[int]:
        return [1] if args.t1_only else sorted({1, min(M, 64)})

    for shape in shapes:
        K, N = SHAPES[shape]
        floor_us = (N * K / 2) / bw * 1e6
        nan = float("nan")
        bf16 = {M: nan if args.no_baselines else bench_bf16(K, N, M) for M in ms}
        tg = {}
        for gs in groups:
            for M in ms:
                for T in task_counts(M):
                    if args.no_baselines:
                        tg[gs, M, T] = (nan, nan)
                        continue
                    try:
                        tg[gs, M, T] = bench_tinygemm(K, N, M, gs, T)
                    except Exception as e:  # noqa: BLE001 - a baseline failing must not stop ours
                        print(f"tinygemm failed: {e!r}"[:300], flush=True)
                        tg[gs, M, T] = (float("nan"), float("nan"))
        cache: dict = {}
        for gs in groups:
            for mode in modes:
                for M in ms:
                    for T in task_counts(M):
                        # distinct scale_idx values of make_rows' rows: the caller's promise that lets mode 2
                        # take the fold GEMM
                        scale_slots = T if mode == 2 else 1
                        us = bench_ours(K, N, gs, mode, M, T, cache, scale_slots)
                        rows.append(dict(shape=shape, K=K, N=N, M=M, T=T, group_size=gs, mode=mode, us=us,
                                         bf16_us=bf16[M], tinygemm_us=tg[gs, M, T][0],
                                         tinygemm_loop_us=tg[gs, M, T][1], floor_us=floor_us,
                                         floor_t_us=floor_us + adapter_bytes(K, N, gs, mode, T) / bw * 1e6,
                                         config=chosen_config(M, N, K, mode, gs, scale_slots)))
                        print(f"{shape:8s} g{gs:4d} mode {mode} M {M:3d} T {T:2d}: {us:8.1f} us  "
                              f"(bf16 {bf16[M]:.1f}, tinygemm {tg[gs, M, T][0]:.1f}/{tg[gs, M, T][1]:.1f}, "
                              f"floor {floor_us:.1f})  [{time.time() - t0:.0f}s]", flush=True)
                        dump()
        cache.clear()
        torch.cuda.empty_cache()
    dump()
    print_table(all_rows(), shapes)
    if args.png:
        plot(all_rows(), args.png)
    return 0


SWEEP_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, STAGES=st, num_warps=4)
                 for bn in (16, 32) for bk in (256, 512, 1024) for sk in (1, 2, 4) for st in (1, 3)] + [
    # not measured yet (session 3 ran out of device time): 128 registers -> 4 programs per SM, and
    # a deeper cp.async pipeline
    dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, STAGES=1, num_warps=4, maxnreg=128)
    for bn, bk, sk in ((32, 512, 1), (16, 1024, 1), (32, 256, 4))] + [
    dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, STAGES=4, num_warps=4) for bn, bk in ((32, 512), (16, 1024))]


def sweep_configs(mode):
    """Mode 3 (slow to compile): a subset."""
    if mode == 3:
        return [c for c in SWEEP_CONFIGS if c["BLOCK_N"] == 16 and c["STAGES"] in (1, 3) and c["SPLIT_K"] < 4]
    return SWEEP_CONFIGS


def mma_sweep_configs(batch: bool = False, candidates: bool = True) -> list[dict]:
    """The MMA GEMV's (batch: the MMA batch kernel's) autotune list, then (candidates) the untuned candidates,
    as forced configs."""
    if batch:
        from scaleserve.kernels.int4_mma_batch import MMA_BATCH_CANDIDATE_CONFIGS, MMA_BATCH_CONFIGS

        key, configs, extra = "MMA_BATCH", MMA_BATCH_CONFIGS, MMA_BATCH_CANDIDATE_CONFIGS
    else:
        from scaleserve.kernels.int4_mma_gemv import MMA_CANDIDATE_CONFIGS, MMA_GEMV_CONFIGS

        key, configs, extra = "MMA", MMA_GEMV_CONFIGS, MMA_CANDIDATE_CONFIGS
    from scaleserve.kernels.int4_mma_gemv import config_pin

    return [{key: 1, **config_pin(c)} for c in configs + (extra if candidates else [])]


def config_label(c: dict) -> str:
    if c.get("MMA_BATCH"):
        return (f"{c['BLOCK_N']}/sk{c['SPLIT_K']}/b{c['BPS']}/d{c['DEPTH']}/w{c['num_warps']}/xa{c['X_AHEAD']}"
                + (f"/u{c['UNROLL']}" if c.get("UNROLL", 1) > 1 else "")
                + (f"/r{c['maxnreg']}" if "maxnreg" in c else ""))
    if c.get("MMA"):
        return (f"{c['BLOCK_N']}/sk{c['SPLIT_K']}/d{c['DEPTH']}/w{c['num_warps']}/xa{c['X_AHEAD']}"
                + (f"/s{c['STAGES']}" if c.get("STAGES", 1) > 1 else "")
                + (f"/u{c['UNROLL']}" if c.get("UNROLL", 1) > 1 else "")
                + (f"/r{c['maxnreg']}" if "maxnreg" in c else ""))
    return (f"{c['BLOCK_N']}/{c['BLOCK_K']}/{c['SPLIT_K']}/s{c['STAGES']}"
            + (f"/r{c['maxnreg']}" if "maxnreg" in c else ""))


def gemv_sweep(args, shapes, modes, groups, bw, M=1) -> int:
    """Per shape, mode and group size: µs of each GEMV config (--gemv-sweep: the CUDA-core GEMV's sweep,
    --mma-sweep: the MMA GEMV's autotune list and candidates; at M = 1) or MMA batch kernel config
    (--mma-batch-sweep, at M), T = 1, best first."""
    out = []
    for shape in shapes:
        K, N = SHAPES[shape]
        floor_us = (N * K / 2) / bw * 1e6
        cache: dict = {}
        for gs in groups:
            for mode in modes:
                res = []
                configs = (mma_sweep_configs(batch=True) if args.mma_batch_sweep else
                           mma_sweep_configs() if args.mma_sweep else sweep_configs(mode))
                if args.sweep_match:
                    configs = [c for c in configs if re.search(args.sweep_match, config_label(c))]
                for cfg in configs:
                    try:
                        us = bench_ours(K, N, gs, mode, M, 1, cache, 1, config=cfg)
                    except Exception as e:  # noqa: BLE001 - e.g. out of registers / resources
                        print(f"{shape} {cfg}: {e!r}"[:200], flush=True)
                        continue
                    res.append((us, cfg))
                    out.append(dict(shape=shape, K=K, N=N, M=M, group_size=gs, mode=mode, us=us, floor_us=floor_us,
                                    **cfg))
                res.sort(key=lambda r: r[0])
                top = "  ".join(f"{us:.1f}:{config_label(c)}" for us, c in res[:6])
                print(f"{shape:8s} g{gs:4d} mode {mode} floor {floor_us:5.1f}  best {top}", flush=True)
        cache.clear()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": out}, f, indent=1)
    return 0


def timing_check(args, shapes, modes, groups) -> int:
    """Does the autotuners' timing pick the config that is fastest under graph replay? Per shape / mode / group
    at M = 1, the MMA GEMV's autotune list timed by graph replay over weight copies (the truth, as this bench
    reports), by quick_bench on one copy (what the autotuner does, though through int4_matmul's host path, which
    costs the host more than the autotuner's own launch) and by kernels.device.busy_bench on one copy."""
    from scaleserve.kernels.device import busy_bench
    from scaleserve.kernels.device import quick_bench

    configs = mma_sweep_configs(candidates=False)
    out = []
    for shape in shapes:
        K, N = SHAPES[shape]
        cache: dict = {}
        for gs in groups:
            for mode in modes:
                res = []
                for cfg in configs:
                    calls = ours_calls(K, N, gs, mode, 1, 1, cache, 1, config=cfg)
                    t = dict(graph=graph_us(calls), quick=quick_bench(calls[0], (0.5, 0.2, 0.8))[0] * 1e3,
                             busy=busy_bench(calls[0]) * 1e3)
                    res.append((t, cfg))
                    out.append(dict(shape=shape, K=K, N=N, group_size=gs, mode=mode,
                                    **{f"{k}_us": v for k, v in t.items()}, **cfg))
                best = {m: min(res, key=lambda r: r[0][m]) for m in ("graph", "quick", "busy")}
                print(f"{shape:8s} g{gs:4d} mode {mode}: " + "; ".join(
                    f"{m} picks {config_label(c)} ({t['graph']:.1f} us replayed)" for m, (t, c) in best.items()),
                    flush=True)
        cache.clear()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)
    return 0


def layer_sums(rows, shapes):
    """(group_size, mode, M, T) -> summed fields over the shapes (only complete layers)."""
    acc: dict = {}
    for r in rows:
        k = (r["group_size"], r["mode"], r["M"], r["T"])
        acc.setdefault(k, []).append(r)
    out = {}
    for k, rs in acc.items():
        if len(rs) == len(shapes):
            out[k] = {f: sum(r.get(f, r["floor_us"]) for r in rs)
                      for f in ("us", "bf16_us", "tinygemm_us", "tinygemm_loop_us", "floor_us", "floor_t_us")}
    return out


def print_table(rows, shapes) -> None:
    sums = layer_sums(rows, shapes)
    model = "SmolLM2-135M" if all(sh.startswith("sm_") for sh in shapes) else "Llama-2-7B"
    print(f"\nper {model} layer ({'+'.join(shapes)}), µs per call, CUDA-graph replay median")
    print("(floorT: the codes plus the T adapters' fp16 tables, the bytes one call must read)")
    print(f"{'gs':>4} {'mode':>4} {'M':>4} {'T':>3} {'ours':>8} {'xfloor':>6} {'T/T1':>5} {'bf16':>8} "
          f"{'tinygemm':>9} {'tg_loop':>8} {'floor':>7} {'floorT':>7}")
    for (gs, mode, M, T), s in sorted(sums.items()):
        t1 = sums.get((gs, mode, M, 1), s)["us"]
        print(f"{gs:>4} {mode:>4} {M:>4} {T:>3} {s['us']:8.1f} {s['us'] / s['floor_us']:6.2f} {s['us'] / t1:5.2f} "
              f"{s['bf16_us']:8.1f} {s['tinygemm_us']:9.1f} {s['tinygemm_loop_us']:8.1f} {s['floor_us']:7.1f} "
              f"{s['floor_t_us']:7.1f}")


def plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    shapes = sorted({r["shape"] for r in rows})
    sums = layer_sums(rows, shapes)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, gs in zip(axes, (-1, 128)):
        ms = sorted({k[2] for k in sums if k[0] == gs})
        if not ms:
            continue
        for mode in (1, 2, 3):
            for distinct in (False, True):
                ys = []
                for M in ms:
                    T = min(M, 64) if distinct else 1
                    ys.append(sums.get((gs, mode, M, T), {}).get("us", float("nan")))
                ax.plot(ms, ys, marker="o", linestyle="--" if distinct else "-",
                        label=f"ours mode {mode}" + (" T=min(M,64)" if distinct else " T=1"))
        first = {M: sums.get((gs, 1, M, 1)) for M in ms}
        for field, lab in (("bf16_us", "bf16 F.linear"), ("tinygemm_us", "tinygemm"), ("floor_us", "int4 floor")):
            ax.plot(ms, [first[M][field] if first[M] else float("nan") for M in ms], color="k",
                    linestyle={"bf16_us": ":", "tinygemm_us": "-.", "floor_us": "-"}[field], label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (rows)")
        ax.set_title(f"Llama-2-7B layer, group size {gs}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("µs per layer (4 linears)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
