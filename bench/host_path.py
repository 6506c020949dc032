"""The serving path's host cost, isolated: the real app, engine, scheduler, sampler, detokenizer and SSE
streaming, with the model's forward replaced by a stub on a virtual GPU (VirtualGPU: each step costs
--gpu-ms of device time, spent asynchronously as on a real GPU). Serial and overlapped engines
(settings.overlap_steps) side by side: serial steps cost host + GPU time, overlapped ones max(host, GPU).
With --gpu-ms 0 the figures are the host path's ceiling. 1 vs T adapters shows what adapters cost the host.

The server (uvicorn + engine thread) runs in this process; the load generator (bench/serve.py's run_load)
runs in a child process so the two do not share a GIL. For each scenario it prints throughput, ITL p50/p99/mean
and the engine's host ms per step by phase (bench/engine_overhead.py's instrumentation).

    OMP_NUM_THREADS=1 python bench/host_path.py --gpu-ms 3.2 --json bench/results/host-path-cpu-3.2ms.json
    python bench/host_path.py --preset smollm2-135m     # the real vocabulary size and layer count

Runs anywhere (the stub keeps the device idle); --device cuda puts the slab and logits on the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))


class VirtualGPU:
    """Stands in for an asynchronous device: each forward returns at once and queues `step_ms` of work on a
    virtual stream; a step's tokens are ready when its work is done. Engine._complete (where the engine
    waits for a step's tokens) sleeps, GIL released, until then. So a serial engine pays host + device
    time per step, and an overlapped one max(host, device), as on a GPU."""

    def __init__(self, engine, vocab: int, step_ms: float):
        self.busy_until = 0.0
        self.step_s = step_ms / 1e3
        model, dispatch, complete = engine.lm.model, engine._dispatch, engine._complete

        def forward(batch, k_cache, v_cache):  # logits [rows, V] whose argmax is (token * 31 + 7) % V
            self.busy_until = max(time.perf_counter(), self.busy_until) + self.step_s
            nxt = (batch.tokens[batch.logits_index] * 31 + 7) % vocab
            return torch.zeros(nxt.shape[0], vocab, device=nxt.device).scatter_(1, nxt[:, None], 1.0)

        def dispatched(seqs, tokens, lps):
            f = dispatch(seqs, tokens, lps)
            f.ready_at = self.busy_until
            return f

        def completed(f):
            wait = getattr(f, "ready_at", 0.0) - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            return complete(f)

        model.forward = forward
        engine._dispatch, engine._complete = dispatched, completed


class CollectAt:
    """A full gc.collect() inside the engine's `step`-th step after arm(), timed (ms)."""

    def __init__(self, engine, step: int):
        self.engine, self.step, self.at, self.ms = engine, step, None, None
        step_fn = engine.step

        def stepped():
            if self.at is not None and engine.steps >= self.at:
                self.at = None
                t0 = time.perf_counter()
                gc.collect()
                self.ms = round((time.perf_counter() - t0) * 1e3, 3)
            step_fn()

        engine.step = stepped

    def arm(self) -> None:
        self.at, self.ms = self.engine.steps + self.step, None


def client(url: str, models: list[str], streams: int, prompt_len: int, output_len: int, vocab: int) -> dict:
    from serve import run_load

    return asyncio.run(run_load(url, models, streams, streams, (prompt_len, prompt_len), (output_len, output_len),
                                assign="round_robin", vocab=vocab))


