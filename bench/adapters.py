"""Benchmark: adapter upload -> first token, swap cost under load, GPU memory per resident adapter.

One GPU, one command (the lead runs it at the end):

  python bench/adapters.py --json adapters.json          # Llama-2-7B-shaped random int4 model, CUDA
  python bench/adapters.py --tiny                        # 2-layer smoke run (CPU works), same code path

The model is random (int4 rtn, group 128, Llama-2-7B shapes: 32 layers, 4096/11008, 32000 vocab),
written once to --work (bench/make_random_model.py; bench/serve.py shares it): the timings do not depend
on the weights' values. The server is `scaleserve serve` in a child process with a file:// store, so the
load generator here does not share its GIL (--in-process: the app under uvicorn in this process, as
before).

1. memory: a slab of 1,000 per-channel slots; 1,000 random per-channel adapters loaded into it.
   Reports device bytes per resident adapter (target <= 3 MB for 7B) and the per-load time.
2. upload -> first token: for 20 fresh per-channel adapters, one at a time: PUT the file, then a
   streaming completion (16-token prompt) with model=<that adapter>; the time from sending the PUT
   to the first streamed token (p50/p90; target p50 <= 100 ms), split into the PUT and the TTFT,
   next to the TTFT of an adapter already resident. The slab load itself (mean, from the server's
   scaleserve_adapter_load_seconds) too.
3. swap cost: 64 greedy streams of the base model decode; after a steady period 16 new adapters are
   uploaded and each used by one short request while the 64 run. Decode throughput (tokens/s of the
   64 streams, 250 ms windows) before vs. during the swaps: the dip.

Prints a short table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import torch

def per_channel_adapter(lm, seed: int, dtype=torch.float16):
    from scaleserve.adapters.format import Adapter

    g = torch.Generator().manual_seed(seed)
    t = {f"{n}.scales": (1 + 0.1 * torch.randn(m.out_features, generator=g)).to(dtype)
         for n, m in lm.model.quant_linears().items()}
    return Adapter("peqa", f"bench{seed}", lm.fingerprint, t)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


# --- 1. memory -----------------------------------------------------------------------------------------


def bench_memory(lm, n_adapters: int) -> dict:
    from scaleserve.adapters.slab import AdapterSlab

    dev = lm.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        # the same slab with one per-channel slot: what does not grow with the adapter count (slot 0 =
        # the base in every table, the one group / alpha slot)
        one = AdapterSlab(lm.model, chan_slots=1, group_slots=1, alpha_slots=1, host_slots=0)
        torch.cuda.synchronize()
        fixed = torch.cuda.memory_allocated() - before
        del one
        for m in lm.model.quant_linears().values():
            m.slab_chan = m.slab_scales = m.slab_alphas = m.slab_betas = None
            m.invalidate_caches()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    slab = AdapterSlab(lm.model, chan_slots=n_adapters, group_slots=1, alpha_slots=1, host_slots=0)
    chan_bytes = sum(m.slab_chan.numel() * m.slab_chan.element_size() for m in slab.layers.values())
    if cuda:
        torch.cuda.synchronize()
        after_alloc = torch.cuda.memory_allocated()
    proto = per_channel_adapter(lm, 0)
    from scaleserve.adapters.format import BaseSpec, validate

    proto = validate(proto, BaseSpec.from_model(lm))
    loads = []
    for i in range(n_adapters):
        ad = type(proto)(proto.kind, f"m{i}", proto.base_fingerprint,
                         {k: v * (1 + 0.001 * i) for k, v in proto.tensors.items()} if i < 8 else proto.tensors)
        t0 = time.perf_counter()
        slab.acquire(("mem", i), ad)
        if cuda:
            torch.cuda.synchronize()
        loads.append(time.perf_counter() - t0)
        slab.unpin(("mem", i))
    if cuda:
        torch.cuda.synchronize()
        after_load = torch.cuda.memory_allocated()
    out = {"adapters": n_adapters, "chan_table_bytes_per_adapter": chan_bytes / (n_adapters + 1),
           "chan_dtype": str(slab.table_dtype), "load_ms_p50": 1e3 * pct(loads, 0.5),
           "load_ms_p90": 1e3 * pct(loads, 0.9), "adapter_params": sum(t.numel() for t in proto.tensors.values())}
    if cuda:
        # per resident adapter: what the n-slot slab holds beyond the 1-slot one, per extra slot
        out["device_bytes_per_adapter"] = (after_load - before - fixed) / (n_adapters - 1)
        out["device_bytes_fixed"] = fixed
        out["device_bytes_total"] = after_load - before
        out["device_bytes_loads_added"] = after_load - after_alloc
    del slab
    if cuda:
        torch.cuda.empty_cache()
    return out


async def stream_first_token(client, model: str, prompt: list[int], max_tokens: int = 4) -> float:
    """Seconds from now to the first streamed token."""
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"completion failed: {r.status_code} {await r.aread()}")
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                first = time.perf_counter() - t0
    return first


def adapter_loads(url: str) -> tuple[float, float]:
    """(seconds, count) so far of the server's slab loads, from /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for smp in fam.samples:
            if smp.name == "scaleserve_adapter_load_seconds_sum":
                total = smp.value
            elif smp.name == "scaleserve_adapter_load_seconds_count":
                count = smp.value
    return total, count


