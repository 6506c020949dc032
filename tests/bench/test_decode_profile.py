"""bench/decode_profile.py's timeline: graph replays and the stream's work between them, from a Chrome trace."""

import importlib.util
from pathlib import Path

import pytest

# loaded from its file: bench/ on sys.path would shadow Hugging Face's `kernels` with bench/kernels.py
_spec = importlib.util.spec_from_file_location("decode_profile", Path(__file__).resolve().parents[2] / "bench" /
                                               "decode_profile.py")
decode_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode_profile)


def trace(steps: int, graph_us: float, copies: list[tuple[str, float, float]]) -> list[dict]:
    """A trace of `steps` replays, each of three kernels over graph_us, then `copies` (name, gap before, duration),
    then a 1 µs gap before the next replay; the runtime calls that launched them (their correlation ids)."""
    events, t, corr = [], 100.0, 0
    for _ in range(steps):
        corr += 1
        events.append({"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t - 5, "dur": 3,
                       "args": {"correlation": corr}})
        for k in range(3):  # kernels of one replay, back to back
            events.append({"cat": "kernel", "name": f"layer_{k}", "ts": t + k * graph_us / 3, "dur": graph_us / 3,
                           "args": {"correlation": corr}})
        t += graph_us
        for name, gap, dur in copies:
            corr += 1
            events.append({"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": t - 20, "dur": 4,
                           "args": {"correlation": corr}})
            events.append({"cat": "gpu_memcpy", "name": name, "ts": t + gap, "dur": dur, "args": {"correlation": corr}})
            t += gap + dur
        t += 1.0
    return events


def test_timeline_splits_a_step_into_its_graph_and_what_runs_between():
    copies = [("Memcpy DtoH (Device -> Pinned)", 2.0, 1.5), ("Memcpy HtoD (Pinned -> Device)", 3.0, 1.0)]
    events = trace(6, 2000.0, copies)
    t = decode_profile.timeline_of(events[::-1])  # (any order)
    assert t["period_us"] == pytest.approx(2000 + 2 + 1.5 + 3 + 1 + 1)
    assert t["graph_us"] == pytest.approx(2000)
    assert t["between_us"] == pytest.approx(8.5) and t["between_max_us"] == pytest.approx(8.5)
    assert t["ops_between"] == {"Memcpy DtoH (Device -> Pinned)": {"per_step": 1.0, "us": 1.5},
                                "Memcpy HtoD (Pinned -> Device)": {"per_step": 1.0, "us": 1.0}}


def test_back_to_back_replays_have_nothing_between():
    t = decode_profile.timeline_of(trace(5, 700.0, []))
    assert t["period_us"] == pytest.approx(701) and t["between_us"] == pytest.approx(1) and t["ops_between"] == {}


def test_too_few_replays_say_so():
    assert "error" in decode_profile.timeline_of(trace(2, 700.0, []))
