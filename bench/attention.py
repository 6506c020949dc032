"""Paged attention (ours) vs torch SDPA on contiguous tensors, decode and prefill, plus a sweep of the
prefill tile configs. Prints tables; writes $OUT/attn_bench.json and $OUT/best_prefill.json.

    OUT=out python bench/attention.py        # on a GPU
"""
import json, os
import torch, triton
import scaleserve.kernels.attention as A

torch.manual_seed(0)
dev, dt, BS = "cuda", torch.bfloat16, 16
OUT = os.environ.get("OUT", ".")

def paged_inputs(B, ctx, H, KVH, D, L):
    nb = B * ctx // BS
    kc = torch.randn(nb, BS, KVH, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device=dev).int().view(B, ctx // BS)
    sl = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    qs = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=dev)
    q = torch.randn(B * L, H, D, device=dev, dtype=dt)
    k = kc[bt.long()].reshape(B, ctx, KVH, D).transpose(1, 2).contiguous()  # [B, KVH, ctx, D]
    v = vc[bt.long()].reshape(B, ctx, KVH, D).transpose(1, 2).contiguous()
    return q, kc, vc, bt, sl, qs, k, v

def sdpa(q, k, v, B, L, H, D):
    qq = q.view(B, L, H, D).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(qq, k, v, is_causal=L > 1, enable_gqa=k.shape[1] != H)

def bench(fn):
    return (triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"),
            triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median"))

def case(B, ctx, H, KVH, D, L, variants_extra=(), with_sdpa=True):
    q, kc, vc, bt, sl, qs, k, v = paged_inputs(B, ctx, H, KVH, D, L)
    out = torch.empty_like(q)
    scale = D ** -0.5
    ours = lambda s=None: A.paged_attention(q, kc, vc, bt, sl, qs, scale, L, out=out, num_splits=s)
    ref = A.paged_attention_ref(q.float(), kc.float(), vc.float(), bt, sl, qs, scale) if L > 1 and not with_sdpa else \
        sdpa(q, k, v, B, L, H, D).transpose(1, 2).reshape(B * L, H, D)
    err = ((ours().float() - ref.float()).norm() / ref.float().norm()).item()
    variants = [("paged", ours)] + [(n, (lambda s=s: ours(s))) for n, s in variants_extra]
    if with_sdpa:
        variants.append(("sdpa contiguous", lambda: sdpa(q, k, v, B, L, H, D)))
    kv_bytes = 2 * B * ctx * KVH * D * 2
    flops = 4 * B * H * L * D * (ctx - L / 2 if L > 1 else ctx)
    res = []
    for name, fn in variants:
        ev, g = bench(fn)
        res.append(dict(B=B, ctx=ctx, H=H, KVH=KVH, D=D, L=L, impl=name, ms=ev, ms_graph=g,
                        kv_GBps=kv_bytes / g / 1e6, TFLOPs=flops / g / 1e9, rel_err=err))
    return res

def table(rs, extra=""):
    print(f"{'B':>3} {'ctx':>5} {'H':>3} {'KVH':>3} {'D':>3} {'L':>5} {'impl':<22} {'ms':>8} {'ms_graph':>9} {'KV GB/s':>8} {'TFLOP/s':>8} {'relerr':>8}")
    for r in rs:
        print(f"{r['B']:>3} {r['ctx']:>5} {r['H']:>3} {r['KVH']:>3} {r['D']:>3} {r['L']:>5} {r['impl']:<22} {r['ms']:>8.4f} {r['ms_graph']:>9.4f} {r['kv_GBps']:>8.0f} {r['TFLOPs']:>8.1f} {r['rel_err']:>8.1e}")

def main() -> None:
    # prefill tile sweep (BLOCK_M rows, BLOCK_N keys, warps, stages)
    configs = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 4, 3), (128, 32, 4, 3)]
    sweep = []
    for cfg in configs:
        A.PREFILL_BLOCK_M, A.PREFILL_BLOCK_N, A.PREFILL_NUM_WARPS, A.PREFILL_NUM_STAGES = cfg
        tot = 0.0
        for shape in [(4, 1024, 32, 8, 128, 1024), (8, 2048, 32, 8, 128, 256), (4, 1024, 9, 3, 64, 1024)]:
            try:
                r = case(*shape, with_sdpa=False)[0]
            except Exception as e:  # out of shared memory etc.
                print("config", cfg, "failed:", type(e).__name__, str(e)[:100]); tot = float("inf"); break
            r["impl"] = f"paged {cfg}"
            sweep.append(r); tot += r["ms_graph"]
        print("config", cfg, "sum ms_graph", round(tot, 4), flush=True)
        sweep.append(dict(cfg=cfg, tot=tot))
    best = min((s for s in sweep if "tot" in s), key=lambda s: s["tot"])["cfg"]
    json.dump(dict(best=best), open(os.path.join(OUT, "best_prefill.json"), "w"))
    print("best prefill config", best)
    A.PREFILL_BLOCK_M, A.PREFILL_BLOCK_N, A.PREFILL_NUM_WARPS, A.PREFILL_NUM_STAGES = best

    rows = []
    rows += case(64, 1024, 32, 32, 128, 1, [("paged splits=1", 1)])
    rows += case(64, 1024, 32, 8, 128, 1, [("paged splits=1", 1)])
    rows += case(8, 4096, 32, 8, 128, 1, [("paged splits=1", 1)])
    rows += case(64, 1024, 9, 3, 64, 1)
    rows += case(4, 1024, 32, 8, 128, 1024)
    rows += case(4, 1024, 9, 3, 64, 1024)
    table([r for r in sweep if "impl" in r])
    print()
    table(rows)
    json.dump(dict(device=torch.cuda.get_device_name(), best_prefill=best, rows=rows,
                   sweep=[r for r in sweep if "impl" in r]), open(os.path.join(OUT, "attn_bench.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
