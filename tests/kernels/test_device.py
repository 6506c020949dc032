"""kernels/device.py: the device facts, the autotuners' timing, the arguments kept out of specialization."""

import inspect

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


def _cuda_specialization(kernel, args: dict) -> list:
    """What Triton's launch would key this kernel's compile on for sm_90 (its binder, run on the CPU: no device).
    kernel: the module's kernel as built here (a JITFunction, or under TRITON_INTERPRET an InterpretedFunction
    that keeps the function and the jit options)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    binder = create_function_from_signature(jit.signature, jit.params, CUDABackend(GPUTarget("cuda", 90, 32)))
    return binder(**args)[1]


def _kernels_taking_row_slots():
    from scaleserve.kernels import int4_gemm, int4_matmul, int4_mma_batch, int4_mma_gemv

    return {"fold GEMM": int4_gemm._int4_gemm_kernel, "tile": int4_matmul._adapted_int4_kernel,
            "GEMV": int4_matmul._gemv_int4_kernel, "MMA batch": int4_mma_batch._mma_batch_kernel,
            "MMA GEMV": int4_mma_gemv._mma_gemv_kernel}


@pytest.mark.parametrize("name", list(_kernels_taking_row_slots()))
def test_row_slot_alignment_never_compiles_another_kernel(name):
    """The rows' adapter slots arrive as views of a step's packed upload, 16-byte aligned or not with its token
    count (a 1,207-token step: scale_idx at byte 4,828). Launching with misaligned slot vectors must key the same
    compile as aligned ones, or a step of a new token count compiles mid-serving and every stream waits."""
    kernel = _kernels_taking_row_slots()[name]
    names = list(inspect.signature(kernel.fn).parameters)  # (a JITFunction and an InterpretedFunction keep .fn)
    slots = [n for n in names if n in device.ROW_INDEX_ARGS + ["alpha_idx_ptr"]]
    assert {"chan_idx_ptr", "scale_idx_ptr"} <= set(slots), names
    buf = torch.zeros(64, dtype=torch.int32)
    other = torch.zeros(64, dtype=torch.float32)  # every other pointer: aligned in both launches

    def args(offset: int) -> dict:
        # ints 7 and floats 0.5 alike in both launches; constexprs 1 (their values key the compile the same way)
        out = {}
        for n in names:
            if n in slots:
                out[n] = buf[offset : offset + 8]
            elif n.endswith("_ptr"):
                out[n] = other
            elif n == "eps" or n.startswith("qk_"):
                out[n] = 0.5
            else:
                out[n] = 7
        return out

    aligned, misaligned = _cuda_specialization(kernel, args(0)), _cuda_specialization(kernel, args(1))
    assert aligned == misaligned
    # and the probe can see alignment at all: the same launch with a misaligned x does key another compile
    shifted = args(0)
    first_other = next(n for n in names if n.endswith("_ptr") and n not in slots)
    shifted[first_other] = other[1:]
    assert _cuda_specialization(kernel, shifted) != aligned
