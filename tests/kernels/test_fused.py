"""kernels.fused (residual add + RMSNorm, in-place RoPE on q/k, SiLU-gate) against kernels.reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 on small shapes; with CUDA the same cases run
natively, plus real model widths. Outputs are poisoned (NaN) before each run so unwritten elements show.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from scaleserve.kernels.fused import add_rms_norm, argmax_rows, embed_scaled, rope_qk_, silu_mul  # noqa: E402
from scaleserve.kernels.reference import add_rms_norm_ref, rope_ref, silu_mul_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# one rounding of the result in the activation dtype apart (the reference rounds some products twice)
TOL = {torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.float32: dict(atol=1e-5, rtol=1e-5)}
_seed = [4321]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel skips shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def _gen() -> torch.Generator:
    _seed[0] += 1
    return torch.Generator().manual_seed(_seed[0])


def randn(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, generator=_gen())).to(dtype).to(DEVICE)


def _rope_tables(T: int, hd: int, theta: float = 10000.0):
    pos = torch.randint(0, 4096, (T,), generator=_gen()).float()
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    return emb.cos().to(DEVICE)[:, None, :], emb.sin().to(DEVICE)[:, None, :]  # [T, 1, hd]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D", [(1, 64), (5, 576), (3, 100)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm(dtype, T, D, with_delta):
    x = randn(T, D, dtype=dtype, scale=3.0)
    delta = randn(T, D, dtype=dtype) if with_delta else None
    w = randn(D, dtype=dtype, scale=0.5) + 1
    y, h = add_rms_norm(x, delta, w, 1e-5)
    y_ref, h_ref = add_rms_norm_ref(x, delta, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    if CUDA or dtype != torch.bfloat16:
        assert torch.equal(h, h_ref)  # the residual stream: exactly torch's add in the activation dtype
    else:  # the interpreter converts fp32 -> bf16 by truncation, not round-to-nearest: one ulp apart
        torch.testing.assert_close(h.float(), h_ref.float(), atol=0, rtol=2 ** -7)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOL[dtype])


def test_add_rms_norm_keeps_leading_dims_and_inputs():
    x = randn(2, 3, 48, dtype=torch.bfloat16)
    delta = randn(2, 3, 48, dtype=torch.bfloat16)
    x0, d0 = x.clone(), delta.clone()
    y, h = add_rms_norm(x, delta, randn(48, dtype=torch.bfloat16), 1e-6)
    assert y.shape == h.shape == (2, 3, 48)
    assert torch.equal(x, x0) and torch.equal(delta, d0)  # inputs untouched
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, delta, randn(47, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="must match x"):
        add_rms_norm(x, delta.float(), randn(48, dtype=torch.bfloat16), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,KVH,hd", [(1, 4, 2, 16), (7, 9, 3, 64), (2, 3, 3, 10)])
def test_rope_qk_in_place(dtype, T, H, KVH, hd):
    qkv = randn(T, (H + 2 * KVH) * hd, dtype=dtype)
    cos, sin = _rope_tables(T, hd)
    q, k, v = qkv.split([H * hd, KVH * hd, KVH * hd], -1)
    want_q = rope_ref(q.unflatten(-1, (H, hd)), cos, sin)
    want_k = rope_ref(k.unflatten(-1, (KVH, hd)), cos, sin)
    v_before = v.clone()
    out = rope_qk_(qkv, cos, sin, H, KVH, hd)
    assert out.data_ptr() == qkv.data_ptr()
    q, k, v = qkv.split([H * hd, KVH * hd, KVH * hd], -1)
    torch.testing.assert_close(q.unflatten(-1, (H, hd)).float(), want_q.float(), **TOL[dtype])
    torch.testing.assert_close(k.unflatten(-1, (KVH, hd)).float(), want_k.float(), **TOL[dtype])
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,KVH,hd,bs", [(1, 4, 2, 16, 16), (7, 9, 3, 64, 4), (5, 3, 3, 10, 2)])
def test_rope_qk_writes_kv_cache(dtype, T, H, KVH, hd, bs):
    """With kv_cache, the same launch writes the rotated k and the v rows to their cache slots: rows with
    slot -1 (CUDA-graph padding) and every other slot stay as they were (NaN)."""
    qkv = randn(T, (H + 2 * KVH) * hd, dtype=dtype)
    cos, sin = _rope_tables(T, hd)
    q, k, v = qkv.split([H * hd, KVH * hd, KVH * hd], -1)
    want_q = rope_ref(q.unflatten(-1, (H, hd)), cos, sin)
    want_k = rope_ref(k.unflatten(-1, (KVH, hd)), cos, sin)
    want_v = v.unflatten(-1, (KVH, hd)).clone()
    blocks = T + 3
    kc = torch.full((blocks, bs, KVH, hd), float("nan"), dtype=dtype, device=DEVICE)
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(blocks * bs, generator=_gen())[:T]
    slots = perm.clone()
    if T > 1:
        slots[T // 2] = -1  # a padded row writes nothing
    slots = slots.to(DEVICE)
    rope_qk_(qkv, cos, sin, H, KVH, hd, kv_cache=(kc, vc, slots))
    torch.testing.assert_close(qkv[:, : H * hd].unflatten(-1, (H, hd)).float(), want_q.float(), **TOL[dtype])
    flat_k, flat_v = kc.view(-1, KVH, hd), vc.view(-1, KVH, hd)
    written = slots >= 0
    torch.testing.assert_close(flat_k[slots[written]].float(), want_k[written].float(), **TOL[dtype])
    assert torch.equal(flat_v[slots[written]], want_v[written])
    untouched = torch.ones(blocks * bs, dtype=torch.bool, device=DEVICE)
    untouched[slots[written]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


def test_rope_qk_checks_shapes():
    cos, sin = _rope_tables(2, 16)
    with pytest.raises(ValueError, match="qkv width"):
        rope_qk_(randn(2, 100, dtype=torch.float32), cos, sin, 4, 2, 16)
    kc = torch.zeros(4, 16, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        rope_qk_(randn(2, 128, dtype=torch.float32), cos, sin, 4, 2, 16,
                 kv_cache=(kc, kc, torch.zeros(3, dtype=torch.int64, device=DEVICE)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 352), (6, 1536), (3, 37)])
def test_silu_mul(dtype, T, I):
    gu = randn(T, 2 * I, dtype=dtype, scale=2.0)
    y = silu_mul(gu)
    assert y.shape == (T, I) and y.dtype == dtype
    torch.testing.assert_close(y.float(), silu_mul_ref(gu).float(), **TOL[dtype])
    with pytest.raises(ValueError, match="even"):
        silu_mul(gu[:, :-1])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D,I,H,KVH,hd", [(4096, 11008, 32, 32, 128), (576, 1536, 9, 3, 64)])
def test_real_widths_cuda(D, I, H, KVH, hd):
    dt = torch.bfloat16
    x, delta, w = randn(64, D, dtype=dt), randn(64, D, dtype=dt), randn(D, dtype=dt) + 1
    y, _ = add_rms_norm(x, delta, w, 1e-5)
    torch.testing.assert_close(y.float(), add_rms_norm_ref(x, delta, w, 1e-5)[0].float(), **TOL[dt])
    gu = randn(64, 2 * I, dtype=dt)
    torch.testing.assert_close(silu_mul(gu).float(), silu_mul_ref(gu).float(), **TOL[dt])
    qkv = randn(64, (H + 2 * KVH) * hd, dtype=dt)
    cos, sin = _rope_tables(64, hd)
    want = rope_ref(qkv[:, : H * hd].unflatten(-1, (H, hd)), cos, sin)
    rope_qk_(qkv, cos, sin, H, KVH, hd)
    torch.testing.assert_close(qkv[:, : H * hd].unflatten(-1, (H, hd)).float(), want.float(), **TOL[dt])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,V,D", [(1, 50, 64), (3, 7, 576), (2, 300, 100)])
@pytest.mark.parametrize("w_dtype", ["same", "float32"])
def test_embed_scaled_equals_the_embedding_and_its_product(dtype, T, V, D, w_dtype):
    """x = table[tokens] exactly; xg = x * w as torch computes it (w in the table's dtype first): bit for bit,
    repeated tokens and the last row included."""
    table = randn(V, D, dtype=dtype)
    w = randn(D, dtype=dtype if w_dtype == "same" else torch.float32, scale=2.0)
    tokens = torch.randint(0, V, (T,), generator=_gen())
    tokens[-1] = V - 1
    if T > 2:
        tokens[1] = tokens[0]
    tokens = tokens.to(DEVICE)
    x, xg = embed_scaled(tokens, table, w)
    want = table[tokens]
    assert x.dtype == xg.dtype == dtype and x.shape == (T, D)
    assert torch.equal(x, want)
    if CUDA or dtype != torch.bfloat16:
        assert torch.equal(xg, want * w.to(dtype))  # torch's product in the table's dtype
    else:  # the interpreter converts fp32 -> bf16 by truncation, not round-to-nearest (w's conversion too)
        def trunc(t):
            return (t.float().view(torch.int32) & -65536).view(torch.float32)

        assert torch.equal(xg, trunc(want.float() * trunc(w)).to(dtype))


@pytest.mark.parametrize("T,hd", [(1, 128), (3, 24)])
def test_embed_scaled_gathers_the_positions_rope_rows(T, hd):
    """With positions and a rope table [P, 2, hd]: their rows exactly, beside the same x and xg as without."""
    table, w = randn(40, 64, dtype=torch.bfloat16), randn(64, dtype=torch.bfloat16)
    rope = randn(300, 2, hd, dtype=torch.float32)
    tokens = torch.randint(0, 40, (T,), generator=_gen()).to(DEVICE)
    positions = torch.randint(0, 300, (T,), generator=_gen())
    positions[-1] = 299
    positions = positions.to(DEVICE)
    x, xg, rows = embed_scaled(tokens, table, w, positions, rope)
    assert rows.shape == (T, 2, hd) and torch.equal(rows, rope[positions])
    x0, xg0 = embed_scaled(tokens, table, w)
    assert torch.equal(x, x0) and torch.equal(xg, xg0)
    with pytest.raises(ValueError, match=r"got positions None for tokens \[%d\]" % T):
        embed_scaled(tokens, table, w, None, rope)


def test_embed_scaled_checks_shapes():
    table = randn(10, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight \[D\]; got tokens \[1\], table \[10, 8\], weight \[9\]"):
        embed_scaled(torch.zeros(1, dtype=torch.int64, device=DEVICE), table, randn(9, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"got tokens \[1, 1\]"):
        embed_scaled(torch.zeros(1, 1, dtype=torch.int64, device=DEVICE), table, randn(8, dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(1, 32000), (3, 50), (2, 4096), (4, 9000)])
def test_argmax_rows_is_torchs_argmax(dtype, B, V):
    """Every row's first maximum, bit for bit with torch.argmax: ties inside a chunk and across chunks (the earlier
    wins), a row of -inf, a NaN (torch takes the first NaN), a maximum in the ragged last chunk; with the copy home
    or without, poisoned outputs."""
    from scaleserve.kernels.fused import ARGMAX_BLOCK

    x = randn(B, V, dtype=dtype, scale=4.0).cpu()
    x[0, V // 3] = x[0, V - 1] = 1e4  # a tie: the first one wins
    if B > 1:
        x[1] = float("-inf")
    if B > 2:
        x[2, V - 2], x[2, 5], x[2, V // 2] = 1e4, float("nan"), float("nan")
    if B > 3:
        x[3, min(V - 1, ARGMAX_BLOCK + 7)] = x[3, 3] = 1e4  # across chunks: the earlier
    x = x.to(DEVICE)
    want = torch.argmax(x.float().cpu(), -1)
    for home in (None, torch.full((B,), -7, dtype=torch.int64, pin_memory=CUDA)):
        out = torch.full((B,), -7, dtype=torch.int64, device=DEVICE)
        got = argmax_rows(x, out, home)
        assert got is out and torch.equal(out.cpu(), want), (out, want)
        if home is not None:
            if CUDA:
                torch.cuda.synchronize()
            assert torch.equal(home, want)


def test_argmax_rows_of_a_strided_view_and_bad_outputs():
    x = randn(3, 200, dtype=torch.float32)[:, :150]  # rows of unit stride, a longer row stride
    out = torch.empty(3, dtype=torch.int64, device=DEVICE)
    assert torch.equal(argmax_rows(x, out).cpu(), torch.argmax(x.cpu(), -1))
    with pytest.raises(ValueError, match=r"got logits \[150, 3\] strides \[1, 200\]"):
        argmax_rows(x.t(), out)
    with pytest.raises(ValueError, match=r"out torch.int32 \[3\]"):
        argmax_rows(x, torch.empty(3, dtype=torch.int32, device=DEVICE))
