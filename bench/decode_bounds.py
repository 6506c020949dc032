"""What a fusion could at most save in the batch-1 decode step: the CUDA graph with one kernel family left out.

    python bench/decode_bounds.py --preset llama2-7b --quantize-lm-head --json out/decode-bounds.json

Timing only: a variant that leaves kernels out computes wrong tokens (a random model does not care). One engine,
one sequence at a --context of tokens; each variant's decode graph is captured once, then every graph is replayed
back to back in rounds (round-robin, so drift hits every variant alike), median ms per replay. Variants:

  base       the step as it ships (every variant runs the same MMA GEMV configs: the device's pins, else the
             autotuner's picks, pinned)
  silu       without the SiLU launches (what the gate / up GEMV's SiLU epilogue could at most save); down reads
             the gate half of the gate / up output instead
  merge      without the decode attention's split merge launches; o reads q instead
  attention  without the decode attention and its merge (the o projection reads q)
  norm-in    the MMA GEMVs after a norm without the rsqrt(mean(h^2)) of h (no h loads, no reduction)
  silu-real  the gate / up GEMV's SiLU epilogue as it exists (kernels/int4_matmul.py FUSE_SILU_GATE), autotuned
             (or as pinned: a pins file may have its key, "N,K,mode,group_size,1")
  sumsq-off  the MMA GEMVs after a norm sum h's squares themselves (kernels/int4_mma_gemv.py NORM_SUMSQ False)
             instead of taking the sums the projection into the stream wrote
  spacers    an empty kernel after each projection into the residual stream (o, down): the next GEMV launches only
             once that one has finished
  attn-nN-wW-sS-mM-eE
             the decode attention with other launch parameters (any of them, in this order): BLOCK_N N keys a step,
             W warps, S context splits, M warps of the split merge, the first KV tile before the PDL wait (E 1) or
             after it (E 0) (kernels/attention.py DECODE_BLOCK_N, DECODE_NUM_WARPS, decode_num_splits,
             DECODE_MERGE_WARPS, DECODE_EARLY_KV), e.g. attn-n32-w2 or attn-n32-e1: a real variant, not a bound
             (tests/kernels cover the default parameters and both values of E)
  twice      two decode steps in one graph, the second embedding the first's argmax (what a graph of two greedy
             steps would cost a token; its ms are per token: the replay's over 2)
  ops        the graph as the copy engine feeds it (not zero-copy: server/graphs.py ZERO_COPY_BUCKETS), replayed with
             the overlapped engine step's stream operations between replays: the inputs' upload (all but the tokens,
             from pinned memory) before each and the tokens' copy home after. Against base (a zero-copy graph, which
             fetches its inputs and sends its tokens home itself): what the copy engine's round trips cost a step
  embed-scaled, bf16-logits, argmax-kernel
             real variants: the step with a switch that is off turned on (server/model.py EMBED_SCALED: embedding,
             first norm's input and rope rows in one kernel; server/graphs.py DECODE_LOGITS_IN_MODEL_DTYPE: logits
             left in the model's dtype; DECODE_ARGMAX_KERNEL: the argmax, and a zero-copy graph's copy home, as one
             PDL kernel), or with one that is on turned off (each name with -off, e.g. embed-scaled-off)
  a+b        several of the above at once (e.g. silu+merge+norm-in, twice+ops)

Prints one row per variant (ms, µs saved against base) and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))  # (bench/kernels.py would shadow Hugging Face's `kernels`; see decode_profile)

from scaleserve.kernels.pdl import wait_for_producer  # noqa: E402

LEAVE_OUT = ("silu", "merge", "attention", "norm-in", "silu-real", "spacers", "sumsq-off", "twice", "ops")
# real variants: a module switch set for the capture (name: (module, attribute)); NAME turns it on, NAME-off off
SWITCHES = {"embed-scaled": ("scaleserve.server.model", "EMBED_SCALED"),
            "bf16-logits": ("scaleserve.server.graphs", "DECODE_LOGITS_IN_MODEL_DTYPE"),
            "argmax-kernel": ("scaleserve.server.graphs", "DECODE_ARGMAX_KERNEL")}
# attn-n32-w2-s4-m1-e1 (each part optional, in this order)
ATTENTION_CONFIG = re.compile(r"attn(?=-)(?:-n(\d+))?(?:-w(\d+))?(?:-s(\d+))?(?:-m(\d+))?(?:-e([01]))?$")


def unknown_parts(variant: str) -> list[str]:
    """The parts of a variant (a+b) that are neither LEAVE_OUT names, base, nor an attention config."""
    return sorted(p for p in variant.split("+") if p not in LEAVE_OUT and p != "base" and not ATTENTION_CONFIG.match(p)
                  and p.removesuffix("-off") not in SWITCHES)


@triton.jit
def _spacer(PDL: tl.constexpr):
    wait_for_producer(PDL)


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def leaving_out(parts: set[str]):
    """Patch the package so the decode step launches without the named parts (see the module docstring)."""
    from scaleserve.kernels import attention, fused, pdl
    from scaleserve.kernels import int4_matmul as im
    from scaleserve.kernels import int4_mma_gemv as mg
    from scaleserve.kernels.linear import QuantLinear

    saved = [(fused, "silu_mul", fused.silu_mul), (attention, "_decode_reduce_kernel", attention._decode_reduce_kernel),
             (attention, "paged_attention", attention.paged_attention), (im, "launch_mma_gemv", im.launch_mma_gemv),
             (attention, "DECODE_BLOCK_N", attention.DECODE_BLOCK_N),
             (attention, "DECODE_NUM_WARPS", attention.DECODE_NUM_WARPS),
             (attention, "decode_num_splits", attention.decode_num_splits),
             (attention, "DECODE_MERGE_WARPS", attention.DECODE_MERGE_WARPS),
             (attention, "DECODE_EARLY_KV", attention.DECODE_EARLY_KV),
             (im, "FUSE_SILU_GATE", im.FUSE_SILU_GATE), (QuantLinear, "add_into", QuantLinear.add_into),
             (mg, "NORM_SUMSQ", mg.NORM_SUMSQ)]
    from scaleserve.server.graphs import DecodeGraphs

    saved.append((DecodeGraphs, "forward", DecodeGraphs.forward))
    for part in parts:
        switch = SWITCHES.get(part.removesuffix("-off"))
        if switch is not None:
            module, attribute = importlib.import_module(switch[0]), switch[1]
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, not part.endswith("-off"))
    launch, forward = im.launch_mma_gemv, DecodeGraphs.forward
    try:
        if "twice" in parts:  # (the second step at the first's position: the same work, one token's context less)
            DecodeGraphs.forward = lambda self, batch, *home: (forward(self, batch), forward(self, batch, *home))[1]
        # What a left-out kernel would have written, the next projection reads from a tensor the step has just written
        # (so from L2, as it would have): not from the unwritten output buffer, which after a step's 3.5 GB of weights
        # is in DRAM only. (Session 21's first runs read the unwritten buffers: their silu / merge rows were off.)
        if "silu" in parts:
            fused.silu_mul = lambda gate_up, out=None: gate_up[..., : gate_up.shape[-1] // 2]  # (the gate half)
        if "merge" in parts:
            attention._decode_reduce_kernel = _NoLaunch()
            attend = attention.paged_attention

            def unmerged(q, *args, **kwargs):
                attend(q, *args, **kwargs)
                return q

            attention.paged_attention = unmerged
        if "attention" in parts:
            attention.paged_attention = lambda q, *args, **kwargs: q
        if "norm-in" in parts:
            im.launch_mma_gemv = lambda *args, norm_in=None, **kwargs: launch(*args, **kwargs)
        if "silu-real" in parts:
            im.FUSE_SILU_GATE = True
        if "sumsq-off" in parts:
            mg.NORM_SUMSQ = False
        for part in parts:
            m = ATTENTION_CONFIG.match(part)
            if m is None:
                continue
            block_n, warps, splits, merge_warps, early = (int(g) if g else None for g in m.groups())
            if block_n:
                attention.DECODE_BLOCK_N = block_n
            if warps:
                attention.DECODE_NUM_WARPS = warps
            if splits:
                attention.decode_num_splits = lambda *args, n=splits: n
            if merge_warps:
                attention.DECODE_MERGE_WARPS = merge_warps
            if early is not None:
                attention.DECODE_EARLY_KV = bool(early)
        if "spacers" in parts:
            add_into = QuantLinear.add_into

            def spaced(self, x, rows, stream, next_norm=None):
                add_into(self, x, rows, stream, next_norm)
                _spacer[(1,)](**pdl.launch_kwargs(stream))

            QuantLinear.add_into = spaced
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


class WithStreamOps:
    """A decode graph replayed as the overlapped engine step replays a graph the copy engine feeds: its inputs
    uploaded (all but the tokens, from pinned memory) before, the tokens copied home to pinned memory after."""

    def __init__(self, graph, graphs, b: int):
        from scaleserve.server.graphs import decode_views

        self.graph, self.tokens = graph, graphs.tokens(b)
        self.inputs = graphs.inputs[b]
        self.packed = self.inputs.cpu().pin_memory()  # (the inputs as they are: the replay computes the same)
        self.start = self.tokens.numel() * 8 + (-self.tokens.numel() * 8) % 16  # (the tokens region's bytes)
        assert decode_views(self.packed, b, graphs.width, torch.int64, torch.int32)[1].data_ptr() == \
            self.packed[self.start:].data_ptr()
        self.home = torch.empty(b, dtype=torch.int64, pin_memory=True)

    def replay(self) -> None:
        self.inputs[self.start:].copy_(self.packed[self.start:], non_blocking=True)
        self.graph.replay()
        self.home.copy_(self.tokens, non_blocking=True)


def kernel_families(graph, reps: int = 5) -> list[tuple[str, float, float]]:
    """(family, µs, launches) per replay of graph, most time first."""
    from decode_profile import family
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    fams: dict[str, list[float]] = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0)
        if us > 0 and e.count:
            f = fams.setdefault(family(e.key), [0.0, 0.0])
            f[0] += us / reps
            f[1] += e.count / reps
    return sorted(((k, v[0], v[1]) for k, v in fams.items()), key=lambda r: -r[1])


def decode_engine(preset: str, context: int, quantize_lm_head: bool):
    """-> (an engine decoding one sequence at context tokens, the decode graphs its steps replay (the short-context
    ones at short contexts: server/engine.py SHORT_DECODE_SPLITS), the graph's key, that graph): every kernel of the
    step compiled and autotuned."""
    from decode_profile import build_engine

    from scaleserve.server.scheduler import SamplingParams, Sequence

    engine = build_engine(preset, 8, True, quantize_lm_head)
    prompt = [3 + (13 * j) % 900 for j in range(context - 8)]
    engine.scheduler.add(Sequence("p", prompt, SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)))
    for _ in range(12):
        engine.step()  # prefill, then decode steps: the decode graph is captured (and every kernel autotuned)
    torch.cuda.synchronize()
    graphs = engine._replayed
    key, (graph, *_) = next(iter(graphs.graphs.items()))
    return engine, graphs, key, graph


def replay_ms(graphs: dict, rounds: int, replays: int) -> dict[str, list[float]]:
    """ms per replay of each graph, one figure a round; the graphs take turns, so drift hits them alike."""
    from scaleserve.server import graph_tune

    times: dict[str, list[float]] = {n: [] for n in graphs}
    for _ in range(rounds):
        for n, g in graphs.items():
            times[n].append(graph_tune.replay_ms(g, replays))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--context", type=int, default=256, help="the sequence's tokens when the graphs are timed")
    p.add_argument("--variants", default="base,silu,merge,attention,norm-in,silu+merge+norm-in,silu+attention+norm-in,"
                                         "silu-real,base",
                   help="comma-separated; a+b leaves out several parts at once")
    p.add_argument("--quantize-lm-head", action="store_true")
    p.add_argument("--replays", type=int, default=200, help="back-to-back replays per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-pins", action="store_true", help="let the autotuner's picks stand (no PINNED configs)")
    p.add_argument("--pins", metavar="JSON", help='MMA GEMV configs from the start, {"pins": {"N,K,mode,group_size": '
                                                  'config}} (no autotuning of those shapes)')
    p.add_argument("--profile", action="store_true", help="also each graph's kernels by family (torch.profiler)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    from scaleserve.kernels import int4_mma_gemv as mg
    from scaleserve.server import graph_tune

    variants = a.variants.split(",")
    for v in variants:
        bad = unknown_parts(v)
        if bad:
            p.error(f"unknown parts {bad}; known: {', '.join(LEAVE_OUT + tuple(SWITCHES))} (-off too), "
                    "attn-nN-wW-sS-mM-eE")
    if a.pins:
        mg.PINNED.update(mg.read_pins(Path(a.pins)))
    engine, decode_graphs, (b, mode), first = decode_engine(a.preset, a.context, a.quantize_lm_head)
    if not a.no_pins:  # every variant runs the same GEMV configs (silu-real's epilogue excepted)
        mg.PINNED.update(graph_tune.autotuned_picks())
        print("pins: " + "; ".join(f"{k}: {v}" for k, v in sorted(mg.PINNED.items())))
    graphs = {"engine's graph": first}
    for v in variants:
        name = v if v not in graphs else f"{v} (again)"
        parts = set(v.split("+")) - {"base"}
        zero_copy = set(decode_graphs.zero_copy)
        if "ops" in parts:
            decode_graphs.zero_copy.discard(b)
        with leaving_out(parts):
            graphs[name] = graph_tune.capture(decode_graphs, b, mode)
        decode_graphs.zero_copy = zero_copy
        if "ops" in parts:
            graphs[name] = WithStreamOps(graphs[name], decode_graphs, b)
    times = replay_ms(graphs, a.rounds, a.replays)
    for n in times:  # ms per token
        if "twice" in n.split(" ")[0].split("+"):
            times[n] = [t / 2 for t in times[n]]
    if a.profile:
        for n, g in graphs.items():
            print(f"  {n}: " + ", ".join(f"{k} {us:.0f} µs x{c:.0f}" for k, us, c in kernel_families(g)[:8]))
    base = statistics.median(times[variants[0]])
    rows = []
    print(f"{a.preset} batch 1, context {a.context}, {torch.cuda.get_device_name()}: decode graph, back-to-back "
          f"replays ({a.rounds} rounds x {a.replays})")
    print(f"{'variant':<28} {'ms':>7} {'saved µs':>9} {'spread µs':>10}")
    for n, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": n, "ms": round(med, 4), "saved_us": round((base - med) * 1e3, 1),
                     "spread_us": round((max(ts) - min(ts)) * 1e3, 1), "rounds_ms": [round(t, 4) for t in ts]})
        print(f"{n:<28} {med:>7.4f} {rows[-1]['saved_us']:>9.1f} {rows[-1]['spread_us']:>10.1f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        command = "python3 bench/decode_bounds.py " + " ".join(argv or sys.argv[1:])
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "preset": a.preset,
                                            "context": a.context, "quantize_lm_head": a.quantize_lm_head,
                                            "command": command, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
