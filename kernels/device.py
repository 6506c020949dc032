"""The device facts the launchers size grids by and choose launch options with (cached per device), and
how the kernels' autotuners time a config."""

from __future__ import annotations

import torch
import triton.testing

_SM_COUNT: dict[int, int] = {}
_CC_MAJOR: dict[int, int] = {}
INTERPRETER_SMS = 4  # CPU tensors (TRITON_INTERPRET=1): a small notional machine, so tests see several programs


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; INTERPRETER_SMS for the CPU."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    idx = _index(device)
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def capability_major(device: torch.device) -> int:
    """Major compute capability of a CUDA device (9 = Hopper); 0 for the CPU."""
    if device.type != "cuda":
        return 0
    idx = _index(device)
    if idx not in _CC_MAJOR:
        _CC_MAJOR[idx] = torch.cuda.get_device_capability(idx)[0]
    return _CC_MAJOR[idx]


def quick_bench(kernel_call, quantiles):
    """The autotuners' timing: shorter runs than triton's default (25 ms warm-up, 100 ms), because a model
    has ~40 keys to tune; triton.testing.do_bench clears L2 between runs, so the weights are cold."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