async def bench_upload_to_first_token(url, lm, n: int, base: str) -> dict:
    import httpx

    prompt = list(range(10, 26))
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        blobs = [per_channel_adapter(lm, 1000 + i).to_bytes() for i in range(n + 2)]
        # warm: one adapter through the whole path (kernel compilation for the channel mode)
        for i in range(2):
            await c.put(f"/v1/adapters/warm{i}", content=blobs[n + i])
            await stream_first_token(c, f"warm{i}", prompt)
        resident = [await stream_first_token(c, "warm0", prompt) for _ in range(5)]
        base_ttft = [await stream_first_token(c, base, prompt) for _ in range(5)]
        total, put_s, ttft = [], [], []
        loads0 = adapter_loads(url)
        for i in range(n):
            t0 = time.perf_counter()
            r = await c.put(f"/v1/adapters/fresh{i}", content=blobs[i])
            r.raise_for_status()
            t1 = time.perf_counter()
            first = await stream_first_token(c, f"fresh{i}", prompt)
            total.append(t1 - t0 + first)
            put_s.append(t1 - t0)
            ttft.append(first)
        loads1 = adapter_loads(url)
    ms = lambda xs, q: 1e3 * pct(xs, q)  # noqa: E731
    n_loads = loads1[1] - loads0[1]
    return {"n": n, "adapter_file_bytes": len(blobs[0]),
            "upload_to_first_token_ms_p50": ms(total, 0.5), "upload_to_first_token_ms_p90": ms(total, 0.9),
            "put_ms_p50": ms(put_s, 0.5), "ttft_fresh_ms_p50": ms(ttft, 0.5),
            "ttft_resident_ms_p50": ms(resident, 0.5), "ttft_base_ms_p50": ms(base_ttft, 0.5),
            "slab_load_ms_mean": 1e3 * (loads1[0] - loads0[0]) / n_loads if n_loads else None,
            "slab_loads": n_loads}


