"""Quantizers and packing: pack/unpack exact, SQNR thresholds, bcq beats rtn, the rtn->alpha identity."""

import pytest
import torch

from scaleserve.kernels.quant import (
    QuantConfig,
    dequantize_bcq,
    dequantize_rtn,
    num_groups,
    pack_int4,
    quantize_bcq,
    quantize_rtn,
    rtn_to_alphas,
    sqnr_db,
    unpack_int4,
)


def weights(n, k, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return (torch.randn(n, k, generator=g) * 0.05).bfloat16().float()  # judged against bf16 weights


@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (17, 64), (64, 173), (5, 2)])
def test_pack_unpack_exact(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (n, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), codes)
    # low nibble holds the even k
    assert int(packed[0, 0]) & 0xF == int(codes[0, 0])


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[16]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 9)


# minimum SQNR (dB) of rtn on Gaussian weights, by (bits, group size); theory for 4-bit ~ 20-22 dB
RTN_MIN_SQNR = {(4, -1): 18.5, (4, 128): 19.5, (4, 64): 20.0, (4, 32): 21.0,
                (3, -1): 12.0, (3, 128): 13.0, (3, 64): 13.5, (3, 32): 14.5}


def _group_min(w, group_size):
    K = w.shape[1]
    gl = K if group_size == -1 else group_size
    return torch.stack([w[:, g : g + gl].amin(1) for g in range(0, K, gl)], 1)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_rtn_sqnr_and_exact_grid(bits, group_size):
    w = weights(96, 300)  # 300 is divisible by none of 32/64/128: ragged last group
    codes, zeros, scales = quantize_rtn(w, bits, group_size)
    G = num_groups(300, group_size)
    assert codes.shape == (96, 300) and zeros.shape == scales.shape == (96, G)
    assert int(codes.max()) <= 2**bits - 1
    torch.testing.assert_close(-zeros * scales, _group_min(w, group_size))  # the minimum sits on code 0
    assert sqnr_db(w, dequantize_rtn(codes, zeros, scales, group_size)) >= RTN_MIN_SQNR[(bits, group_size)]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_bcq_beats_rtn(bits, group_size):
    w = weights(64, 256)
    rtn = sqnr_db(w, dequantize_rtn(*quantize_rtn(w, bits, group_size), group_size))
    codes, alphas, betas = quantize_bcq(w, bits, group_size)
    assert alphas.shape == (bits, 64, num_groups(256, group_size)) and betas.shape == (64, num_groups(256, group_size))
    bcq = sqnr_db(w, dequantize_bcq(codes, alphas, betas, group_size))
    assert bcq > rtn + 0.3, (bcq, rtn)


@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_rtn_in_alpha_form_is_exact(group_size):
    w = weights(33, 200)
    codes, zeros, scales = quantize_rtn(w, 4, group_size)
    alphas, betas = rtn_to_alphas(zeros, scales, 4)
    torch.testing.assert_close(dequantize_bcq(codes, alphas, betas, group_size),
                               dequantize_rtn(codes, zeros, scales, group_size), rtol=0, atol=1e-6)


def test_constant_group_is_exact():
    w = torch.full((4, 64), 0.25)
    codes, zeros, scales = quantize_rtn(w, 4, 32)
    assert torch.equal(dequantize_rtn(codes, zeros, scales, 32), w)


@pytest.mark.parametrize("kw,msg", [
    (dict(group_size=48), "group size must be one of"),
    (dict(bits=2), "bits must be one of"),
    (dict(method="gptq"), "unknown quantization method"),
])
def test_quant_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        QuantConfig(**kw)


def test_group_not_spanning_zero_keeps_its_levels():
    w = 1.0 + 0.1 * torch.rand(8, 64)  # every weight positive: the zero point lies outside 0..15
    assert sqnr_db(w, dequantize_rtn(*quantize_rtn(w, 4, 32), 32)) > 40


def test_requantizing_a_grid_is_lossless():
    """Weights already of the form m + d*q (a Q4_1 GGUF) come back exactly."""
    q = torch.randint(0, 16, (16, 64)).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15  # every group uses the whole code range
    d, m = torch.rand(16, 2) + 0.1, torch.randn(16, 2)
    w = torch.repeat_interleave(d, 32, 1) * q + torch.repeat_interleave(m, 32, 1)
    codes, zeros, scales = quantize_rtn(w, 4, 32)
    assert torch.equal(codes.float(), q)
    torch.testing.assert_close(dequantize_rtn(codes, zeros, scales, 32), w, rtol=0, atol=1e-5)


def test_bcq_survives_degenerate_groups():
    """Groups where a bit plane is constant (here: two distinct values) make the least-squares
    system singular; the quantizer must still return finite, accurate weights."""
    w = torch.where(torch.rand(8, 64) < 0.5, 0.3, -0.1)
    w[:4, :32] = 0.7  # a constant group as well
    codes, alphas, betas = quantize_bcq(w, 4, 32)
    assert torch.isfinite(alphas).all() and torch.isfinite(betas).all()
    assert sqnr_db(w, dequantize_bcq(codes, alphas, betas, 32)) > 60
