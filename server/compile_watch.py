"""Kernel compiles while serving: each one stalls every running stream.

The engine's warm-up compiles and tunes every kernel shape it knows serving can meet (Engine.warm_up). A
Triton kernel that still compiles after that (a new specialization: an integer argument divisible by 16 for
the first time, a dtype, an autotune key) holds the engine thread for the compile, seconds on a cold cache,
and every stream waits. Seen on the H100 (session 19): one 64-stream pass over 64 adapters stalled ~1.4 s at
once for all its requests, where the same pass before it did not.

watch_compiles() chains a callback onto Triton's jit_post_compile_hook (called after each compile of a
JITFunction, from its disk cache or not); main.py installs it once the server is ready, so what it reports
is exactly what warm-up missed: a log line naming the kernel and its specialization, and a counter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("scaleserve.server")


_watchers: list[Callable[[str, str], None]] = []  # every app's callback (tests run several apps in one process)
_earlier_hook = None  # the hook installed before the first watch, restored after the last


def _hook(*args, **kwargs):
    fn, spec = kwargs.get("fn"), kwargs.get("repr", "")
    for on_compile in list(_watchers):
        try:
            on_compile(getattr(fn, "name", None) or str(fn), spec)
        except Exception:  # a report must never break the launch it reports
            log.exception("compile watch failed")
    return _earlier_hook(*args, **kwargs) if _earlier_hook is not None else None


def watch_compiles(on_compile: Callable[[str, str], None]) -> Callable[[], None]:
    """Call on_compile(kernel name, specialization) after every Triton JIT compile from now on. Returns the
    function that removes the watch; when the last one goes, whatever hook was installed before is back.
    Without Triton, a no-op."""
    try:
        from triton import knobs
    except ImportError:  # (the CPU reference path needs no Triton)
        return lambda: None
    global _earlier_hook
    runtime = knobs.runtime
    if runtime.jit_post_compile_hook is not _hook:  # (first watch, or someone replaced the hook since)
        _earlier_hook = runtime.jit_post_compile_hook
        runtime.jit_post_compile_hook = _hook
    _watchers.append(on_compile)

    def unwatch() -> None:
        if on_compile in _watchers:
            _watchers.remove(on_compile)
            if not _watchers and runtime.jit_post_compile_hook is _hook:
                runtime.jit_post_compile_hook = _earlier_hook

    return unwatch
