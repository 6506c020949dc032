"""QuantLinear: the int4 linear every projection of the model is swapped for.

It owns the frozen, shared base (packed codes, zero points, base scales or base alphas) and the
adapter slab tables of this one linear (slot 0 = base; filled by adapters.slab.AdapterSlab).
forward(x, rows) applies each row's adapter: the exact semantics are kernels.reference.
On CUDA it runs the Triton kernels (kernels.int4_matmul); elsewhere the torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .quant import num_groups, rtn_to_alphas, unpack_int4
from .reference import adapted_linear_ref, silu_mul_ref

# Which kernel family a batch needs, cheapest first. The scheduler knows the kinds of the
# adapters it admitted, so it sets this on the host and no device sync is needed to pick it.
MODE_CHANNEL = 1  # every row is base or a per-channel PEQA adapter: task factor in the epilogue
MODE_GROUP = 2  # some row has a group-wise PEQA adapter: scale gathered per group in the K loop
MODE_ALPHA = 3  # some row has an AlphaTuning adapter (or the base is bcq): one dot per bit plane


@dataclass
class RowAdapters:
    """Each row's slab indices (one row per token of the batch). All tensors [M], int32."""

    chan_idx: torch.Tensor  # into chan [Sc, N]; 0 = no channel factor
    scale_idx: torch.Tensor  # into scales [Sg, N, G]; 0 = base scales
    alpha_idx: torch.Tensor  # into alphas [Sa, b, N, G] / betas; -1 = PEQA row
    mode: int = MODE_CHANNEL
    scale_slots: int = 0  # distinct scale_idx values among the rows, where the host knows them (0: unknown)

    def select(self, idx: torch.Tensor) -> "RowAdapters":
        return RowAdapters(self.chan_idx[idx], self.scale_idx[idx], self.alpha_idx[idx], self.mode,
                           1 if self.scale_slots == 1 else 0)

    @classmethod
    def base(cls, m: int, device, bcq_base: bool = False) -> "RowAdapters":
        zeros = torch.zeros(m, dtype=torch.int32, device=device)
        alpha = zeros if bcq_base else torch.full((m,), -1, dtype=torch.int32, device=device)
        return cls(zeros, zeros.clone(), alpha.clone(), MODE_ALPHA if bcq_base else MODE_CHANNEL, 1)


@dataclass(frozen=True)
class NormedInput:
    """The input of a projection that follows an RMSNorm whose division is left to the projection (the one-row
    MMA GEMV's epilogue): xg = round(h * weight) [M, K], and h, whose rsqrt(mean(h^2) + eps) scales the sums;
    sumsq: h's sums of squares per 16 elements, where the projection that wrote h made them (add_into's next_norm)."""

    xg: torch.Tensor
    h: torch.Tensor
    eps: float
    sumsq: torch.Tensor | None = None