def run_client(url: str, models: list[str], streams: int, prompt_len: int, output_len: int, vocab: int) -> dict:
    """The load generator in a child process (this script's `--client` mode); its JSON on stdout."""
    cmd = [sys.executable, __file__, "--client", url, "--models", ",".join(models), "--streams", str(streams),
           "--prompt-len", str(prompt_len), "--output-len", str(output_len), "--vocab", str(vocab)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="make_random_model preset (tiny, smollm2-135m, ...)")
    p.add_argument("--work", default="/tmp/scaleserve-host-path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--streams", default="1,64", help="comma list of concurrent streams")
    p.add_argument("--adapters", default="1,64", help="comma list of T (distinct adapters, round robin)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--gpu-ms", type=float, default=0.0, help="device time of one step on the virtual GPU")
    p.add_argument("--overlap", default="0,1", help="Engine overlap settings to run (0 = serial, 1 = overlap)")
    p.add_argument("--repeat", type=int, default=2, help="runs per scenario (the best is kept, all are stored)")
    p.add_argument("--collect-at-step", type=int,
                   help="a full gc.collect() on the engine thread at this step of each run: what a full collection "
                        "of the server's heap costs the streams (the server freezes its startup heap: main.py)")
    p.add_argument("--label", default="")
    p.add_argument("--json")
    p.add_argument("--client", help=argparse.SUPPRESS)  # child mode: the load generator against this URL
    p.add_argument("--models", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.client:
        print(json.dumps(client(a.client, a.models.split(","), int(a.streams), a.prompt_len, a.output_len,
                                a.vocab)))
        return 0

    from engine_overhead import PHASES, instrument
    from make_random_model import make_random_model
    from serve import make_adapters

    from scaleserve.server.loader import load_model
    from scaleserve.server.main import ThreadedServer, create_app
    from scaleserve.server.settings import Settings

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(a.work)
    model_dir = make_random_model(work / f"random-{a.preset}", a.preset)
    lm = load_model(model_dir, device=a.device)
    vocab = lm.model.args.vocab_size
    Ts = [int(t) for t in a.adapters.split(",")]
    names = make_adapters(lm, work / f"{a.preset}-adapters", max(Ts))
    streams = [int(x) for x in str(a.streams).split(",")]
    out = {"label": a.label, "preset": a.preset, "device": a.device, "gpu_ms": a.gpu_ms, "prompt_len": a.prompt_len,
           "output_len": a.output_len, "cpus": os.cpu_count(), "scenarios": []}
    for overlap in [bool(int(x)) for x in a.overlap.split(",")]:
        s = Settings(model=str(model_dir), device=a.device, served_model_name="base",
                     adapters=work / f"{a.preset}-adapters", data_dir=work / "data", log_level="warning",
                     max_num_seqs=max(64, *streams), gpu_adapter_slots=max(Ts) + 8,
                     kv_cache_max_blocks=max(streams) * ((a.prompt_len + a.output_len) // 16 + 4),
                     max_num_batched_tokens=max(2048, a.prompt_len), cuda_warmup=False, overlap_steps=overlap)
        with ThreadedServer(create_app(s, lm=lm)) as srv:
            engine = srv.app.state.engine
            pt = instrument(engine)
            VirtualGPU(engine, vocab, a.gpu_ms)
            collect = CollectAt(engine, a.collect_at_step) if a.collect_at_step else None
            run_client(srv.url, names[:1], 1, a.prompt_len, 16, vocab)  # warm-up
            for n in streams:
                for T in [t for t in Ts if t <= n]:
                    runs = []
                    for _ in range(a.repeat):
                        pt.acc.update(dict.fromkeys(PHASES, 0.0))  # in place: the wrappers hold this dict
                        steps0, overlapped0 = engine.steps, engine.overlapped_steps
                        if collect:
                            collect.arm()
                        pt.on = True
                        r = run_client(srv.url, names[:T], n, a.prompt_len, a.output_len, vocab)
                        pt.on = False
                        steps = max(1, engine.steps - steps0)
                        r.update(engine_steps=steps, overlapped_steps=engine.overlapped_steps - overlapped0,
                                 host_ms_per_step={k: round(v / steps * 1e3, 3) for k, v in pt.acc.items()})
                        if collect:
                            r["gc_collect_ms"] = collect.ms
                        runs.append(r)
                    best = max(runs, key=lambda r: r["throughput_tok_s"] or 0)
                    out["scenarios"].append({"overlap": overlap, "streams": n, "adapters": T, "best": best,
                                             "runs": runs})
    print(f"host path: virtual GPU of {a.gpu_ms} ms per step, {a.output_len} tokens per stream ({a.preset}, "
          f"{a.device}); host ms per step by phase")
    print(f"{'overlap':>7} | {'streams':>7} | {'T':>3} | {'tok/s':>8} | {'ITL p50':>8} | {'ITL p99':>8} | "
          f"{'ITL mean':>8} | {'overlapped':>10} | " + " | ".join(f"{k:>10}" for k in PHASES))
    for sc in out["scenarios"]:
        b = sc["best"]
        print(f"{sc['overlap']!s:>7} | {sc['streams']:>7} | {sc['adapters']:>3} | {b['throughput_tok_s']!s:>8} | "
              f"{b['itl_ms_p50']!s:>8} | {b['itl_ms_p99']!s:>8} | {b['itl_ms_mean']!s:>8} | "
              f"{b['overlapped_steps']:>10} | "
              + " | ".join(f"{b['host_ms_per_step'][k]:>10.3f}" for k in PHASES))
        if b.get("gc_collect_ms") is not None:
            print(f"        a full gc.collect() at step {a.collect_at_step} took {b['gc_collect_ms']} ms")
        if b["errors"]:  # e.g. 400s: prompt + output longer than the model's context
            print(f"        errors by status: {b['errors']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
