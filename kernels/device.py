"""The device facts the launchers size grids by."""

from __future__ import annotations

import torch

_SM_COUNT: dict[int, int] = {}
INTERPRETER_SMS = 4  # CPU tensors (TRITON_INTERPRET=1): a small notional machine, so tests see several programs


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); INTERPRETER_SMS for the CPU."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