class QuantLinear(nn.Module):
    """y = x @ W_{slot}^T (+ bias) for x [..., K]; W stored as int codes [N, K] packed two per byte."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, method: str,
                 bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.method = bits, group_size, method
        N, K, G = out_features, in_features, num_groups(in_features, group_size)
        self.register_buffer("packed", torch.zeros(N, (K + 1) // 2, dtype=torch.uint8, device=device))
        if method == "rtn":
            self.register_buffer("zeros", torch.zeros(N, G, device=device))
            self.register_buffer("scales", torch.ones(N, G, device=device))
        else:
            self.zeros = self.scales = None
            self.register_buffer("alphas", torch.ones(bits, N, G, device=device))
            self.register_buffer("betas", torch.zeros(N, G, device=device))
        self.register_buffer("bias", torch.zeros(N, device=device) if bias else None)
        # adapter slab tables; AdapterSlab.attach() replaces these with its preallocated tables
        self.slab_chan: torch.Tensor | None = None  # [Sc, N]
        self.slab_scales: torch.Tensor | None = None  # [Sg, N, G]
        self.slab_alphas: torch.Tensor | None = None  # [Sa, b, N, G]
        self.slab_betas: torch.Tensor | None = None  # [Sa, N, G]
        self._cpu_cache: dict = {}
        self._kernel_state = None  # repacked weights for the Triton kernels, built on first use
        self.use_kernels = True  # False: the torch reference on CUDA too (GPU tests compare both)

    @property
    def num_groups(self) -> int:
        return num_groups(self.in_features, self.group_size)

    def base_alphas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The base weight in AlphaTuning form ([b, N, G], [N, G]), for alpha slot 0."""
        if self.method == "rtn":
            return rtn_to_alphas(self.zeros, self.scales, self.bits)
        return self.alphas.float(), self.betas.float()

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed, self.in_features)

    def ensure_slab(self) -> None:
        """Single-slot tables (base only) for a model used without an AdapterSlab."""
        if self.slab_chan is not None:
            return
        dev = self.packed.device
        self.slab_chan = torch.ones(1, self.out_features, device=dev)
        self.slab_scales = self.scales.float().unsqueeze(0) if self.method == "rtn" else None
        a, b = self.base_alphas()
        self.slab_alphas, self.slab_betas = a.unsqueeze(0), b.unsqueeze(0)

    def forward(self, x: torch.Tensor | NormedInput, rows: RowAdapters) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        if isinstance(x, NormedInput):
            return self._mma_gemv(x.xg, rows, norm_in=(x.h, x.eps, x.sumsq))
        self.ensure_slab()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda and self.use_kernels:
            from .int4_matmul import adapted_linear  # Triton; imported only where it can run

            y = adapted_linear(self, x2, rows)
        elif x2.is_cuda:  # reference on the GPU: no dense cache (it would be a full dense model)
            y = adapted_linear_ref(
                x2, self.codes(), self.zeros, self.group_size, self.slab_chan, self.slab_scales, self.slab_alphas,
                self.slab_betas, rows.chan_idx, rows.scale_idx, rows.alpha_idx, self.bias).to(x.dtype)
        else:
            if not self._cpu_cache:
                self._cpu_cache["codes"] = self.codes()
            y = adapted_linear_ref(
                x2, self._cpu_cache["codes"], self.zeros, self.group_size, self.slab_chan, self.slab_scales,
                self.slab_alphas, self.slab_betas, rows.chan_idx, rows.scale_idx, rows.alpha_idx,
                self.bias, self._cpu_cache,
            ).to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def silu_gate(self, x: torch.Tensor | NormedInput, rows: RowAdapters) -> torch.Tensor:
        """silu(y[..., :N/2]) * y[..., N/2:] of y = forward(x, rows), for a fused gate / up projection (gate
        rows first). On CUDA with the kernels, int4_matmul's silu_gate: the projection, then kernels.fused's
        SiLU launch, or (int4_matmul.FUSE_SILU_GATE) the one-row GEMV's epilogue instead of that launch; else
        the torch reference."""
        if isinstance(x, NormedInput):
            return self._mma_gemv(x.xg, rows, silu_gate=True, norm_in=(x.h, x.eps, x.sumsq))
        if not (x.is_cuda and self.use_kernels):
            return silu_mul_ref(self(x, rows))
        from .int4_matmul import adapted_linear

        y = adapted_linear(self, x.reshape(-1, self.in_features), rows, silu_gate=True)
        return y.reshape(*x.shape[:-1], self.out_features // 2)

    def add_into(self, x: torch.Tensor, rows: RowAdapters, stream: torch.Tensor,
                 next_norm: tuple[torch.Tensor, ...] | None = None) -> None:
        """stream += forward(x, rows) in place, rounded once (a residual add); next_norm = (weight, xg[, sumsq]):
        also xg = round(stream * weight), the NormedInput of the RMSNorm that reads the stream next, and the stream's
        sums of squares per 16 elements into sumsq (float32 [ceil(N / 16)]) for that NormedInput."""
        self._mma_gemv(x, rows, out=stream, accumulate=True, norm_out=next_norm)

    def _mma_gemv(self, x: torch.Tensor, rows: RowAdapters, **kw) -> torch.Tensor:
        # x [1, K]: the one-row MMA GEMV with its RMSNorm epilogues (int4_matmul.mma_gemv_takes says when it
        # runs); on CPU tensors the Triton interpreter runs it (TRITON_INTERPRET=1)
        from .int4_matmul import adapted_linear

        return adapted_linear(self, x, rows, **kw)

    def invalidate_caches(self) -> None:
        self._cpu_cache = {}
        self._kernel_state = None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, method={self.method}, bits={self.bits}, "
                f"group_size={self.group_size}")
