"""kernels.host_copy: pinned host memory <-> device by kernels. Under the interpreter the "host" side is a plain CPU
tensor; on a GPU it is pinned memory, read and written inside a CUDA graph replayed on fresh host values."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from scaleserve.kernels.host_copy import HEADER_WORDS, fetch_words, send_home  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
POISON = -0x5A5A5A5A


def host_words(payload: torch.Tensor, first: int) -> torch.Tensor:
    src = torch.empty(HEADER_WORDS + payload.numel(), dtype=torch.int32, pin_memory=DEV == "cuda")
    src[:HEADER_WORDS] = torch.tensor([first, 7, 7, 7], dtype=torch.int32)  # (the rest of the header: ignored)
    src[HEADER_WORDS:] = payload
    return src


@pytest.mark.parametrize("n", [1, 5, 283, 1024, 2500])  # one program, several, a partial last one
@pytest.mark.parametrize("first", ["all", "some", "none"])
def test_fetch_words_copies_from_the_headers_first_word_on(n, first):
    g = torch.Generator().manual_seed(n)
    payload = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=g)
    start = {"all": 0, "some": min(n - 1, 3 + n // 3), "none": n}[first]
    dst = torch.full((n,), POISON, dtype=torch.int32, device=DEV)
    fetch_words(host_words(payload, start), dst)
    want = torch.cat([torch.full((start,), POISON, dtype=torch.int32), payload[start:]])
    assert torch.equal(dst.cpu(), want)


@pytest.mark.parametrize("n,dtype", [(1, torch.int64), (3, torch.int64), (64, torch.int64), (1500, torch.int32)])
def test_send_home_copies_every_element(n, dtype):
    src = torch.randint(-2**31, 2**31 - 1, (n,), dtype=dtype, device=DEV)
    dst = torch.full((n,), POISON, dtype=dtype, pin_memory=DEV == "cuda")
    send_home(src, dst)
    if DEV == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst, src.cpu())


def test_bad_buffers_are_refused_with_what_was_given():
    dst = torch.zeros(8, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=r"int32 \[4 \+ n\] into int32 \[n\], got torch.int32 \[8\]"):
        fetch_words(torch.zeros(8, dtype=torch.int32), dst)
    with pytest.raises(ValueError, match="got torch.int64"):
        fetch_words(torch.zeros(12, dtype=torch.int64), dst)
    with pytest.raises(ValueError, match=r"torch.int64 \[4\] into torch.int32 \[4\]"):
        send_home(torch.zeros(4, dtype=torch.int64, device=DEV), torch.zeros(4, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_graph_reads_and_writes_pinned_memory_fresh_every_replay():
    """A captured graph fetches its input from pinned memory, computes, and leaves its result in pinned memory; the
    host changes the input between replays (new values and a new first word) and reads each result after an event:
    every replay sees the host's latest values, none a cached line of an earlier one."""
    n = 300
    src = host_words(torch.zeros(n, dtype=torch.int32), 0)
    dev = torch.full((n,), POISON, dtype=torch.int32, device="cuda")
    home = torch.zeros(n, dtype=torch.int64, pin_memory=True)
    out = torch.empty(n, dtype=torch.int64, device="cuda")

    def step():
        fetch_words(src, dev)
        torch.mul(dev, 3, out=out)  # (int32 * 3 -> int64 out)
        send_home(out, home)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    done = torch.cuda.Event()
    expect = torch.zeros(n, dtype=torch.int64)  # (the warm-up step fetched the zeros)
    for r in range(6):
        payload = torch.randint(-2**20, 2**20, (n,), dtype=torch.int32)
        first = [0, 17, n][r % 3]
        src[0] = first
        src[HEADER_WORDS:] = payload
        g.replay()
        done.record()
        done.synchronize()
        expect[first:] = payload[first:].long() * 3
        assert torch.equal(home, expect), r
