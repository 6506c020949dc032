"""bench/serve.py reads the server's log back: the warm-up, and the stalls the server logged while serving
(kernels compiled after ready, slow engine steps), which the GPU run prints so a call's output names them."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"

LOG = """\
2026-12-07 06:14:45,193 INFO scaleserve.server.engine: KV cache: 4346 blocks of 16 tokens (34768.0 MiB)
2026-12-07 06:17:06,304 INFO scaleserve.server.engine: warm-up: 12 prefill sizes, 42 graphs, modes [1, 2, 3], in 141.1 s
2026-12-07 06:17:09,001 INFO scaleserve.requests: {"event": "request", "ttft_s": 0.25}
2026-12-07 06:17:18,410 WARNING scaleserve.server: kernel _prefill_kernel compiled while serving (every stream \
waited for it; warm-up missed this shape): _prefill_kernel[num_warps=4](q_ptr: ('*bf16', 'D'))
2026-12-07 06:17:18,902 WARNING scaleserve.server.engine: slow engine step: 1412 ms (eager; 64 sequences, 55 \
decoding, 9 prefilling 1152 tokens; the step's wall time, including the wait for the step before it)
2026-12-07 06:17:19,000 WARNING scaleserve.auth: AUTHENTICATION IS OFF
"""


def test_engine_info_reads_warm_up_and_stalls(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("serve", None)
    from serve import SubprocessServer

    log = tmp_path / "server.log"
    log.write_text(LOG)
    info = SubprocessServer(tmp_path, {}, {}, log).engine_info()
    assert info["kv_blocks"] == 4346
    assert info["warmup"] == {"prefill_sizes": 12, "graphs": 42, "modes": [1, 2, 3], "seconds": 141.1}
    assert info["stalls"] == [
        "2026-12-07 06:17:18,410 kernel _prefill_kernel compiled while serving (every stream waited for it; warm-up "
        "missed this shape): _prefill_kernel[num_warps=4](q_ptr: ('*bf16', 'D'))",
        "2026-12-07 06:17:18,902 slow engine step: 1412 ms (eager; 64 sequences, 55 decoding, 9 prefilling 1152 "
        "tokens; the step's wall time, including the wait for the step before it)"]


def test_step_counts_give_each_kinds_mean_gpu_step(monkeypatch):
    """The engine counters over a pass, and with the server's GPU step timing, each kind's mean ms a step."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("serve", None)
    from serve import step_counts

    before = {"decode_graph": 10.0, "overlapped": 8.0, "gpu_s decode_graph": 0.02, "gpu_n decode_graph": 10.0,
              "gpu_s prefill_graph": 0.5, "gpu_n prefill_graph": 1.0}
    after = {"decode_graph": 265.0, "prefill_graph": 1.0, "overlapped": 262.0, "gpu_s decode_graph": 0.53,
             "gpu_n decode_graph": 265.0, "gpu_s prefill_graph": 0.5, "gpu_n prefill_graph": 1.0}
    assert step_counts(before, after) == {"decode_graph": 255, "prefill_graph": 1, "overlapped": 254,
                                          "gpu_ms decode_graph": 2.0}


def test_subprocess_server_passes_booleans_as_switches(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("serve", None)
    from serve import SubprocessServer

    cmd = SubprocessServer(tmp_path, {"max_num_seqs": 64, "gpu_step_timing": True, "pdl": False}, {},
                           tmp_path / "log").cmd
    assert cmd[cmd.index("--max-num-seqs") + 1] == "64"
    assert "--gpu-step-timing" in cmd and "--no-pdl" in cmd and "True" not in cmd and "False" not in cmd


def test_engine_steps_read_the_servers_metrics(monkeypatch):
    """The step counters and the GPU step histogram's sum and count, by the names server/metrics.py exports."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("serve", None)
    from serve import engine_steps_of

    from scaleserve.server.metrics import Metrics

    m = Metrics()
    m.engine_steps.labels("decode_graph").inc(3)
    m.overlapped_steps.inc(2)
    for v in (0.002, 0.004):
        m.gpu_step.labels("decode_graph").observe(v)
    got = engine_steps_of(m.exposition()[0].decode())
    assert got["decode_graph"] == 3 and got["overlapped"] == 2 and got["gpu_n decode_graph"] == 2
    assert abs(got["gpu_s decode_graph"] - 0.006) < 1e-12
