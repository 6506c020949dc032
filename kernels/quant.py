"""Quantizers (rtn, bcq), int4 packing, and the conversions between the two weight forms.

Everything here is exact and plain torch; it is the ground truth the kernels and the loader share.

Shapes, for one linear with N output rows and K inputs:
  codes  [N, K]     uint8, integers 0 .. 2**bits - 1 (3-bit codes ride in 4-bit containers)
  zeros  [N, G]     float32 zero points (rtn; code of the value 0, need not be an integer)
  scales [N, G]     float32 (rtn)
  alphas [b, N, G]  float32, one per bit plane (bcq / AlphaTuning)
  betas  [N, G]     float32 offsets (bcq / AlphaTuning)
with G = ceil(K / group_size) groups along K (G = 1 for per-channel, group_size = -1). When the
group size does not divide K the last group is simply shorter: group g covers
k in [g*group_size, min((g+1)*group_size, K)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("rtn", "bcq")
BITS = (3, 4)
GROUP_SIZES = (-1, 32, 64, 128)


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    bcq_iters: int = 15

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"group size must be one of {GROUP_SIZES} (-1 = one group per output channel), got {self.group_size}"
            )
        if self.bcq_iters < 0:
            raise ValueError(f"bcq_iters must be >= 0, got {self.bcq_iters}")


def group_len(K: int, group_size: int) -> int:
    """Length of a full group along K (the whole row for per-channel)."""
    return K if group_size == -1 else group_size


def num_groups(K: int, group_size: int) -> int:
    return math.ceil(K / group_len(K, group_size))


def expand_groups(t: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """[..., G] -> [..., K]: each group's value repeated over the k it covers (ragged last group)."""
    gl = group_len(K, group_size)
    return t.repeat_interleave(gl, dim=-1)[..., :K]


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (wg [N, G, gl] zero-padded, mask [G, gl] bool of real entries)."""
    N, K = w.shape
    gl = group_len(K, group_size)
    G = num_groups(K, group_size)
    pad = G * gl - K
    wg = torch.nn.functional.pad(w, (0, pad)).view(N, G, gl)
    mask = (torch.arange(G * gl, device=w.device) < K).view(G, gl)
    return wg, mask


# --- pack / unpack --------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] uint8 in 0..15 -> packed [N, ceil(K/2)] uint8; low nibble holds the even k."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("codes must lie in 0..15 to pack into int4")
    N, K = codes.shape
    if K % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """packed [N, ceil(K/2)] uint8 -> codes [N, K] uint8 (exact inverse of pack_int4)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != math.ceil(K / 2):
        raise ValueError(f"packed codes have {packed.shape[-1]} bytes per row; K={K} needs {math.ceil(K / 2)}")
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :K].contiguous()


# --- rtn ------------------------------------------------------------------------------------


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int):
    """Asymmetric min/max round-to-nearest. w [N, K] -> (codes [N,K] u8, zeros [N,G], scales [N,G]).

    s = (max - min) / (2**bits - 1), z = -min / s, Q = clamp(round(w / s + z)); W ~ s * (Q - z).
    """
    N, K = w.shape
    qmax = 2**bits - 1
    wg, mask = _grouped(w.float(), group_size)
    big = torch.finfo(torch.float32).max
    mn = torch.where(mask, wg, big).amin(-1)  # [N, G]
    mx = torch.where(mask, wg, -big).amax(-1)
    scales = (mx - mn) / qmax
    # a constant group: scale |w| (or 1 for zeros) makes it exact with one code step
    scales = torch.where(scales > 0, scales, torch.where(mn != 0, mn.abs(), torch.ones_like(mn)))
    # A float zero point puts the group's minimum exactly on code 0 (the Q4_1 / HQQ convention):
    # never worse than a rounded integer zero, and a Q4_1 GGUF re-quantizes losslessly.
    zeros = -mn / scales
    q = torch.round(wg / scales[..., None] + zeros[..., None])
    codes = torch.clamp(q, 0, qmax).view(N, -1)[:, :K].to(torch.uint8)
    return codes, zeros, scales


def dequantize_rtn(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """W[n,k] = s[n,g(k)] * (Q[n,k] - z[n,g(k)]), float32 [N, K]. `scales` may carry leading dims."""
    K = codes.shape[-1]
    return expand_groups(scales.float(), K, group_size) * (codes.float() - expand_groups(zeros.float(), K, group_size))


# --- bcq (binary-coding quantization, AlphaTuning / LUT-GEMM) --------------------------------


def bit_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., K] -> signs [bits, ..., K] float32 in {-1, +1}: 2*bit_i(Q) - 1."""
    shifts = torch.arange(bits, device=codes.device).view(-1, *([1] * codes.dim()))
    return (((codes.unsqueeze(0).to(torch.int32) >> shifts) & 1) * 2 - 1).float()


def dequantize_bcq(codes: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """W[n,k] = sum_i alphas[i,n,g(k)] * (2*bit_i(Q[n,k]) - 1) + betas[n,g(k)], float32 [N, K]."""
    K = codes.shape[-1]
    bits = alphas.shape[0]
    w = (expand_groups(alphas.float(), K, group_size) * bit_planes(codes, bits)).sum(0)
    if betas is not None:
        w = w + expand_groups(betas.float(), K, group_size)
    return w


def rtn_to_alphas(zeros: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rtn weight in AlphaTuning form: alpha_i = s * 2**(i-1), beta = s * ((2**b - 1)/2 - z).

    Exact: sum_i s*2**(i-1)*(2*bit_i - 1) = s*Q - s*(2**b - 1)/2, so adding beta gives s*(Q - z).
    """
    powers = torch.tensor([2.0 ** (i - 1) for i in range(bits)], device=scales.device)
    alphas = powers.view(-1, 1, 1) * scales.float().unsqueeze(0)
    betas = scales.float() * ((2**bits - 1) / 2 - zeros.float())
    return alphas, betas


