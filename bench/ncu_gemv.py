"""Hardware counters of the one-row MMA GEMV on the four Llama-2-7B shapes (g128, mode 2: one adapter's scales),
each launched with a fixed config: a pins JSON's (default: the autotuner's H100 picks in the batch-1 decode step
of session 17, bench/results/mma-pins-step-s17-h100.json, which bench/decode_profile.py --mma-pins also reads).

Run it under Nsight Compute; it launches each shape's kernel --launches times on weights L2 cannot hold:

  ncu --clock-control none -k regex:_mma_gemv_kernel --section SpeedOfLight --section Occupancy \
      --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      --csv --page details python3 bench/ncu_gemv.py > ncu.csv

(bench/gpu_session.sh ncu_gemv adds the warp stall reasons as --metrics.) Without ncu it prints each shape's time per
launch (CUDA events around --launches launches), as a sanity check. `--summarize ncu.csv` prints a table of the
launches' key figures from that CSV (on any machine).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import torch

# bench/kernels.py by path: the name `kernels` is also the repository's kernel package (and a PyPI package)
_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)

SHAPES = ("qkv", "o", "gate_up", "down")
STEP_PINS = Path(__file__).parent / "results" / "mma-pins-step-s17-h100.json"


# what --summarize prints a column of, per launch: (label, metric name and unit as ncu's details page spells them)
SUMMARY = (("µs", "Duration", "ns"), ("DRAM %", "DRAM Throughput", "%"), ("L2 hit %", "L2 Hit Rate", "%"),
           ("issued/sched", "Issued Warp Per Scheduler", ""), ("warps/sched", "Active Warps Per Scheduler", "warp"),
           ("eligible", "Eligible Warps Per Scheduler", "warp"), ("no-elig %", "No Eligible", "%"),
           ("occupancy %", "Achieved Occupancy", "%"), ("regs", "Registers Per Thread", "register/thread"))
STALL_PREFIX = "smsp__average_warps_issue_stalled_"


def summarize(path: str) -> None:
    """Per launch: SUMMARY's figures, then the three largest warp stall reasons (warps stalled per issue)."""
    launches: dict[str, dict] = {}
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # (ncu prints its own log lines first)
    for row in csv.DictReader(lines):
        launch = launches.setdefault(row["ID"], {"grid": row["Grid Size"]})
        launch[(row["Metric Name"], row["Metric Unit"])] = row["Metric Value"].replace(",", "")
    print(f"{'launch':>6} {'grid':>12} " + " ".join(f"{label:>12}" for label, _, _ in SUMMARY)
          + "  top stalls (warps per issue)")
    for lid, m in launches.items():
        cells = []
        for _, name, unit in SUMMARY:
            v = m.get((name, unit), "-")
            cells.append(f"{float(v) / 1000:.1f}" if unit == "ns" and v != "-" else v)
        stalls = sorted(((float(v), k[0][len(STALL_PREFIX):].split("_per_")[0]) for k, v in m.items()
                         if isinstance(k, tuple) and k[0].startswith(STALL_PREFIX) and v not in ("", "n/a")),
                        reverse=True)
        print(f"{lid:>6} {m['grid']:>12} " + " ".join(f"{c:>12}" for c in cells) + "  "
              + ", ".join(f"{name} {v:.2f}" for v, name in stalls[:3]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--pins", default=str(STEP_PINS),
                   help="a JSON of MMA GEMV configs per shape (bench/kernels.py --mma-sweep / --timing-check rows, or a "
                        "pins file like the default)")
    p.add_argument("--launches", type=int, default=3)
    p.add_argument("--summarize", metavar="CSV", help="print the key figures of an ncu CSV of this script's launches")
    a = p.parse_args(argv)
    if a.summarize:
        summarize(a.summarize)
        return 0
    from scaleserve.kernels.int4_mma_gemv import pins_from_rows

    rows = json.loads(Path(a.pins).read_text())["rows"]
    pins = pins_from_rows(rows, "graph_us" if "graph_us" in rows[0] else "us")
    cache: dict = {}
    for shape in a.shapes.split(","):
        K, N = bench_kernels.SHAPES[shape]
        config = {"MMA": 1, **pins[(N, K, 2, 128)]}
        calls = bench_kernels.ours_calls(K, N, 128, 2, 1, 1, cache, 1, config)
        calls[0]()  # compile outside the timed launches
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(a.launches):
            calls[1 + i % (len(calls) - 1)]()
        end.record()
        end.synchronize()
        print(f"{shape:8} K {K:5} N {N:5} config {config}: {start.elapsed_time(end) * 1e3 / a.launches:.1f} µs "
              "a launch (host-launched, not graph replay)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
