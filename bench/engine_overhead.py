"""Host overhead of the serving path, on any machine (CPU is fine: the model is tiny, so the host work shows).

  engine  the Engine stepped directly (no HTTP) over B concurrent greedy sequences, B = 1 and 64: host ms per
          decode step split by phase (schedule, build tensors, forward, sample, process = stop checks +
          detokenize + metrics + emit, detokenize alone, deliver = the hop to the asyncio loop). Outputs go
          through the server's own sink (scaleserve.server.api.common: an asyncio queue per request on a loop
          in another thread, drained by one coroutine per request), so the thread hop is part of the figure.
          Phases are timed by wrapping the engine's methods from outside (works on any version of the engine).
  http    one streamed /v1/completions request (and --http-streams concurrent ones) against (a) a real
          `scaleserve serve` in a subprocess and (b) the same app in a thread of this process (as bench/serve.py
          used to run it): ITL p50/p99, i.e. what GIL contention with an in-process client costs.

    OMP_NUM_THREADS=1 python bench/engine_overhead.py --json out/engine_overhead.json
    python bench/engine_overhead.py --tokenizer ~/.cache/scaleserve/models/SmolLM2-135M-Instruct-rtn4-g32  # a real BPE

Prints a short table; --json writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import sys
import threading
import time
from pathlib import Path

import torch

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

PHASES = ["schedule", "build", "forward", "sample", "process", "detokenize", "deliver"]


# --- engine alone ------------------------------------------------------------------------------------


class PhaseTimer:
    """Accumulates wall time of wrapped callables per phase (nested phases are also counted by their parent)."""

    def __init__(self):
        self.acc = {p: 0.0 for p in PHASES}
        self.on = False

    def wrap(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name)
        acc = self.acc

        def timed(*a, **kw):
            if not self.on:
                return fn(*a, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[phase] += time.perf_counter() - t0

        setattr(obj, name, timed)

    def hook_module(self, module, phase: str) -> None:
        start = [0.0]

        def pre(*_):
            start[0] = time.perf_counter()

        def post(*_):
            if self.on:
                self.acc[phase] += time.perf_counter() - start[0]

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def instrument(engine) -> PhaseTimer:
    pt = PhaseTimer()
    pt.wrap(engine.scheduler, "schedule", "schedule")
    pt.wrap(engine, "_build_batch", "build")
    pt.wrap(engine, "_pack_decode", "build")
    pt.hook_module(engine.lm.model, "forward")
    pt.wrap(engine, "_sample", "sample")
    pt.wrap(engine, "_process", "process")
    pt.wrap(engine.detok, "decode_many", "detokenize")
    if hasattr(engine, "_flush"):  # per-step delivery to the event loops
        pt.wrap(engine, "_flush", "deliver")
    return pt


class LoopThread:
    """An asyncio loop in a thread, standing in for uvicorn's: one consumer task per request."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def sink_and_task(self):
        """-> (a sink as the server makes it, a concurrent future that completes at the request's end)."""
        made = threading.Event()
        box = {}

        async def setup():
            q: asyncio.Queue = asyncio.Queue()
            try:
                from scaleserve.server.engine import LoopSink

                box["sink"] = LoopSink(asyncio.get_running_loop(), q.put_nowait)
            except ImportError:  # the engine before batched delivery: the old closure
                loop = asyncio.get_running_loop()

                def sink(out, _put=q.put_nowait):
                    loop.call_soon_threadsafe(_put, out)

                box["sink"] = sink
            made.set()
            n = 0
            while True:
                out = await q.get()
                n += len(out.token_ids)
                if out.finished:
                    return n

        fut = asyncio.run_coroutine_threadsafe(setup(), self.loop)
        made.wait()
        return box["sink"], fut

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def build_engine(model_dir: Path, max_num_seqs: int, tokenizer_dir: str | None):
    from scaleserve.adapters.registry import AdapterRegistry
    from scaleserve.server.engine import Engine
    from scaleserve.server.loader import load_model
    from scaleserve.server.metrics import Metrics
    from scaleserve.server.settings import Settings

    lm = load_model(model_dir, device="cpu")
    if tokenizer_dir:
        from transformers import AutoTokenizer

        lm.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    s = Settings(model=str(model_dir), device="cpu", kv_cache_max_blocks=max_num_seqs * 40, max_num_seqs=max_num_seqs,
                 data_dir="/tmp/scaleserve-overhead-data", log_level="warning")
    reg = AdapterRegistry.from_settings(lm, s)
    return Engine(lm, reg.slab, reg, s, Metrics())


def channel_adapters(engine, n: int) -> list:
    """n per-channel PEQA adapters (the identity times random factors in [0.9, 1.1]) put in the engine's registry:
    their versions, as a request names them."""
    from scaleserve.adapters.format import identity_adapter

    g = torch.Generator().manual_seed(n)
    base = identity_adapter(engine.lm, "peqa", per_channel=True)
    out = []
    for i in range(n):
        t = {k: v * (0.9 + 0.2 * torch.rand(v.shape, generator=g)) for k, v in base.tensors.items()}
        adapter = type(base)(base.kind, f"a{i:03d}", base.base_fingerprint, t)
        out.append(engine.registry.put("bench", adapter.name, adapter))
    return out


