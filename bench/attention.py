"""Paged attention (ours) against torch SDPA on contiguous tensors, and sweeps of our tile choices.

    python bench/attention.py --json out/attention.json                  # decode + prefill vs SDPA
    python bench/attention.py --sweep decode --json out/decode-sweep.json  # decode configs, engine-like tables
    python bench/attention.py --sweep prefill --json out/prefill-sweep.json
    python bench/attention.py --sweep splits --json out/split-sweep.json   # short contexts: fewer splits

Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph). A decode case's block
table has as many entries as a 4096-token context, as the engine's do: the number of context splits
comes from that capacity, not from the actual context. The decode sweep prints, per config (BLOCK_N,
warps, min partition), the time of every case and the sum, and writes the best as `best`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import torch
import triton

import scaleserve.kernels.attention as A

DT, BS = torch.bfloat16, 16
TABLE_CONTEXT = 4096  # block-table capacity of a decode case, in tokens

# (B, ctx, H, KVH, D, L = 1): Llama-2-7B (no GQA), Llama-3-8B (GQA 4), SmolLM2-135M (GQA 3, D 64)
DECODE_CASES = [(1, 128, 32, 32, 128, 1), (1, 1024, 32, 32, 128, 1), (4, 256, 32, 32, 128, 1),
                (16, 256, 32, 32, 128, 1), (16, 1024, 32, 32, 128, 1), (64, 512, 32, 32, 128, 1),
                (16, 1024, 32, 8, 128, 1), (16, 512, 9, 3, 64, 1)]
DECODE_CONFIGS = [(64, 4, 256), (64, 8, 256), (32, 4, 256), (32, 8, 256), (64, 4, 64), (32, 4, 64), (16, 4, 64)]
PREFILL_CASES = [  # (B, ctx, H, KVH, D, L)
    (4, 1024, 32, 8, 128, 1024), (8, 2048, 32, 8, 128, 256), (4, 1024, 9, 3, 64, 1024)]
PREFILL_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                   (64, 128, 4, 2), (128, 64, 4, 3), (128, 32, 4, 3)]


def paged_inputs(B, ctx, H, KVH, D, L, table_ctx=None, device="cuda"):
    """Random q and a shuffled paged cache holding B contexts of ctx tokens; also the contiguous k/v."""
    nb = B * ctx // BS
    kc = torch.randn(nb, BS, KVH, D, device=device, dtype=DT)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device=device).int().view(B, ctx // BS)
    if table_ctx and table_ctx > ctx:  # unused entries, as in an engine's table
        bt = torch.cat([bt, torch.zeros(B, (table_ctx - ctx) // BS, dtype=bt.dtype, device=device)], 1)
    sl = torch.full((B,), ctx, dtype=torch.int32, device=device)
    qs = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device)
    q = torch.randn(B * L, H, D, device=device, dtype=DT)
    k = kc[bt[:, : ctx // BS].long()].reshape(B, ctx, KVH, D).transpose(1, 2).contiguous()  # [B, KVH, ctx, D]
    v = vc[bt[:, : ctx // BS].long()].reshape(B, ctx, KVH, D).transpose(1, 2).contiguous()
    return q, kc, vc, bt, sl, qs, k, v


def sdpa(q, k, v, B, L, H, D):
    qq = q.view(B, L, H, D).transpose(1, 2)
    ctx = k.shape[2]
    # the L new queries are the context's last L positions: query i sees keys j <= ctx - L + i. (SDPA's
    # is_causal aligns the mask top-left, which is that only when L == ctx.)
    mask = None
    if 1 < L < ctx:
        mask = torch.arange(ctx, device=q.device)[None, :] <= (ctx - L + torch.arange(L, device=q.device))[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(qq, k, v, attn_mask=mask, is_causal=L > 1 and mask is None,
                                                         enable_gqa=k.shape[1] != H)
    return o.transpose(1, 2).reshape(B * L, H, D)


def case(B, ctx, H, KVH, D, L, with_sdpa=True, table_ctx=None, num_splits=None) -> list[dict]:
    q, kc, vc, bt, sl, qs, k, v = paged_inputs(B, ctx, H, KVH, D, L, table_ctx)
    out = torch.empty_like(q)
    ours = lambda: A.paged_attention(q, kc, vc, bt, sl, qs, D ** -0.5, L, out=out, num_splits=num_splits)  # noqa: E731
    ref = sdpa(q, k, v, B, L, H, D).float()
    err = ((ours().float() - ref).norm() / ref.norm()).item()
    kv_bytes = 2 * B * ctx * KVH * D * 2
    flops = 4 * B * H * L * D * (ctx - L / 2 if L > 1 else ctx)
    rows = []
    for name, fn in [("paged", ours)] + ([("sdpa contiguous", lambda: sdpa(q, k, v, B, L, H, D))] if with_sdpa else []):
        ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        rows.append(dict(B=B, ctx=ctx, H=H, KVH=KVH, D=D, L=L, impl=name, us=ms * 1e3,
                         kv_GBps=kv_bytes / ms / 1e6, TFLOPs=flops / ms / 1e9, rel_err=err))
    return rows


def table(rows) -> None:
    print(f"{'B':>3} {'ctx':>5} {'H':>3} {'KVH':>3} {'D':>3} {'L':>5} {'impl':<26} {'us':>8} {'KV GB/s':>8} "
          f"{'TFLOP/s':>8} {'relerr':>8}")
    for r in rows:
        print(f"{r['B']:>3} {r['ctx']:>5} {r['H']:>3} {r['KVH']:>3} {r['D']:>3} {r['L']:>5} {r['impl']:<26} "
              f"{r['us']:>8.1f} {r['kv_GBps']:>8.0f} {r['TFLOPs']:>8.1f} {r['rel_err']:>8.1e}")


def sweep(configs, cases, apply, label, table_ctx=None) -> dict:
    """Time every case under every config (apply(cfg) sets the module's knobs); -> rows and the best."""
    rows, totals = [], {}
    for cfg in configs:
        apply(cfg)
        tot = 0.0
        for c in cases:
            try:
                r = case(*c, with_sdpa=False, table_ctx=table_ctx)[0]
            except Exception as e:  # out of shared memory and the like
                print(f"{label} config {cfg} failed on {c}: {type(e).__name__} {str(e)[:100]}")
                tot = float("inf")
                break
            r["impl"] = f"{label} {cfg}"
            rows.append(r)
            tot += r["us"]
        totals[cfg] = tot
        print(f"{label} config {cfg}: sum {tot:.1f} us", flush=True)
    best = min(totals, key=totals.get)
    table(rows)
    print(f"best {label} config {best}")
    apply(best)
    return dict(rows=rows, totals={str(k): v for k, v in totals.items()}, best=list(best))


def split_sweep(cases) -> dict:
    """Short contexts: the engine's split count (from a 4096-token table) against fewer splits, down to one
    program per (sequence, KV head) with no merge launch. Prints us per case and split count."""
    rows = []
    for B, ctx, H, KVH, D in cases:
        auto = A.decode_num_splits(B, KVH, TABLE_CONTEXT, torch.device("cuda"))
        for n in sorted({auto, 1, 2, 4} - {s for s in (2, 4) if s >= auto}):  # the engine's, and 1 / 2 / 4 below it
            r = case(B, ctx, H, KVH, D, 1, with_sdpa=False, table_ctx=TABLE_CONTEXT, num_splits=n)[0]
            r.update(impl=f"splits {n}" + (" (engine)" if n == auto else ""), splits=n)
            rows.append(r)
    table(rows)
    return dict(rows=rows)


def set_decode(cfg):
    A.DECODE_BLOCK_N, A.DECODE_NUM_WARPS, A.DECODE_MIN_PARTITION = cfg


def set_prefill(cfg):
    A.PREFILL_BLOCK_M, A.PREFILL_BLOCK_N, A.PREFILL_NUM_WARPS, A.PREFILL_NUM_STAGES = cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", choices=["decode", "prefill", "splits"],
                   help="sweep one kernel's configs instead (splits: decode's context split at short contexts)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    if args.sweep == "decode":
        res.update(sweep(DECODE_CONFIGS, DECODE_CASES, set_decode, "decode", TABLE_CONTEXT))
    elif args.sweep == "splits":
        res.update(split_sweep([(B, ctx, 32, kvh, 128) for kvh in (32, 8) for B in (1, 4)
                                for ctx in (32, 64, 128, 256, 512)]))
    elif args.sweep == "prefill":
        res.update(sweep(PREFILL_CONFIGS, PREFILL_CASES, set_prefill, "prefill"))
    else:
        rows = [r for c in DECODE_CASES for r in case(*c, table_ctx=TABLE_CONTEXT)]
        rows += [r for c in PREFILL_CASES for r in case(*c)]
        table(rows)
        res["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
