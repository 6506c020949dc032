"""Where a decode step's time goes on the GPU: engine step wall vs. the CUDA graph's GPU time vs. kernels.

    python bench/decode_profile.py --presets llama2-7b,smollm2-135m --json out/decode_profile.json

For each preset (a random int4 model built in device memory) and batch size:
  step_ms     wall time of Engine.step() (one greedy decode step: pack inputs, replay the graph, argmax,
              detokenize, deliver), median over --steps steps, one step at a time (overlap off)
  step_ms_overlap  the same with Engine.overlap on: the host's work for one step runs while the GPU
              computes the next, so a step costs max(host, GPU) instead of their sum
  replay_ms   GPU time of the captured decode graph alone (CUDA events around replay), median
  host_ms     step_ms - replay_ms: what the host adds on top of the GPU work
  kernels     torch.profiler over eager decode forwards: per kernel family, GPU µs per step and count
  timeline    torch.profiler over overlapped steps and over back-to-back replays: a step's period, its graph's
              span, and the stream's work and idle time between two replays

Prints a short table per preset and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))


def build_engine(preset: str, max_num_seqs: int, pdl: bool = True, quantize_lm_head: bool = False):
    from scaleserve.adapters.registry import AdapterRegistry
    from scaleserve.server.engine import Engine
    from scaleserve.server.random_model import random_model
    from scaleserve.server.settings import Settings

    lm = random_model(preset, device="cuda", quantize_lm_head=quantize_lm_head)
    s = Settings(device="cuda", max_num_seqs=max_num_seqs, kv_cache_max_blocks=max_num_seqs * 64,
                 data_dir=tempfile.mkdtemp(prefix="scaleserve-prof-"), log_level="warning", pdl=pdl)
    reg = AdapterRegistry.from_settings(lm, s)
    return Engine(lm, reg.slab, reg, s)


# on/off switches, each a flag taking on | off | on,off (every combination is a run): default, what it switches
SWITCHES = {
    "pdl": ("on", "programmatic dependent launch"),
    "mma": ("on", "the MMA GEMV for the batch-1 layers its policy gives it"),
    "mma-batch": ("on", "the MMA batch kernel for the small-batch layers its policy gives it"),
    "fused-rope": ("default", "RoPE and the KV write inside the decode attention kernel (kernels/attention.py "
                              "DECODE_FUSED_ROPE; default: the module's setting)"),
    "quantize-lm-head": ("off", "the output projection in int4 (the MMA GEMV at batch 1) instead of bf16 cuBLAS"),
    "mode1-slab": ("default", "base / per-channel rows on the MMA kernels read the base scales from the slab's 16-bit "
                              "slot 0 (kernels/int4_matmul.py MODE1_FROM_SLAB; default: its setting) instead of "
                              "the float32 base table"),
    "pins": ("on", "the MMA GEMV pinned per shape to --mma-pins' picks (no effect without --mma-pins)"),
    "device-pins": ("on", "the MMA GEMV's configs from kernels/pins/<this GPU>.json where it has them (kernels/"
                          "int4_mma_gemv.py USE_DEVICE_PINS) instead of the autotuner's picks"),
    "silu-gate": ("default", "silu(gate) * up in the gate / up MMA GEMV's epilogue at batch 1 (kernels/int4_matmul.py "
                             "FUSE_SILU_GATE; default: its setting) instead of a SiLU kernel"),
    "fused-norms": ("default", "each RMSNorm inside the MMA GEMVs around it at batch 1 (kernels/int4_matmul.py "
                               "FUSE_NORMS; default: its setting) instead of the add + RMSNorm kernel"),
    "tokens-home-stream": ("default", "a step's tokens copied to the host on a stream of their own, beside the next "
                                      "step's input upload (server/engine.py TOKENS_HOME_STREAM; default: its "
                                      "setting) instead of on the compute stream before it"),
    "short-graphs": ("default", "batch-1 steps of short contexts on decode graphs whose attention runs 4 splits "
                                "(server/engine.py SHORT_DECODE_SPLITS; default: its setting) instead of the "
                                "heuristic's"),
    "zero-copy": ("default", "batch-1 decode graphs fetch their inputs from pinned memory and send their tokens home "
                             "themselves (server/graphs.py ZERO_COPY_BUCKETS; default: its setting) instead of the "
                             "copy engine's upload and copy home"),
    "embed-scaled": ("default", "a one-token step's embedding, first norm input and rope rows in one kernel "
                                "(server/model.py EMBED_SCALED; default: its setting) instead of three torch launches"),
    "bf16-logits": ("default", "decode graphs leave the int4 head's logits in bf16 (server/graphs.py "
                               "DECODE_LOGITS_IN_MODEL_DTYPE; default: its setting) instead of converting them"),
    "argmax-kernel": ("default", "decode graphs take their argmax (and send it home) with one PDL kernel "
                                 "(server/graphs.py DECODE_ARGMAX_KERNEL; default: its setting) instead of torch's"),
    "early-kv": ("default", "the fused-RoPE decode attention loads its first KV tile before its PDL wait "
                            "(kernels/attention.py DECODE_EARLY_KV; default: its setting)"),
}


def autotune_picks() -> dict[str, str]:
    """What the int4 kernels' autotuners have picked in this process so far: "kernel key" -> config."""
    from scaleserve.kernels.int4_matmul import autotuners

    return {f"{name} {key}": str(cfg) for name, tuner in autotuners().items() for key, cfg in tuner.cache.items()}