def quantize_bcq(w: torch.Tensor, bits: int, group_size: int, iters: int = 15, chunk_rows: int = 512):
    """Binary-coding quantization with an offset: W ~ sum_i alpha_i * b_i + beta, b_i in {-1, +1}.

    Greedy init (residual signs, alpha = mean |residual|), then `iters` rounds of alternating
    least squares: solve [alphas, beta] for fixed signs, then re-pick every weight's code as the
    nearest of the 2**bits levels. Returns (codes [N,K] u8, alphas [b,N,G], betas [N,G]),
    with planes ordered so that larger i has the larger mean alpha (like rtn's powers of two).
    """
    N, K = w.shape
    out_codes, out_alphas, out_betas = [], [], []
    for r0 in range(0, N, chunk_rows):
        c, a, b = _bcq_rows(w[r0 : r0 + chunk_rows].float(), bits, group_size, iters)
        out_codes.append(c)
        out_alphas.append(a)
        out_betas.append(b)
    return torch.cat(out_codes, 0), torch.cat(out_alphas, 1), torch.cat(out_betas, 0)


def _bcq_rows(w: torch.Tensor, bits: int, group_size: int, iters: int):
    N, K = w.shape
    wg, mask = _grouped(w, group_size)  # [N, G, gl]
    m = mask.float()
    # Two starts, refined alike, best kept per group: the greedy residual-sign codes, and rtn's
    # codes (rtn is a bcq point, so the result is never worse than rtn on any group).
    rtn_codes = quantize_rtn(w, bits, group_size)[0]
    starts = [_bcq_greedy_signs(wg, m, bits), bit_planes(_grouped(rtn_codes.float(), group_size)[0].to(torch.uint8), bits)]
    best = None
    for signs in starts:
        signs, alphas, beta = _bcq_refine(wg, m, signs, bits, max(iters, 1))
        err = ((((alphas[..., None] * signs).sum(0) + beta[..., None]) - wg) ** 2 * m).sum(-1)  # [N, G]
        if best is None:
            best = [signs, alphas, beta, err]
            continue
        better = err < best[3]
        best[0] = torch.where(better[None, ..., None], signs, best[0])
        best[1] = torch.where(better[None], alphas, best[1])
        best[2] = torch.where(better, beta, best[2])
        best[3] = torch.minimum(err, best[3])
    signs, alphas, beta, _ = best
    codes = ((signs > 0).to(torch.int32) << torch.arange(bits).view(-1, 1, 1, 1)).sum(0)
    codes = codes.view(N, -1)[:, :K].to(torch.uint8)
    return codes, alphas.contiguous(), beta.contiguous()


def _bcq_greedy_signs(wg: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """Greedy binary coding of each group: sign of the residual, alpha = its mean magnitude."""
    cnt = m.sum(-1)
    resid = (wg - ((wg * m).sum(-1) / cnt)[..., None]) * m
    signs = []
    for _ in range(bits):
        s = torch.where(resid >= 0, 1.0, -1.0)
        a = (resid.abs() * m).sum(-1) / cnt
        resid = (resid - a[..., None] * s) * m
        signs.append(s)
    return torch.stack(signs[::-1], 0)  # [b, N, G, gl], smallest alpha first


def _bcq_refine(wg: torch.Tensor, m: torch.Tensor, signs: torch.Tensor, bits: int, iters: int):
    """Alternating least squares: [alphas, beta] for fixed signs, then nearest level per weight."""
    levels_bits = bit_planes(torch.arange(2**bits, dtype=torch.uint8), bits).T  # [2**b, b]
    eye = torch.eye(bits + 1, dtype=torch.float64)
    for it in range(iters):
        D = torch.cat([signs, torch.ones_like(signs[:1])], 0) * m  # [b+1, N, G, gl]
        A = torch.einsum("ingk,jngk->ngij", D, D).double()  # [N, G, b+1, b+1]
        # a bit plane equal to +-1 everywhere duplicates the offset column: a relative ridge keeps
        # the system solvable (in float64, where it is not lost to rounding)
        A = A + eye * (1e-9 * A.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)[..., None] + 1e-12)
        rhs = torch.einsum("ingk,ngk->ngi", D, wg).double()
        theta = torch.linalg.solve(A, rhs).float()  # [N, G, b+1]
        alphas = theta[..., :bits].permute(2, 0, 1)  # [b, N, G]
        beta = theta[..., bits]
        if it == iters - 1:
            break  # keep the codes the final alphas were fitted to
        levels = (levels_bits @ alphas.permute(1, 2, 0).unsqueeze(-1)).squeeze(-1) + beta[..., None]  # [N, G, 2**b]
        idx = (wg.unsqueeze(-1) - levels.unsqueeze(-2)).abs().argmin(-1)  # [N, G, gl]
        signs = bit_planes(idx.to(torch.uint8), bits)
    return signs, alphas, beta


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = ref.double()
    noise = (ref - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))
