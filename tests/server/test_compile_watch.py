"""server/compile_watch.py: kernels compiled while serving are logged and counted.

Triton compiles only for a GPU, so these tests call the hook the way Triton does after a compile: through
JITFunction._call_hook, Triton's own code, which builds the hook's arguments from a real @triton.jit function."""

from __future__ import annotations

import logging
import time

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.nvidia.compiler import CUDAOptions  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from scaleserve.server.compile_watch import watch_compiles  # noqa: E402


def _probe_kernel_fn(x_ptr, n, BLOCK: tl.constexpr):
    pass


# a JITFunction even where TRITON_INTERPRET is set (the suite's kernel tests set it): the compile path is the
# GPU's, whose hook the server watches
_probe_kernel = JITFunction(_probe_kernel_fn)


def _compiled(n_divisible_by_16: bool) -> None:
    """What Triton does after compiling _probe_kernel for one specialization: call the post-compile hook."""
    key = ("probe", [("*fp32", "D"), ("i32", "D" if n_divisible_by_16 else ""), (64, "")], ())
    _probe_kernel._call_hook(knobs.runtime.jit_post_compile_hook, key,
                             {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, 0, {(2,): 64}, CUDAOptions(),
                             [{}], False)


@pytest.fixture
def earlier_hook(monkeypatch):
    """A hook installed before the watch (e.g. a profiler's): it must keep being called, then be restored. The
    watch's module state starts empty here (a session-wide test server may be watching) and is put back after."""
    from scaleserve.server import compile_watch

    seen = []
    monkeypatch.setattr(compile_watch, "_watchers", [])
    monkeypatch.setattr(compile_watch, "_earlier_hook", None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(kw["fn"].name))
    return seen


def test_watch_reports_each_compile_and_chains_the_earlier_hook(earlier_hook):
    seen = []
    unwatch = watch_compiles(lambda kernel, spec: seen.append((kernel, spec)))
    _compiled(True)
    _compiled(False)
    assert [k for k, _ in seen] == ["_probe_kernel_fn", "_probe_kernel_fn"]
    # the specialization tells the two apart: what warm-up would have to cover
    assert "n: ('i32', 'D')" in seen[0][1] and "n: ('i32', '')" in seen[1][1]
    assert earlier_hook == ["_probe_kernel_fn", "_probe_kernel_fn"]
    unwatch()
    _compiled(True)
    assert len(seen) == 2 and len(earlier_hook) == 3  # the watch is gone, the earlier hook is back


def test_watches_of_several_apps_come_and_go_in_any_order(earlier_hook):
    a, b = [], []
    unwatch_a = watch_compiles(lambda kernel, spec: a.append(kernel))
    unwatch_b = watch_compiles(lambda kernel, spec: b.append(kernel))
    _compiled(True)
    unwatch_a()  # the first app stops first: the second still hears of compiles
    _compiled(True)
    assert (len(a), len(b), len(earlier_hook)) == (1, 2, 2)
    unwatch_b()
    _compiled(True)
    assert (len(a), len(b), len(earlier_hook)) == (1, 2, 3)  # the earlier hook alone again


def test_a_failing_report_does_not_break_the_launch(earlier_hook, caplog):
    def broken(kernel, spec):
        raise RuntimeError("report failed")

    unwatch = watch_compiles(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="scaleserve.server"):
            _compiled(True)  # no exception reaches Triton's launch
    finally:
        unwatch()
    assert earlier_hook == ["_probe_kernel_fn"]
    assert "compile watch failed" in caplog.text


def _compiles_metric(server) -> float:
    with server.client() as c:
        text = c.get("/metrics").text
    line = [ln for ln in text.splitlines()
            if ln.startswith('scaleserve_kernel_compiles_after_ready_total{kernel="_probe_kernel_fn"}')]
    return float(line[0].split()[-1]) if line else 0.0


def test_server_counts_compiles_after_ready(start_server, caplog):
    server = start_server()
    deadline = time.monotonic() + 60
    while not server.state.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.state.ready
    before = _compiles_metric(server)
    with caplog.at_level(logging.WARNING, logger="scaleserve.server"):
        _compiled(False)
    assert _compiles_metric(server) == before + 1
    assert "kernel _probe_kernel_fn compiled while serving" in caplog.text