async def bench_swap(url, lm, base: str, streams: int, n_swaps: int, max_tokens: int) -> dict:
    import httpx

    stamps: list[float] = []
    prompt = list(range(30, 46))
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    # made before any timing: building them holds the GIL, which this client shares with the server
    blobs = [per_channel_adapter(lm, 5000 + i).to_bytes() for i in range(n_swaps)]
    async with httpx.AsyncClient(base_url=url, timeout=1200, limits=limits) as c:
        async def one():
            async with c.stream("POST", "/v1/completions", json={
                    "model": base, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"stream refused: {r.status_code} {(await r.aread()).decode()[:200]}")
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        stamps.append(time.perf_counter())

        t_start = time.perf_counter()
        tasks = [asyncio.create_task(one()) for _ in range(streams)]
        # steady state: wait until all streams decode, then a quiet period
        while len(stamps) < streams * 8:
            if all(t.done() for t in tasks):  # every stream failed: say why instead of waiting forever
                await tasks[0]
                raise RuntimeError("all streams ended before reaching steady state")
            await asyncio.sleep(0.05)
        quiet_from = time.perf_counter()
        await asyncio.sleep(2.0)
        swap_from = time.perf_counter()
        swap_lat = []
        for i in range(n_swaps):
            t0 = time.perf_counter()
            (await c.put(f"/v1/adapters/swap{i}", content=blobs[i])).raise_for_status()
            await stream_first_token(c, f"swap{i}", prompt, max_tokens=2)
            swap_lat.append(time.perf_counter() - t0)
        swap_to = time.perf_counter()
        alive = sum(not t.done() for t in tasks)
        await asyncio.sleep(1.0)
        after_to = time.perf_counter()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def rate(a, b):
        return sum(a <= s < b for s in stamps) / max(b - a, 1e-9)

    win = 0.25
    windows = [rate(t, t + win) for t in _frange(swap_from, swap_to, win)] or [rate(swap_from, swap_to)]
    steady = rate(quiet_from, swap_from)
    during = rate(swap_from, swap_to)
    return {"streams": streams, "swaps": n_swaps, "steady_tok_s": steady, "during_swaps_tok_s": during,
            "worst_window_tok_s": min(windows), "dip_pct": 100 * (1 - during / steady) if steady else None,
            "worst_window_dip_pct": 100 * (1 - min(windows) / steady) if steady else None,
            "after_tok_s": rate(swap_to, after_to), "streams_alive_after_swaps": alive,
            "swap_upload_to_first_token_ms_p50": 1e3 * pct(swap_lat, 0.5), "elapsed_s": after_to - t_start}


def _frange(a, b, step):
    while a + step <= b:
        yield a
        a += step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer model (smoke run; CPU works)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--adapters", type=int, default=1000, help="resident adapters for the memory figure")
    ap.add_argument("--uploads", type=int, default=20)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--swaps", type=int, default=16)
    ap.add_argument("--json", default="bench/results/adapters.json")
    ap.add_argument("--work", default="/tmp/scaleserve-bench", help="the random model (shared with bench/serve.py)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the server in this process (it then shares a GIL with the load generator)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.adapters, args.uploads, args.streams, args.swaps = min(args.adapters, 50), min(args.uploads, 5), \
            min(args.streams, 8), min(args.swaps, 3)

    from make_random_model import make_random_model
    from serve import SubprocessServer, list_adapters

    from scaleserve.server.loader import load_model
    from scaleserve.server.settings import Settings

    preset = "tiny" if args.tiny else "llama2-7b"
    model_dir = make_random_model(Path(args.work) / f"random-{preset}", preset, device=args.device)
    t0 = time.time()
    lm = load_model(model_dir, device=args.device)
    print(f"model loaded on {args.device} in {time.time() - t0:.1f} s", file=sys.stderr)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "model": "tiny" if args.tiny else "llama-2-7b-shaped int4 rtn g128",
               "server": "in-process" if args.in_process else "subprocess"}
    results["memory"] = bench_memory(lm, args.adapters)

    with tempfile.TemporaryDirectory() as tmp:
        env = {"SCALESERVE_DEVICE": args.device, "SCALESERVE_DATA_DIR": tmp,
               "SCALESERVE_ADAPTER_STORE": Path(tmp, "store").as_uri(), "SCALESERVE_MAX_NUM_SEQS": max(64, args.streams + 4),
               "SCALESERVE_MAX_MODEL_LEN": 1024, "SCALESERVE_GPU_ADAPTER_SLOTS": 256,
               "SCALESERVE_GPU_GROUP_ADAPTER_SLOTS": 2, "SCALESERVE_HOST_ADAPTER_CACHE": 512,
               "SCALESERVE_TENANT_MAX_ADAPTERS": 10_000, "SCALESERVE_STORE_SYNC_INTERVAL_S": 2.0,
               "SCALESERVE_TENANT_MAX_CONCURRENT": args.streams + 16,  # the streams plus the swap probes
               "SCALESERVE_KV_CACHE_MAX_BLOCKS": "" if args.device == "cuda" else 2048}
        env = {k: str(v) for k, v in env.items() if v != ""}
        if args.in_process:
            from scaleserve.server.main import ThreadedServer, create_app

            server = ThreadedServer(create_app(Settings(**{k[len("SCALESERVE_"):].lower(): v for k, v in env.items()}),
                                               lm=lm))
        else:
            lm.model.to("cpu")  # the adapters are built from its shapes; the server loads its own copy
            if args.device == "cuda":
                torch.cuda.empty_cache()
            server = SubprocessServer(model_dir, {}, {**env, "SCALESERVE_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"},
                                      Path(tmp) / "server.log")
        with server as srv:
            base, _ = list_adapters(srv.url)
            results["upload"] = asyncio.run(bench_upload_to_first_token(srv.url, lm, args.uploads, base))
            results["swap"] = asyncio.run(bench_swap(srv.url, lm, base, args.streams, args.swaps,
                                                     max_tokens=960))

    m, u, s = results["memory"], results["upload"], results["swap"]
    rows = [
        ("resident adapters", f"{m['adapters']}"),
        ("device bytes / adapter", f"{m.get('device_bytes_per_adapter', m['chan_table_bytes_per_adapter']) / 2**20:.2f} MiB"
                                   f" (table {m['chan_table_bytes_per_adapter'] / 2**20:.2f} MiB, {m['chan_dtype']})"),
        ("  + fixed (base slot of every table)", f"{m.get('device_bytes_fixed', 0) / 2**20:.0f} MiB"),
        ("slab load p50 / p90", f"{m['load_ms_p50']:.2f} / {m['load_ms_p90']:.2f} ms"),
        ("upload -> first token p50 / p90", f"{u['upload_to_first_token_ms_p50']:.1f} / "
                                            f"{u['upload_to_first_token_ms_p90']:.1f} ms"),
        ("  PUT p50 | TTFT fresh | resident | base", f"{u['put_ms_p50']:.1f} | {u['ttft_fresh_ms_p50']:.1f} | "
                                                    f"{u['ttft_resident_ms_p50']:.1f} | {u['ttft_base_ms_p50']:.1f} ms"),
        (f"decode tok/s, {s['streams']} streams: steady", f"{s['steady_tok_s']:.0f}"),
        (f"  during {s['swaps']} swaps / worst 250 ms", f"{s['during_swaps_tok_s']:.0f} / {s['worst_window_tok_s']:.0f}"
                                                     f" (dip {s['dip_pct']:.1f}% / {s['worst_window_dip_pct']:.1f}%)"),
    ]
    if s["streams_alive_after_swaps"] < s["streams"]:
        rows.append(("  WARNING", f"only {s['streams_alive_after_swaps']} streams still ran when the swaps ended"))
    width = max(len(r[0]) for r in rows)
    print(f"\nadapters bench: {results['model']} on {results['device']}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
