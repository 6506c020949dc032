"""Programmatic dependent launch (PDL, Hopper and newer): a kernel starts while the one before it in
the stream is finishing, instead of after it has drained.

A decode step is a chain of ~10 kernels per layer, each a few µs to ~25 µs long. With PDL a kernel's
programs get onto the SMs while its predecessor's last programs still run, and do the work that does
not depend on it (address arithmetic, pulling the first weight tiles into L2) before they wait for it.
Measured on an H100 (7B decode graph, batch 1): 0.3-2 % faster. A CUDA graph already leaves almost no
gap between kernels, and most of a small kernel's time is its own chain of dependent loads
(bench/NOTES-kernels.md, session 6).

The contract every kernel launched with `launch_kwargs(...)` keeps (PDL constexpr):
  - before `wait_for_producer(PDL)` it reads only data no kernel of the step writes (base weights);
  - `wait_for_producer` returns once the previous kernel has completed and its writes are visible;
    only then does the kernel read activations / slot indices / KV, or write anything;
  - it then lets the next kernel launch (so at most two kernels of the chain are resident, and the
    next one's own wait still orders it after this one's writes).
Kernels launched without it (torch, cuBLAS) keep the ordinary full serialization on both sides, and
the instructions are no-ops in a kernel launched the ordinary way. CUDA graphs record the launches
as programmatic edges.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .device import capability_major

_enabled = {"on": True}


def set_pdl(enabled: bool) -> None:
    """Turn PDL launches on or off for every kernel of this package (benchmarks compare the two)."""
    _enabled["on"] = bool(enabled)


def pdl_enabled() -> bool:
    return _enabled["on"]


def launch_kwargs(t: torch.Tensor) -> dict:
    """Extra launch arguments for a kernel whose data lives with t: {'PDL': True, 'launch_pdl': True}
    on a CUDA device of compute capability >= 9 while enabled, else {'PDL': False}."""
    if _enabled["on"] and capability_major(t.device) >= 9:
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Block until the previous kernel's writes are visible, then let the next kernel launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, ok):
    """Pull the 128-byte lines at ptrs (where ok) into L2 without waiting: a kernel's first weight
    tiles, requested before it waits for its predecessor."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
