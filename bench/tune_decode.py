"""Pick the MMA GEMV's config per shape by timing the whole batch-1 decode graph, not each kernel alone.

    python bench/tune_decode.py --preset llama2-7b --quantize-lm-head --json kernels/pins/NVIDIA_H100_80GB_HBM3.json

Why: the autotuner times each kernel on its own, with its L2 flushed and nothing before or after it; inside the step a
GEMV follows another kernel under PDL, and its picks move from run to run (bench/NOTES-kernels.md, session 21). Here
every config of MMA_GEMV_CONFIGS is tried for one shape at a time (the other shapes held at their current pick) by
capturing the decode graph and replaying it back to back; the fastest stays, and the rounds repeat over the shapes
(coordinate descent) until a round changes nothing or --rounds are done.

The JSON written is what kernels/int4_mma_gemv.py loads as its device's pins (kernels/pins/<device name>.json):
{"device": ..., "pins": {"N,K,mode,group_size": config}, ...}. The search is server/graph_tune.py's, which the server
also runs on its own model after warm-up (`scaleserve serve --tune-decode-graph`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))  # (bench/kernels.py would shadow Hugging Face's `kernels`; see decode_profile)


def main(argv=None) -> int:
    from decode_bounds import decode_engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--context", type=int, default=256, help="the sequence's tokens when the graphs are timed")
    p.add_argument("--quantize-lm-head", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="passes over the shapes at most")
    p.add_argument("--replays", type=int, default=100, help="back-to-back replays per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per config (their median counts)")
    p.add_argument("--silu-gate", action="store_true",
                   help="the gate / up projection with its SiLU epilogue (kernels/int4_matmul.py FUSE_SILU_GATE), "
                        "whose configs are tuned then too (their pins' key ends in 1)")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    from scaleserve.kernels import int4_matmul as im
    from scaleserve.kernels import int4_mma_gemv as mg
    from scaleserve.server import graph_tune

    im.FUSE_SILU_GATE = a.silu_gate
    mg.PINNED.clear()
    mg.USE_DEVICE_PINS = False  # (the autotuner's picks are where the descent starts, also on a GPU with pins)
    engine, graphs, (b, mode), _ = decode_engine(a.preset, a.context, a.quantize_lm_head)
    log = []

    def report(row: dict) -> None:
        log.append(row)
        print(f"round {row['round']} {tuple(row['shape'])}: best {row['best_ms']:.4f} ms ({row['best']}), the "
              f"current pick {row['was_ms']:.4f} ms", flush=True)

    step_ms = graph_tune.decode_step_timer(graphs, b, mode, a.replays, a.repeats)
    pins, start, end = graph_tune.descend(graph_tune.autotuned_picks(), mg.PIN_CONFIGS, step_ms, a.rounds,
                                          report=report)
    print(f"{a.preset} batch 1, context {a.context}, {torch.cuda.get_device_name()}: the autotuner's picks "
          f"{start:.4f} ms a step, tuned {end:.4f}")
    mg.write_pins(Path(a.json), pins, device=torch.cuda.get_device_name(), preset=a.preset, context=a.context,
                  quantize_lm_head=a.quantize_lm_head, silu_gate=a.silu_gate, step_ms_autotuned=round(start, 4),
                  step_ms_tuned=round(end, 4),
                  command="python3 bench/tune_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  rounds=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
