"""The one-row MMA GEMV's configs picked by timing the captured batch-1 decode graph itself.

Why: Triton's autotuner times each config of a kernel alone (L2 flushed, nothing before or after it). Inside a decode
step each GEMV follows another kernel under PDL, and on an H100 the 7B step moved by up to ~80 µs between the picks of
two processes; configs picked in the graph took it from 2.161 to 2.092 ms (bench/NOTES-kernels.md, session 21). The
picks become kernels/int4_mma_gemv.py PINNED entries, keyed like it by int4_mma_gemv.pin_key.

descend() is the search, with the timing passed in; decode_step_timer() times a warmed-up engine's decode graph.
bench/tune_decode.py runs both on a random model and writes a device's pins file (kernels/pins/); the server runs them
after its warm-up where `tune_decode_graph` is set, and keeps the picks in its data directory for the next start.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Key = tuple[int, ...]


def descend(start: dict[Key, dict], candidates: list[dict], step_ms: Callable[[dict[Key, dict]], float],
            rounds: int = 2, noise_ms: float = 0.002, report: Callable[[dict], None] | None = None
            ) -> tuple[dict[Key, dict], float, float]:
    """Coordinate descent: for one shape at a time (the others held), time the step with each candidate config and
    keep the fastest where it beats the current pick by more than noise_ms; a pass over the shapes repeats until it
    changes nothing or `rounds` are done. step_ms(pins) -> ms of a step run with those pins.
    -> (the picks, the step with `start`, the step with the picks); report(row) gets each shape's timings."""
    pins = dict(start)
    first = step_ms(pins)
    for r in range(rounds):
        changed = False
        for shape in sorted(pins):
            timed = [(step_ms({**pins, shape: cfg}), cfg) for cfg in candidates]
            best_ms, best = min(timed, key=lambda t: t[0])
            was = next((t for t, c in timed if c == pins[shape]), None)
            if was is None:  # (a start outside the candidates: time it as it is)
                was = step_ms(pins)
            if report is not None:
                report({"round": r, "shape": list(shape), "ms": [round(t, 4) for t, _ in timed], "best": best,
                        "best_ms": round(best_ms, 4), "was_ms": round(was, 4)})
            if best != pins[shape] and best_ms < was - noise_ms:
                pins[shape] = best
                changed = True
        if not changed:
            break
    return pins, first, step_ms(pins)


def autotuned_picks() -> dict[Key, dict]:
    """The MMA GEMV autotuners' picks so far, keyed as int4_mma_gemv.PINNED (pin_key)."""
    from scaleserve.kernels import int4_mma_gemv as mg

    picks = {}
    for tuner in (mg._tuned, mg._tuned_accum):
        for key, cfg in tuner.cache.items():  # (the autotuners' key: int4_mma_gemv._KEY, then the tensors' dtypes)
            picks[mg.pin_key(key[0], key[1], key[2], key[3], bool(key[7]))] = mg.config_pin(cfg)
    return picks


def current_picks(device: torch.device) -> dict[Key, dict]:
    """What each pin key launches have looked up in this process runs now: a pin (PINNED or the device's), else the
    autotuner's pick; the descent's start."""
    from scaleserve.kernels import int4_mma_gemv as mg

    probe = torch.empty(0, device=device)
    autotuned = autotuned_picks()
    picks = {}
    for key in sorted(mg.LOOKED_UP):
        pick = mg.current_pin(probe, key) or autotuned.get(key)
        if pick is not None:
            picks[key] = pick
    return picks


def load_or_tune(path: Path, needed: set[Key], tune: Callable[[], dict[Key, dict]]) -> tuple[dict[Key, dict], str]:
    """The pins an earlier start saved at path where they cover every needed key, else tune() now and save its picks
    there beside the other shapes' (another model's on the same GPU) -> (pins, "read" | "tuned"). A file that does
    not read as pins is tuned again and replaced (a warning says why)."""
    from scaleserve.kernels import int4_mma_gemv as mg

    saved = {}
    if path.is_file():
        try:
            saved = mg.read_pins(path)
        except ValueError as e:
            log.warning("%s; tuning again", e)
        if needed <= saved.keys():
            return saved, "read"
    pins = {**saved, **tune()}
    mg.write_pins(path, pins)
    return pins, "tuned"


def decode_step_timer(graphs, bucket: int, mode: int, replays: int = 100, repeats: int = 3
                      ) -> Callable[[dict[Key, dict]], float]:
    """step_ms(pins) for descend(): the decode graph of `bucket` (server.graphs' decode graphs, whose inputs hold a
    real or warm-up step) captured afresh under those pins, replayed back to back; the median of `repeats` timings
    of `replays` replays, in ms. The graph is dropped again (the engine's own is captured on its next use)."""
    from scaleserve.kernels import int4_mma_gemv as mg

    def step_ms(pins: dict[Key, dict]) -> float:
        saved = dict(mg.PINNED)
        mg.PINNED.update(pins)
        try:
            graph = capture(graphs, bucket, mode)
        finally:
            mg.PINNED.clear()
            mg.PINNED.update(saved)
        return statistics.median(replay_ms(graph, replays) for _ in range(repeats))

    return step_ms


def capture(graphs, bucket: int, mode: int) -> torch.cuda.CUDAGraph:
    """The graph of (bucket, mode) captured afresh with the kernels as they are set now (pins, switches) and taken out
    of graphs (server.graphs' decode or prefill graphs), which capture their own again on their next use."""
    graphs.graphs.pop((bucket, mode), None)
    with torch.inference_mode():  # (as the engine runs it: the fused kernels run only without autograd)
        graphs.run(bucket, mode)
    return graphs.graphs.pop((bucket, mode))[0]


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """ms per replay of graph over `replays` back-to-back replays (CUDA events; one replay first, untimed)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays
