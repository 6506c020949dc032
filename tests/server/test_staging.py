"""The engine's pinned staging ring (server/staging.py): buffers handed out in turn, grown on demand, and
uploads equal to their arrays. Feeding the CPU, the buffers are not pinned and no events are recorded; the GPU engine
tests run it for real (test_engine.py -m gpu: graph steps equal eager ones)."""

import numpy as np
import pytest
import torch

from scaleserve.server.staging import HostStaging


def test_buffers_come_in_turn_and_grow():
    ring = HostStaging("cpu", depth=3, nbytes=64)
    first = [ring.buffer(16) for _ in range(3)]
    ptrs = [b.data_ptr() for b in first]
    assert len(set(ptrs)) == 3 and all(b.shape == (16,) and b.dtype == torch.uint8 for b in first)
    assert ring.buffer(64).data_ptr() == ptrs[0]  # the ring came round: the first buffer again
    big = ring.buffer(100)  # too small for 100 bytes: replaced by a 128-byte one
    assert big.shape == (100,) and ring.bufs[1].numel() == 128
    ring.buffer(1), ring.buffer(1)
    assert ring.buffer(100).data_ptr() == big.data_ptr()  # the grown buffer is kept


@pytest.mark.parametrize("dtype, shape", [(np.int64, (37,)), (np.int32, (5, 7)), (np.uint8, (1000,)),
                                          (np.float32, (3, 1, 9)), (np.int64, (0,))])
def test_upload_equals_the_array_and_survives_the_ring_turning(dtype, shape):
    rng = np.random.default_rng(0)
    ring = HostStaging("cpu", depth=2, nbytes=8)
    arrs = [(rng.standard_normal(shape) * 1000).astype(dtype) for _ in range(5)]
    outs = [ring.upload(a) for a in arrs]  # each buffer is rewritten twice after its upload
    for a, out in zip(arrs, outs):
        assert out.shape == a.shape and out.numpy().dtype == a.dtype
        assert np.array_equal(out.numpy(), a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_buffer_waits_for_its_copy_before_it_is_rewritten():
    """With the stream held up by a long kernel, every copy is still queued when the ring comes round: each
    buffer must wait for its last copy before it is rewritten, or the earlier uploads would read later data."""
    rng = np.random.default_rng(1)
    ring = HostStaging("cuda", depth=2)
    assert ring.pinned and ring.bufs[0].is_pinned()
    arrs = [rng.integers(-(2**40), 2**40, size=4099) for _ in range(12)]
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the copies
    outs = [ring.upload(a) for a in arrs]
    for a, out in zip(arrs, outs):
        assert out.is_cuda and np.array_equal(out.cpu().numpy(), a)
