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


# The per-row adapter slots (chan_idx, scale_idx, alpha_idx [M]) reach the kernels as views into one packed
# upload (server/engine.py), 16-byte aligned or not depending on the step's token count; Triton compiles a
# kernel once per pointer alignment it meets, so an alignment first met mid-serving (a step of an odd number of
# tokens, say) would be a compile that stalls every stream. The kernels do not specialize on these pointers:
# their loads are a few words a program, so the lost vector width costs nothing measurable.
ROW_INDEX_ARGS = ["chan_idx_ptr", "scale_idx_ptr"]  # (+ "alpha_idx_ptr" where a kernel takes it)


# How the autotuners time a config: "do_bench" (triton.testing.do_bench, short runs) or "busy" (busy_bench).
# bench/kernels.py --timing-check compares both with graph replay; bench/decode_profile.py --autotune-timing
# switches it for a run.
AUTOTUNE_TIMING = "do_bench"


def quick_bench(kernel_call, quantiles):
    """The autotuners' timing, ms (at the quantiles): AUTOTUNE_TIMING's method. Shorter runs than triton's default
    (25 ms warm-up, 100 ms), because a model has ~40 keys to tune; both clear L2 before each call, so the
    weights are cold as in a decode step."""
    if AUTOTUNE_TIMING == "busy":
        return busy_bench(kernel_call, quantiles)
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def busy_bench(kernel_call, quantiles=None, reps: int = 60, busy_cycles: int = 200_000):
    """ms of kernel_call timed as triton.testing.do_bench does (L2 cleared before each call, CUDA events
    around it), but with the GPU kept busy (~100 µs) between the clear and the start event. do_bench's start
    event fires as soon as the clear ends, so the host's launch of the call, which takes longer than a
    10 µs GEMV runs, lands inside the timed interval; here the call is queued before the event fires.
    -> the median, or a list at the quantiles."""
    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    kernel_call()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        driver.clear_cache(cache)
        torch.cuda._sleep(busy_cycles)
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)])
    if quantiles is None:
        return times.median().item()
    return torch.quantile(times, torch.tensor(quantiles, dtype=times.dtype)).tolist()