def family(name: str) -> str:
    """Group kernel names into the families a reader cares about."""
    n = name.lower()
    for key, fam in (("gemv", "int4 gemv"), ("int4", "int4 matmul"), ("adapted", "int4 matmul"),
                     ("paged", "attention"), ("attn", "attention"), ("write_kv", "write kv"),
                     ("gemm", "cublas (lm_head)"), ("cutlass", "cublas (lm_head)"), ("nvjet", "cublas (lm_head)"),
                     ("argmax", "sample"), ("reduce", "reduce"), ("elementwise", "elementwise"),
                     ("copy", "copy")):
        if key in n:
            return fam
    return name[:60]


def profile_kernels(engine, batch, reps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model, kv = engine.lm.model, engine.kv
    with torch.inference_mode():
        for _ in range(2):
            model(batch, kv.k, kv.v)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                model(batch, kv.k, kv.v)
            torch.cuda.synchronize()
    fams: dict[str, list[float]] = {}
    for e in prof.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us <= 0 or e.count == 0:
            continue
        f = fams.setdefault(family(e.key), [0.0, 0])
        f[0] += us / reps
        f[1] += e.count / reps
    rows = sorted(({"family": k, "us_per_step": round(v[0], 1), "launches_per_step": round(v[1], 1)}
                   for k, v in fams.items()), key=lambda r: -r["us_per_step"])
    return {"kernels": rows, "kernel_us_total": round(sum(r["us_per_step"] for r in rows), 1),
            "launches_total": round(sum(r["launches_per_step"] for r in rows), 1)}


def timed(fn, reps: int) -> tuple[list[float], list[float]]:
    """Seconds per call of fn, each synchronized: (host wall, GPU time between CUDA events)."""
    walls, gpus = [], []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        walls.append(time.perf_counter() - t0)
        gpus.append(e0.elapsed_time(e1) / 1e3)
    return walls, gpus


def time_prefill(engine, T: int, mode: int, reps: int = 20) -> dict:
    """An eager prefill forward of T tokens: wall (host launches included) vs GPU time, and the host
    functions that cost most (cProfile), since time to first token is this step."""
    import cProfile
    import io
    import pstats

    batch = engine._warm_batch(T, mode)
    model, kv = engine.lm.model, engine.kv
    with torch.inference_mode():
        model(batch, kv.k, kv.v)
        torch.cuda.synchronize()
        walls, gpus = timed(lambda: model(batch, kv.k, kv.v), reps)
        prof = cProfile.Profile()
        prof.enable()
        model(batch, kv.k, kv.v)
        torch.cuda.synchronize()
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
    res = {"tokens": T, "wall_ms": round(statistics.median(walls) * 1e3, 3),
           "gpu_ms": round(statistics.median(gpus) * 1e3, 3), "host_top": text.getvalue()}
    pg = engine.prefill_graphs
    if pg is not None:  # the same chunk as the engine runs it when the sequence is alone: a padded graph
        Tb = pg.bucket(T)
        # the graph's buffers still hold the last real prefill (at batch 4: four prompts, whose logits rows lie
        # past Tb): load a step of Tb padding tokens, the same work as one chunk padded to Tb
        pg.load(Tb, engine.staging.upload(engine._pack_prefill([], Tb)))
        pg.run(Tb, mode)
        torch.cuda.synchronize()
        graph_walls, _ = timed(lambda: pg.run(Tb, mode), reps)
        res["graph_bucket"] = Tb
        res["graph_wall_ms"] = round(statistics.median(graph_walls) * 1e3, 3)
    return res


def stream_timeline(drive, steps: int) -> dict:
    """The GPU's timeline over `steps` calls of drive() (torch.profiler; timeline_of reads it)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                drive()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as d:
            prof.export_chrome_trace(f"{d}/trace.json")
            return timeline_of(json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"])
    except Exception as e:  # (a diagnostic: a trace it cannot read must not cost the run its other figures)
        return {"error": f"timeline unavailable: {e!r}"}


def timeline_of(events: list[dict]) -> dict:
    """From a Chrome trace's events: each graph replay (the GPU work of one graph-launch call, matched by its
    correlation id), and what the stream runs or idles between two replays: the per-step cost of the work
    outside the graph. µs per step, means over the replays after the first."""
    api = {e["args"]["correlation"]: e["name"] for e in events
           if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                 key=lambda e: e["ts"])
    replays: dict[int, list[float]] = {}  # correlation -> [first start, last end]
    outside = []
    for e in gpu:
        corr = e.get("args", {}).get("correlation")
        if api.get(corr, "").startswith(("cudaGraphLaunch", "cuGraphLaunch")):
            r = replays.setdefault(corr, [e["ts"], e["ts"] + e["dur"]])
            r[0], r[1] = min(r[0], e["ts"]), max(r[1], e["ts"] + e["dur"])
        else:
            outside.append(e)
    spans = sorted(replays.values())[1:]
    if len(spans) < 2:
        return {"error": f"{len(spans) + 1} graph replays in the trace"}
    n = len(spans) - 1
    ops: dict[str, list[float]] = {}
    for e in outside:
        if spans[0][1] <= e["ts"] < spans[-1][0]:  # between two timed replays
            o = ops.setdefault(e["name"][:60], [0, 0.0])
            o[0] += 1 / n
            o[1] += e["dur"] / n
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return {"period_us": round((spans[-1][0] - spans[0][0]) / n, 2),
            "graph_us": round(statistics.mean(e - s for s, e in spans), 2),
            "between_us": round(statistics.mean(gaps), 2), "between_max_us": round(max(gaps), 2),
            "ops_between": {k: {"per_step": round(c, 2), "us": round(t, 2)} for k, (c, t) in ops.items()}}


def run(preset: str, batch: int, steps: int, pdl: bool = True, quantize_lm_head: bool = False) -> dict:
    from scaleserve.server.scheduler import SamplingParams, Sequence

    engine = build_engine(preset, max(8, batch), pdl, quantize_lm_head)
    for i in range(batch):
        prompt = [3 + (7 * i + 13 * j) % 900 for j in range(16)]
        engine.scheduler.add(Sequence(f"p{i}", prompt, SamplingParams(max_tokens=2 * steps + 128, temperature=0.0,
                                                                     ignore_eos=True)))
    while any(s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()  # captures the graph
    torch.cuda.synchronize()

    def step_walls(overlap: bool) -> list[float]:
        engine.overlap = overlap
        for _ in range(3):
            engine.step()  # settle into the mode
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t0)
        return walls

    walls = step_walls(False)
    walls_overlap = step_walls(True)
    timeline = stream_timeline(engine.step, 40)  # (overlapped steps)
    engine.overlap = False
    engine.step()
    graphs = engine._replayed  # (the batch-1 short-context graphs where the last step took them)
    b = graphs.bucket(batch)
    (graph, *_), mode = next((v, k[1]) for k, v in graphs.graphs.items() if k[0] == b)
    timeline_b2b = stream_timeline(graph.replay, 40)
    _, gpu = timed(graph.replay, steps)
    # back-to-back replays: the GPU time without the per-step sync bubble
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    back_to_back = (time.perf_counter() - t0) / steps
    step_ms, replay_ms = statistics.median(walls) * 1e3, statistics.median(gpu) * 1e3
    res = {"preset": preset, "batch": batch, "pdl": pdl, "step_ms": round(step_ms, 3), "replay_ms": round(replay_ms, 3),
           "replay_back_to_back_ms": round(back_to_back * 1e3, 3), "host_ms": round(step_ms - replay_ms, 3),
           "tok_s": round(batch / statistics.median(walls), 1),
           "step_ms_overlap": round(statistics.median(walls_overlap) * 1e3, 3),
           "tok_s_overlap": round(batch / statistics.median(walls_overlap), 1),
           "timeline_overlap": timeline, "timeline_back_to_back": timeline_b2b}
    res["short_graph_steps"] = engine.short_steps
    res["tokens_sent_home"] = engine.tokens_sent_home  # (steps of zero-copy graphs)
    res.update(profile_kernels(engine, graphs.batch(b, mode)))
    res["prefill16"] = time_prefill(engine, 16, mode)
    res["prefill16"].update(profile_kernels(engine, engine._warm_batch(16, mode), reps=3))
    engine = graphs = graph = None  # (so empty_cache below can give their memory back)
    torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="llama2-7b,smollm2-135m")
    p.add_argument("--batches", default="1")
    p.add_argument("--steps", type=int, default=100)
    for flag, (default, what) in SWITCHES.items():
        p.add_argument(f"--{flag}", default=default, help=f"on | off | on,off: {what} (each a run)")
    p.add_argument("--decode-attention", metavar="BLOCK_N,WARPS,MIN_PARTITION",
                   help="the decode attention kernel's tile choice (default: kernels/attention.py's); "
                        "bench/attention.py --sweep decode writes its best as `best`")
    p.add_argument("--autotune-timing", choices=("do_bench", "busy"),
                   help="how the kernels' autotuners time a config (kernels/device.py AUTOTUNE_TIMING; default: "
                        "its setting). Triton keeps autotune picks on disk: delete TRITON_CACHE_DIR's "
                        "*.autotune.json first, or the picks of an earlier run come back")
    p.add_argument("--mma-pins", metavar="JSON",
                   help="pin the MMA GEMV's config per shape to the fastest of a bench/kernels.py --timing-check "
                        "(graph_us) or --mma-sweep (us) JSON, timed on this device (kernels/int4_mma_gemv.py PINNED)")
    p.add_argument("--ablate", metavar="SWITCH,...",
                   help="instead of every combination: the switches' first settings, then each of these switches "
                        "off alone, then all of them off (one process, so the runs compare)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    from scaleserve.kernels import attention
    from scaleserve.kernels import device
    from scaleserve.kernels import int4_matmul as im
    from scaleserve.kernels import int4_mma_gemv
    from scaleserve.server import engine as engine_module
    from scaleserve.server import graphs as graphs_module
    from scaleserve.server import model as model_module

    if a.autotune_timing:
        device.AUTOTUNE_TIMING = a.autotune_timing
    if a.mma_pins:
        rows = json.loads(Path(a.mma_pins).read_text())["rows"]
        pins = int4_mma_gemv.pins_from_rows(rows, "graph_us" if "graph_us" in rows[0] else "us")
        print("MMA GEMV pins: " + "; ".join(f"{k}: {v}" for k, v in sorted(pins.items())), flush=True)

    if a.decode_attention:
        attention.DECODE_BLOCK_N, attention.DECODE_NUM_WARPS, attention.DECODE_MIN_PARTITION = (
            int(v) for v in a.decode_attention.split(","))

    mma_policy, batch_policy = im.MMA_GEMV_POLICY, im.MMA_BATCH_POLICY
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": [],
           "autotune_timing": device.AUTOTUNE_TIMING, "mma_pins": a.mma_pins,
           "decode_attention": [attention.DECODE_BLOCK_N, attention.DECODE_NUM_WARPS, attention.DECODE_MIN_PARTITION]}
    onoff = {True: "on", False: "off"}
    module_default = {"fused-rope": onoff[attention.DECODE_FUSED_ROPE], "silu-gate": onoff[im.FUSE_SILU_GATE],
                      "mode1-slab": onoff[im.MODE1_FROM_SLAB], "fused-norms": onoff[im.FUSE_NORMS],
                      "early-kv": onoff[attention.DECODE_EARLY_KV],
                      "tokens-home-stream": onoff[engine_module.TOKENS_HOME_STREAM],
                      "short-graphs": onoff[bool(engine_module.SHORT_DECODE_SPLITS)],
                      "zero-copy": onoff[1 in engine_module.ZERO_COPY_BUCKETS],
                      "embed-scaled": onoff[model_module.EMBED_SCALED],
                      "bf16-logits": onoff[graphs_module.DECODE_LOGITS_IN_MODEL_DTYPE],
                      "argmax-kernel": onoff[graphs_module.DECODE_ARGMAX_KERNEL]}
    zero_copy = engine_module.ZERO_COPY_BUCKETS
    choices = []  # per switch, its settings to run
    for flag in SWITCHES:
        given = getattr(a, flag.replace("-", "_"))
        choices.append([v == "on" for v in (module_default[flag] if given == "default" else given).split(",")])
    settings = list(itertools.product(*choices))
    if a.ablate:  # the first setting, then each named switch off alone, then all of them off
        names = a.ablate.split(",")
        unknown = sorted(set(names) - set(SWITCHES))
        if unknown:
            p.error(f"--ablate: unknown switches {unknown}")
        first = dict(zip(SWITCHES, settings[0]))
        settings = [tuple(first.values())]
        for off in [[n] for n in names] + [names]:
            settings.append(tuple(False if f in off else v for f, v in first.items()))
    for preset in a.presets.split(","):
        for B, setting in itertools.product([int(b) for b in a.batches.split(",")], settings):
            on = dict(zip(SWITCHES, setting))
            im.MMA_GEMV_POLICY = mma_policy if on["mma"] else "never"
            im.MMA_BATCH_POLICY = batch_policy if on["mma-batch"] else "never"
            attention.DECODE_FUSED_ROPE = on["fused-rope"]
            im.FUSE_SILU_GATE = on["silu-gate"]
            im.MODE1_FROM_SLAB = on["mode1-slab"]
            im.FUSE_NORMS = on["fused-norms"]
            attention.DECODE_EARLY_KV = on["early-kv"]
            engine_module.TOKENS_HOME_STREAM = on["tokens-home-stream"]
            engine_module.SHORT_DECODE_SPLITS = 4 if on["short-graphs"] else 0
            engine_module.ZERO_COPY_BUCKETS = (zero_copy or (1,)) if on["zero-copy"] else ()
            model_module.EMBED_SCALED = on["embed-scaled"]
            graphs_module.DECODE_LOGITS_IN_MODEL_DTYPE = on["bf16-logits"]
            graphs_module.DECODE_ARGMAX_KERNEL = on["argmax-kernel"]
            int4_mma_gemv.USE_DEVICE_PINS = on["device-pins"]
            if a.mma_pins:
                int4_mma_gemv.PINNED.clear()
                if on["pins"]:
                    int4_mma_gemv.PINNED.update(pins)
            r = run(preset, B, a.steps, on["pdl"], on["quantize-lm-head"])
            r.update(mma_gemv=on["mma"], mma_batch=on["mma-batch"], fused_rope=on["fused-rope"],
                     quantize_lm_head=on["quantize-lm-head"], silu_gate=on["silu-gate"],
                     mode1_slab=on["mode1-slab"], pins=bool(a.mma_pins) and on["pins"], fused_norms=on["fused-norms"],
                     device_pins=on["device-pins"], early_kv=on["early-kv"],
                     tokens_home_stream=on["tokens-home-stream"], short_graphs=on["short-graphs"],
                     zero_copy=on["zero-copy"], embed_scaled=on["embed-scaled"], bf16_logits=on["bf16-logits"],
                     argmax_kernel=on["argmax-kernel"])
            r["autotune_picks"] = autotune_picks()  # (cumulative over this process's runs)
            out["runs"].append(r)
            print(f"\n{preset} batch {B} " + " ".join(f"{f} {'on' if v else 'off'}" for f, v in on.items())
                  + f": step {r['step_ms']} ms = graph {r['replay_ms']} ms (back-to-back "
                  f"{r['replay_back_to_back_ms']}) + host {r['host_ms']} ms -> {r['tok_s']} tok/s; overlapped: "
                  f"step {r['step_ms_overlap']} ms -> {r['tok_s_overlap']} tok/s; kernels "
                  f"{r['kernel_us_total']} µs in {r['launches_total']} launches (eager); "
                  f"{r['short_graph_steps']} steps on short-context graphs")
            for name in ("overlap", "back_to_back"):
                t = r[f"timeline_{name}"]
                print(f"  timeline, {name.replace('_', '-')} (profiled): " + (t["error"] if "error" in t else
                      f"period {t['period_us']} µs = graph {t['graph_us']} + between {t['between_us']} (max "
                      f"{t['between_max_us']}); between: " + (", ".join(f"{k} x{v['per_step']} {v['us']} µs"
                                                                      for k, v in t["ops_between"].items()) or "-")))
            pf = r["prefill16"]
            print(f"  prefill of {pf['tokens']} tokens: graph (bucket {pf.get('graph_bucket')}) {pf.get('graph_wall_ms')} ms;"
                  f" eager: wall {pf['wall_ms']} ms, GPU {pf['gpu_ms']} ms; top "
                  "kernels: " + ", ".join(f"{k['family']} {k['us_per_step']} µs x{k['launches_per_step']}"
                                          for k in pf["kernels"][:5]))
            print(f"  {'kernel family':<40} {'µs/step':>9} {'launches':>9}")
            for k in r["kernels"][:14]:
                print(f"  {k['family']:<40} {k['us_per_step']:>9} {k['launches_per_step']:>9}")
            print("  MMA GEMV picks: " + "; ".join(f"{k}: {v}" for k, v in r["autotune_picks"].items()
                                                   if k.startswith("mma gemv")))
    for r in out["runs"]:
        print(f"--- host top functions, prefill {r['preset']}\n" + "\n".join(r["prefill16"]["host_top"].splitlines()[:30]))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
