"""kernels.pdl: programmatic dependent launch. The launch arguments it hands out, and on a Hopper GPU a
chain of dependent kernels (norm -> int4 matmul -> SiLU-gate -> int4 matmul -> norm, the decode
step's pattern) captured in a CUDA graph: with PDL each kernel starts before its producer has
finished, so a read that slipped ahead of `griddepcontrol.wait` would see stale or poisoned data.
The chain must give the same bits with PDL as without, on fresh inputs every replay."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from scaleserve.kernels.pdl import launch_kwargs, pdl_enabled, set_pdl  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture
def pdl_restored():
    was = pdl_enabled()
    yield
    set_pdl(was)


def test_cpu_tensors_never_get_pdl(pdl_restored):
    set_pdl(True)
    assert launch_kwargs(torch.zeros(1)) == {"PDL": False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_launch_kwargs_follow_the_switch_and_the_device(pdl_restored):
    x = torch.zeros(1, device="cuda")
    set_pdl(True)
    assert launch_kwargs(x) == ({"PDL": True, "launch_pdl": True} if HOPPER else {"PDL": False})
    set_pdl(False)
    assert launch_kwargs(x) == {"PDL": False}


def _chain(M: int, D: int, I: int, gs: int, gen: torch.Generator):
    """Static buffers and a function running the chain on them (every kernel reads its producer's output)."""
    from scaleserve.kernels.fused import add_rms_norm, silu_mul
    from scaleserve.kernels.int4_matmul import int4_matmul, repack

    def weights(K, N):
        packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen).cuda()
        G = K // gs
        zeros = torch.randint(0, 16, (N, G), generator=gen).float().cuda()
        scales = ((torch.rand(N, G, generator=gen) + 0.5) / (K ** 0.5 * 4)).cuda()
        return repack(packed, K, zeros, scales, gs, 4)

    up, down = weights(D, 2 * I), weights(I, D)
    norm_w = (torch.rand(D, generator=gen) + 0.5).bfloat16().cuda()
    S = 3  # slots: base + 2 adapters, rows spread over all three
    tables = {}
    for name, N, K in (("up", 2 * I, D), ("down", D, I)):
        chan = (torch.rand(S, N, generator=gen) + 0.5).half().cuda()
        sc = (torch.rand(S, N, K // gs, generator=gen) + 0.5).half().cuda()
        tables[name] = (chan, sc.transpose(1, 2).contiguous().transpose(1, 2))
    slot = (torch.arange(M) % S).int().cuda()
    zero = torch.zeros(M, dtype=torch.int32, device="cuda")
    minus = torch.full((M,), -1, dtype=torch.int32, device="cuda")
    h = torch.empty(M, D, dtype=torch.bfloat16, device="cuda")
    delta = torch.empty_like(h)

    def run():
        x, res = add_rms_norm(h, delta, norm_w, 1e-5)
        c, s = tables["up"]
        gu = int4_matmul(x, up, c, s, None, None, zero, slot, minus, 2)
        a = silu_mul(gu)
        c, s = tables["down"]
        y = int4_matmul(a, down, c, s, None, None, zero, slot, minus, 2)
        out, _ = add_rms_norm(res, y, norm_w, 1e-5)
        return out

    return h, delta, run


def _graph(run):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles / autotunes outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    return g, out


@pytest.mark.skipif(not HOPPER, reason="needs a GPU with programmatic dependent launch (sm_90+)")
@pytest.mark.parametrize("M", [1, 4])
def test_dependent_chain_same_bits_with_and_without_pdl(M, pdl_restored):
    gen = torch.Generator().manual_seed(1000 + M)
    h, delta, run = _chain(M, D=2048, I=2816, gs=128, gen=gen)
    set_pdl(False)
    g_off, out_off = _graph(run)
    set_pdl(True)
    g_on, out_on = _graph(run)
    for _ in range(5):
        h.copy_(torch.randn(M, 2048, generator=gen).bfloat16())
        delta.copy_(torch.randn(M, 2048, generator=gen).bfloat16())
        out_off.fill_(float("nan"))
        out_on.fill_(float("nan"))
        g_off.replay()
        want = out_off.clone()
        g_on.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(want).all()
        assert torch.equal(out_on, want)
        set_pdl(False)
        assert torch.equal(run(), want)  # eager, no PDL: the graphs replay what the kernels compute
        set_pdl(True)