def run_engine(engine, batch: int, steps: int, prompt_len: int, profile: bool, adapters: int = 0) -> dict:
    """batch greedy sequences, spread round-robin over `adapters` per-channel adapters (0: the base)."""
    from scaleserve.server.scheduler import SamplingParams, Sequence

    loop = LoopThread()
    pt = instrument(engine)
    futs = []
    avs = channel_adapters(engine, adapters)
    for b in range(batch):
        sink, fut = loop.sink_and_task()
        prompt = [3 + (7 * b + 13 * j) % 900 for j in range(prompt_len)]
        av = avs[b % adapters] if adapters else None
        engine.scheduler.add(Sequence(f"b{b}", prompt, SamplingParams(max_tokens=steps + 40, temperature=0.0,
                                                                    ignore_eos=True), sink=sink, adapter=av,
                                      adapter_name=av.name if av is not None else "base"))
        futs.append(fut)
    while any(s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill
    for _ in range(5):
        engine.step()  # warm-up decode
    prof = cProfile.Profile() if profile else None
    pt.on = True
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    if prof:
        prof.disable()
    pt.on = False
    while engine.scheduler.has_work():
        engine.step()
    for f in futs:
        f.result(30)
    loop.close()
    ms = {k: round(v / steps * 1e3, 4) for k, v in pt.acc.items()}
    ms["step"] = round(wall / steps * 1e3, 4)
    ms["host_excl_forward"] = round(ms["step"] - ms["forward"], 4)
    res = {"batch": batch, "adapters": adapters, "steps": steps, "ms_per_step": ms,
           "tok_s": round(batch * steps / wall, 1)}
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        res["profile_top"] = s.getvalue()
    return res


# --- HTTP -----------------------------------------------------------------------------------------------


def stream_load(url: str, streams: int, max_tokens: int, prompt_len: int) -> dict:
    from serve import run_load

    return asyncio.run(run_load(url, ["tiny"], streams, streams, (prompt_len, prompt_len), (max_tokens, max_tokens),
                                assign="round_robin"))


def http_scenarios(url: str, a) -> list[dict]:
    stream_load(url, 1, 16, a.prompt_len)  # warm-up
    rows = []
    for streams in sorted({1, a.http_streams}):
        r = stream_load(url, streams, a.http_tokens, a.prompt_len)
        rows.append({"streams": streams, "throughput_tok_s": r["throughput_tok_s"], "itl_ms_p50": r["itl_ms_p50"],
                     "itl_ms_p99": r["itl_ms_p99"], "ok": r["ok"]})
    return rows


def http_subprocess(model_dir: Path, a) -> list[dict]:
    from serve import SubprocessServer

    flags = dict(device="cpu", served_model_name="tiny", max_num_seqs=max(64, a.http_streams), kv_cache_max_blocks=4096)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "SCALESERVE_DATA_DIR": "/tmp/scaleserve-overhead-data", "SCALESERVE_LOG_LEVEL": "warning"}
    with SubprocessServer(model_dir, flags, env, Path(a.work) / "server.log") as srv:
        return http_scenarios(srv.url, a)


def http_inprocess(model_dir: Path, a) -> list[dict]:
    from scaleserve.server.loader import load_model
    from scaleserve.server.main import ThreadedServer, create_app
    from scaleserve.server.settings import Settings

    lm = load_model(model_dir, device="cpu")
    s = Settings(model=str(model_dir), device="cpu", served_model_name="tiny", data_dir="/tmp/scaleserve-overhead-data",
                 max_num_seqs=max(64, a.http_streams), kv_cache_max_blocks=4096, log_level="warning")
    with ThreadedServer(create_app(s, lm=lm)) as srv:
        return http_scenarios(srv.url, a)


# --- main -----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a scaleserve model dir (default: a random `tiny` one in --work)")
    p.add_argument("--work", default="/tmp/scaleserve-overhead")
    p.add_argument("--tokenizer", help="swap in this tokenizer (engine part only), e.g. a real BPE one")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--adapters", default="0",
                   help="comma list of T: each batch's sequences spread over T per-channel PEQA adapters (0: base)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="cProfile the timed steps; print the top functions")
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--http-tokens", type=int, default=128)
    p.add_argument("--http-streams", type=int, default=16)
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. before / after)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.model:
        model_dir = Path(a.model)
    else:
        from make_random_model import make_random_model

        model_dir = make_random_model(Path(a.work) / "random-tiny", "tiny")
    out = {"label": a.label, "model": str(model_dir), "tokenizer": a.tokenizer, "machine": os.uname().nodename,
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "engine": [], "http": {}}
    for B in [int(x) for x in a.batches.split(",")]:
        for T in [int(x) for x in a.adapters.split(",")]:
            engine = build_engine(model_dir, max(64, B), a.tokenizer)
            r = run_engine(engine, B, a.steps, a.prompt_len, a.profile, T)
            out["engine"].append(r)
            if a.profile:
                print(f"--- cProfile, batch {B}, {T} adapters\n{r['profile_top']}")
    cols = ["step", "host_excl_forward"] + PHASES
    print("engine alone: ms per decode step (" + ("tokenizer " + a.tokenizer if a.tokenizer else "tiny tokenizer")
          + "; T: adapters)")
    print(f"{'batch':>5} | {'T':>3} | " + " | ".join(f"{c:>10}" for c in cols) + " |   tok/s")
    for r in out["engine"]:
        print(f"{r['batch']:>5} | {r['adapters']:>3} | " + " | ".join(f"{r['ms_per_step'][c]:>10.3f}" for c in cols)
              + f" | {r['tok_s']:>7}")
    if not a.no_http:
        out["http"]["subprocess"] = http_subprocess(model_dir, a)
        out["http"]["in_process"] = http_inprocess(model_dir, a)
        print("HTTP, one /v1/completions stream per request, " + f"{a.http_tokens} tokens")
        print(f"{'server':>10} | {'streams':>7} | {'tok/s':>8} | {'ITL p50 ms':>10} | {'ITL p99 ms':>10}")
        for where, rows in out["http"].items():
            for r in rows:
                print(f"{where:>10} | {r['streams']:>7} | {r['throughput_tok_s']:>8} | {r['itl_ms_p50']:>10} | "
                      f"{r['itl_ms_p99']:>10}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
