"""paged_attention / write_kv (kernels.attention) against paged_attention_ref.

On CPU the Triton kernels run under TRITON_INTERPRET=1 with small shapes; with CUDA the same cases
run natively, plus real model shapes and a CUDA-graph capture of decode.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from scaleserve.kernels import attention as attention_module  # noqa: E402
from scaleserve.kernels.attention import paged_attention, write_kv  # noqa: E402
from scaleserve.kernels.reference import paged_attention_ref, rope_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=3e-3, rtol=3e-3)}
_seed = [1234]


def _gen() -> torch.Generator:
    """A fresh generator per case: inputs differ between cases, runs are reproducible."""
    _seed[0] += 1
    return torch.Generator().manual_seed(_seed[0])


def make_case(specs, H, KVH, D, block_size, dtype, spare_blocks=3, device=DEVICE):
    """specs: [(context_len, n_queries)] per sequence. Blocks are handed out in a shuffled order;
    free blocks, the unused tail of each last block and unused table entries hold NaN / junk so a
    kernel that reads outside a sequence's context shows it."""
    g = _gen()
    B = len(specs)
    nblk = [(n + block_size - 1) // block_size for n, _ in specs]
    max_blocks = max(max(nblk) + 1, 1)
    num_blocks = sum(nblk) + spare_blocks
    k_cache = torch.full((num_blocks, block_size, KVH, D), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((B, max_blocks), num_blocks - 1, dtype=torch.int32)  # junk entries
    used = 0
    for b, (n, _) in enumerate(specs):
        blocks = perm[used:used + nblk[b]]
        used += nblk[b]
        block_tables[b, : nblk[b]] = blocks.int()
        if n:
            flat_k = torch.randn(n, KVH, D, generator=g).to(dtype)
            flat_v = torch.randn(n, KVH, D, generator=g).to(dtype)
            for j in range(n):
                k_cache[blocks[j // block_size], j % block_size] = flat_k[j]
                v_cache[blocks[j // block_size], j % block_size] = flat_v[j]
    lens = [L for _, L in specs]
    query_start = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(query_start[-1])
    q = torch.randn(T, H, D, generator=g).to(dtype)
    seq_lens = torch.tensor([n for n, _ in specs], dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return (to(q), to(k_cache), to(v_cache), to(block_tables), to(seq_lens), to(query_start),
            max(lens) if lens else 0)


def check(specs, H, KVH, D, block_size, dtype, num_splits=None, use_out=True):
    q, kc, vc, bt, sl, qs, max_q = make_case(specs, H, KVH, D, block_size, dtype)
    scale = D ** -0.5
    ref = paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), qs.cpu(), scale)
    out = torch.full_like(q, float("nan")) if use_out else None
    o = paged_attention(q, kc, vc, bt, sl, qs, scale, max_q, out=out, num_splits=num_splits)
    if use_out:
        assert o.data_ptr() == out.data_ptr()
    assert o.shape == q.shape and o.dtype == q.dtype
    assert not o.isnan().any(), "unwritten or NaN output rows"
    torch.testing.assert_close(o.float().cpu(), ref.float(), **TOL[dtype])


BS = 16
DECODE_LENS = [1, BS - 1, BS, 3 * BS + 5, 2 * BS + 1, 12 * BS + 8]  # 1, block-1, block, blocks, odd, long


@pytest.mark.parametrize("D,H,KVH,dtype", [
    (8, 4, 4, torch.bfloat16),  # GQA ratio 1
    (8, 4, 2, torch.float16),  # 2
    (64, 4, 1, torch.bfloat16),  # 4
    (64, 2, 2, torch.float16),
])
# the splits divide each sequence's own context: 4 keeps every split of the long one busy; 16 leaves
# splits past a short context (and some of the long one's) empty
@pytest.mark.parametrize("num_splits", [None, 4, 16])
def test_decode(D, H, KVH, dtype, num_splits):
    check([(n, 1) for n in DECODE_LENS], H, KVH, D, BS, dtype, num_splits=num_splits)


@pytest.mark.parametrize("block_size", [8, 32])
def test_decode_block_sizes(block_size):
    specs = [(n, 1) for n in (1, block_size - 1, block_size + 1, 3 * block_size + 3)]
    check(specs, 4, 2, 8, block_size, torch.bfloat16, num_splits=2)


def test_decode_padding_and_empty_context():
    """Padding slots of a graph batch: no query (nothing written) or an empty context (zeros)."""
    q, kc, vc, bt, sl, qs, _ = make_case([(9, 1), (0, 1), (5, 1)], 4, 2, 8, BS, torch.bfloat16)
    # make sequence 1 a no-query slot: q rows are [seq0, seq2]
    qs2 = torch.tensor([0, 1, 1, 2], dtype=torch.int32, device=q.device)
    q2 = q[[0, 2]].contiguous()
    sl2 = sl.clone()
    sl2[1] = 7  # context without a query: must be ignored
    for splits in (None, 2):
        out = torch.full_like(q2, float("nan"))
        paged_attention(q2, kc, vc, bt, sl2, qs2, 0.3, 1, out=out, num_splits=splits)
        ref = paged_attention_ref(q2.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl2.cpu(), qs2.cpu(), 0.3)
        torch.testing.assert_close(out.float().cpu(), ref.float(), **TOL[torch.bfloat16])
        # empty context with one query: zeros, as the reference gives
        o = paged_attention(q, kc, vc, bt, sl, qs, 0.3, 1, out=torch.full_like(q, float("nan")),
                            num_splits=splits)
        assert (o[1] == 0).all()
        ref = paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), qs.cpu(), 0.3)
        torch.testing.assert_close(o.float().cpu(), ref.float(), **TOL[torch.bfloat16])


def rope_rows(positions: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [T, D] float32 at the positions, HF Llama's rotate-half tables (theta 10000)."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


def check_rope_kv(specs, H, KVH, D, dtype, num_splits):
    """Decode with rope_kv: each query's own key is not in the cache (NaN there) but given un-rotated in k_new,
    with v_new; the kernel must rotate q and k_new, write both rows at the sequence's slot and attend to them.
    A spec (0, 1) is a graph batch's padding row: no context, slot -1 (writes nothing, attends to nothing)."""
    q, kc, vc, bt, sl, qs, _ = make_case(specs, H, KVH, D, BS, dtype)
    g = _gen()
    T = q.shape[0]
    k_new = torch.randn(T, KVH, D, generator=g).to(dtype).to(q.device)
    v_new = torch.randn(T, KVH, D, generator=g).to(dtype).to(q.device)
    slots = torch.full((T,), -1, dtype=torch.int64)
    for b, (n, _) in enumerate(specs):
        if n:
            slots[b] = int(bt[b, (n - 1) // BS]) * BS + (n - 1) % BS
    slots = slots.to(q.device)
    keep = slots >= 0
    for c in (kc, vc):  # the new token's cache rows: poisoned, so a kernel reading them before writing shows it
        c.view(-1, KVH, D)[slots[keep]] = float("nan")
    cos, sin = (t.to(q.device) for t in rope_rows((sl.long() - 1).clamp(min=0).cpu(), D))
    # the reference: rotate, write the new rows, attend
    kc_ref, vc_ref = kc.cpu().clone(), vc.cpu().clone()
    c3, s3 = cos.cpu()[:, None], sin.cpu()[:, None]
    kc_ref.view(-1, KVH, D)[slots.cpu()[keep.cpu()]] = rope_ref(k_new.cpu(), c3, s3)[keep.cpu()]
    vc_ref.view(-1, KVH, D)[slots.cpu()[keep.cpu()]] = v_new.cpu()[keep.cpu()]
    ref = paged_attention_ref(rope_ref(q.cpu(), c3, s3), kc_ref, vc_ref, bt.cpu(), sl.cpu(), qs.cpu(), D ** -0.5)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, kc, vc, bt, sl, qs, D ** -0.5, 1, out=out, num_splits=num_splits,
                    rope_kv=(k_new, v_new, cos, sin, slots))
    assert not out.isnan().any(), "unwritten or NaN output rows"
    torch.testing.assert_close(out.float().cpu(), ref.float(), **TOL[dtype])
    # the written rows: v exactly, k rotated (one rounding apart at most: the interpreter converts fp32 -> bf16
    # by truncation); every other cache element, NaN poison included, unchanged
    flat_k, flat_kr = kc.cpu().view(-1, KVH, D), kc_ref.view(-1, KVH, D)
    written = slots.cpu()[keep.cpu()]
    torch.testing.assert_close(flat_k[written].float(), flat_kr[written].float(), **TOL[dtype])
    flat_k[written] = flat_kr[written]
    torch.testing.assert_close(flat_k, flat_kr, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(vc.cpu(), vc_ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("D,H,KVH,dtype", [
    (8, 4, 2, torch.bfloat16),  # GQA 2
    (24, 3, 3, torch.float16),  # head dim below its block (32): the rotation's partner wraps at 24, not 32
    (64, 4, 1, torch.bfloat16),  # GQA 4
])
# one split (the new key is the only split's last), several (it is the last non-empty split's), more than a
# short context has tiles (splits past it are empty)
@pytest.mark.parametrize("num_splits", [1, 3, 16])
# early: the first KV tile loaded before the PDL wait (peeled from the loop; empty splits load a tile and discard it)
@pytest.mark.parametrize("early", [False, True])
def test_decode_rope_kv(D, H, KVH, dtype, num_splits, early, monkeypatch):
    monkeypatch.setattr(attention_module, "DECODE_EARLY_KV", early)
    check_rope_kv([(n, 1) for n in DECODE_LENS] + [(0, 1)], H, KVH, D, dtype, num_splits)


def test_decode_rope_kv_reference_path(monkeypatch):
    """CPU tensors outside the interpreter take the torch reference: the same meaning."""
    monkeypatch.setattr(attention_module, "_interpreting", lambda: False)
    if CUDA:
        pytest.skip("the reference path is for CPU tensors")
    check_rope_kv([(n, 1) for n in (1, BS + 3, 3 * BS)] + [(0, 1)], 4, 2, 8, torch.bfloat16, None)


def test_decode_rope_kv_rejects():
    q, kc, vc, bt, sl, qs, _ = make_case([(5, 1), (9, 1)], 4, 2, 8, BS, torch.bfloat16)
    kn = torch.randn(2, 2, 8, dtype=torch.bfloat16, device=q.device)
    cos = torch.randn(2, 8, device=q.device)
    slots = torch.zeros(2, dtype=torch.int64, device=q.device)
    with pytest.raises(ValueError, match="decode steps"):
        paged_attention(q, kc, vc, bt, sl, qs, 1.0, 2, rope_kv=(kn, kn, cos, cos, slots))
    with pytest.raises(ValueError, match="k_new"):
        paged_attention(q, kc, vc, bt, sl, qs, 1.0, 1, rope_kv=(kn[:, :1], kn, cos, cos, slots))
    with pytest.raises(ValueError, match="float32"):
        paged_attention(q, kc, vc, bt, sl, qs, 1.0, 1, rope_kv=(kn, kn, cos.half(), cos.half(), slots))


PREFILL_SPECS = [
    (1, 1),  # a one-token prompt
    (BS - 1, BS - 1),  # full prompts of odd and block lengths
    (BS, BS),
    (2 * BS + 5, 2 * BS + 5),
    (3 * BS + 3, 7),  # chunked prefill: 7 new tokens after 44 cached ones
    (BS + 2, 1),  # a decode row inside a mixed batch
    (20, 0),  # a sequence with no queries this step
    (0, 0),  # an empty sequence slot of a prefill graph (no context, no queries)
    (150, 40),  # long chunk: mask-free key tiles before the diagonal ones
    (130, 130),
    (0, 0),
]


@pytest.mark.parametrize("D,H,KVH,dtype", [
    (8, 4, 4, torch.bfloat16),
    (8, 4, 2, torch.float16),
    (64, 4, 1, torch.bfloat16),
    (64, 2, 2, torch.float16),
])
def test_prefill(D, H, KVH, dtype):
    check(PREFILL_SPECS, H, KVH, D, BS, dtype)


@pytest.mark.parametrize("max_query_len", [None, 1])
def test_random_batches(max_query_len):
    """Random mixes of lengths, GQA ratios (up to 8), head dims and block sizes."""
    g = _gen()
    for _ in range(4):
        rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
        KVH, ratio = rint(1, 2), [1, 2, 4, 8][rint(0, 3)]
        D, bs, B = [8, 16, 64][rint(0, 2)], [4, 16, 32][rint(0, 2)], rint(1, 5)
        ctx = [rint(1, 90) for _ in range(B)]
        specs = [(n, 1 if max_query_len == 1 else rint(0, n)) for n in ctx]
        dtype = [torch.bfloat16, torch.float16][rint(0, 1)]
        check(specs, KVH * ratio, KVH, D, bs, dtype, num_splits=rint(1, 3) if max_query_len == 1 else None)


def test_strided_q():
    """q as a view into a fused qkv projection output (row stride > H * D)."""
    H, KVH, D = 4, 2, 8
    for specs in ([(n, 1) for n in (3, 40, 17)], [(30, 30), (50, 9), (2, 1)]):
        q, kc, vc, bt, sl, qs, max_q = make_case(specs, H, KVH, D, BS, torch.float16)
        qkv = torch.randn(q.shape[0], (H + 2 * KVH) * D, dtype=q.dtype, device=q.device)
        qkv[:, : H * D] = q.reshape(q.shape[0], -1)
        q_view = qkv[:, : H * D].view(-1, H, D)
        assert not q_view.is_contiguous()
        o = paged_attention(q_view, kc, vc, bt, sl, qs, 0.5, max_q)
        ref = paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), qs.cpu(), 0.5)
        torch.testing.assert_close(o.float().cpu(), ref.float(), **TOL[torch.float16])


@pytest.mark.parametrize("block_size", [8, 32])
def test_prefill_block_sizes(block_size):
    specs = [(block_size + 3, block_size + 3), (2 * block_size + 1, 5), (3, 3)]
    check(specs, 4, 2, 8, block_size, torch.bfloat16, use_out=False)


def test_rejects_bad_shapes():
    q, kc, vc, bt, sl, qs, mq = make_case([(5, 5)], 3, 2, 8, BS, torch.bfloat16)
    with pytest.raises(ValueError):
        paged_attention(q, kc, vc, bt, sl, qs, 1.0, mq)  # 3 heads over 2 KV heads


@pytest.mark.parametrize("use_triton", [False, True])
def test_write_kv(use_triton):
    g = _gen()
    num_blocks, bs, KVH, D, T = 6, 8, 2, 8, 9
    k_cache = torch.randn(num_blocks, bs, KVH, D, generator=g).to(torch.bfloat16).to(DEVICE)
    v_cache = torch.randn(num_blocks, bs, KVH, D, generator=g).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(T, KVH, D, generator=g).to(DEVICE)  # float32: cast to the cache dtype
    v = torch.randn(T, KVH, D, generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * bs, generator=g)[:T]
    slots[[2, 7]] = -1  # padded rows
    slots = slots.to(DEVICE)
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            exp_k[s // bs, s % bs] = k[t].to(torch.bfloat16)
            exp_v[s // bs, s % bs] = v[t].to(torch.bfloat16)
    write_kv(k_cache, v_cache, k, v, slots, use_triton=use_triton or None)
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)


# ------------------------------------------------------------------------------------------
# CUDA only: model shapes and graph capture
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D,H,KVH", [(64, 9, 3), (128, 32, 32), (128, 32, 8), (8, 8, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_model_shapes(D, H, KVH, dtype):
    decode = [(n, 1) for n in (1, 15, 16, 17, 200, 1023, 2500, 77)]
    check(decode, H, KVH, D, BS, dtype)
    check(decode, H, KVH, D, BS, dtype, num_splits=1)
    prefill = [(300, 300), (1, 1), (513, 64), (1200, 17), (40, 1), (33, 33)]
    check(prefill, H, KVH, D, BS, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_decode():
    """Capture decode once, then refill the batch's tensors in place and replay."""
    B, H, KVH, D, bs, max_blocks, dtype = 5, 16, 4, 64, 16, 70, torch.bfloat16
    num_blocks = B * max_blocks + 7
    q = torch.empty(B, H, D, dtype=dtype, device="cuda")
    kc = torch.empty(num_blocks, bs, KVH, D, dtype=dtype, device="cuda")
    vc = torch.empty_like(kc)
    bt = torch.empty(B, max_blocks, dtype=torch.int32, device="cuda")
    sl = torch.empty(B, dtype=torch.int32, device="cuda")
    qs = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    scale = D ** -0.5

    def refill(lens):
        g = _gen()
        for t in (q, kc, vc):
            t.copy_(torch.randn(t.shape, generator=g))
        bt.copy_(torch.randperm(num_blocks, generator=g)[: B * max_blocks].view(B, max_blocks))
        sl.copy_(torch.tensor(lens))
        out.fill_(float("nan"))

    refill([1] * B)
    paged_attention(q, kc, vc, bt, sl, qs, scale, 1, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(q, kc, vc, bt, sl, qs, scale, 1, out=out)
    for lens in ([5, 300, 64, 1000, 17], [bs * max_blocks, 1, 2, 16, 333]):
        refill(lens)
        graph.replay()
        ref = paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), qs.cpu(), scale)
        torch.testing.assert_close(out.float().cpu(), ref.float(), **TOL[dtype])
