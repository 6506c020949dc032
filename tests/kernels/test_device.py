"""kernels/device.py: the device facts and the autotuners' timing."""

import pytest
import torch

from scaleserve.kernels import device

CUDA = torch.cuda.is_available()


def test_cpu_is_a_small_notional_machine():
    cpu = torch.device("cpu")
    assert device.num_sms(cpu) == device.INTERPRETER_SMS and device.capability_major(cpu) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_busy_bench_times_the_call_not_the_host():
    """A call that keeps the GPU busy a known while (~0.5 ms): busy_bench agrees with do_bench on it, its
    quantiles come in order, and a call that also spends host time before launching is not charged for it."""
    import time

    import triton.testing

    def gpu_only():
        torch.cuda._sleep(1_000_000)

    def slow_host():
        time.sleep(2e-3)  # longer than the L2 clear before it: under do_bench this lands in the timed interval
        torch.cuda._sleep(1_000_000)

    reference = triton.testing.do_bench(gpu_only, warmup=5, rep=50)
    median = device.busy_bench(gpu_only)
    assert 0.8 < median / reference < 1.25
    lo, mid, hi = device.busy_bench(gpu_only, (0.2, 0.5, 0.8))
    assert lo <= mid <= hi
    assert device.busy_bench(slow_host, busy_cycles=8_000_000) < 1.25 * reference
