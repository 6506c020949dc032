"""Plain-torch semantics of every kernel: the test oracle, and the CPU path of the server.

Adapted int4 linear, per row i of x [M, K] (docs/adapters.md states the same contract):

  if alpha_idx[i] >= 0 (AlphaTuning row):
      W_i[n,k] = sum_j alphas[alpha_idx[i], j, n, g(k)] * (2*bit_j(Q[n,k]) - 1) + betas[alpha_idx[i], n, g(k)]
  else (PEQA row, rtn base):
      W_i[n,k] = chan[chan_idx[i], n] * scales[scale_idx[i], n, g(k)] * (Q[n,k] - z[n, g(k)])
  y[i, :] = x[i, :] @ W_i^T

Slab slot 0 is the base in every table: chan[0] = 1, scales[0] = s0, alphas/betas[0] = the base
in AlphaTuning form. A base row on an rtn base is (chan 0, scale 0, alpha -1).
"""

from __future__ import annotations

import torch

from .quant import bit_planes, expand_groups


def adapted_linear_ref(
    x: torch.Tensor,  # [M, K]
    codes: torch.Tensor,  # [N, K] uint8 (unpacked)
    zeros: torch.Tensor | None,  # [N, G] (None on a bcq base)
    group_size: int,
    chan: torch.Tensor,  # [Sc, N]
    scales: torch.Tensor | None,  # [Sg, N, G]
    alphas: torch.Tensor | None,  # [Sa, b, N, G]
    betas: torch.Tensor | None,  # [Sa, N, G]
    chan_idx: torch.Tensor,  # [M] int
    scale_idx: torch.Tensor,  # [M] int
    alpha_idx: torch.Tensor,  # [M] int, -1 = PEQA row
    bias: torch.Tensor | None = None,  # [N]
    dequant_cache: dict | None = None,
) -> torch.Tensor:
    """y [M, N] float32. Rows sharing one adapter are computed together with one dense weight."""
    M, K = x.shape
    N = codes.shape[0]
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    xf = x.float()
    keys = torch.stack((chan_idx, scale_idx, alpha_idx), 1).tolist()
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(tuple(key), []).append(i)
    cache = dequant_cache if dequant_cache is not None else {}
    for (c, s, a), rows in groups.items():
        if a >= 0:
            w = _alpha_weight(codes, alphas[a], None if betas is None else betas[a], group_size, cache)
        else:
            if scales is None or zeros is None:
                raise ValueError("a PEQA row needs an rtn base (scales and zero points)")
            if s == 0:  # the base scales (slot 0 never changes): the dense base weight, once per weight
                w = cache.get("base")
                if w is None:
                    w = expand_groups(scales[0].float(), K, group_size) * _q_minus_z(codes, zeros, group_size)
                    if dequant_cache is not None:
                        cache["base"] = w
            else:
                w = expand_groups(scales[s].float(), K, group_size) * _q_minus_z(codes, zeros, group_size)
            if c != 0:
                w = w * chan[c].float()[:, None]
        idx = torch.tensor(rows, device=x.device)
        y[idx] = xf[idx] @ w.T
    if bias is not None:
        y += bias.float()
    return y


def _q_minus_z(codes, zeros, group_size):
    return codes.float() - expand_groups(zeros.float(), codes.shape[-1], group_size)


def _alpha_weight(codes, alphas, betas, group_size, cache):
    K = codes.shape[-1]
    signs = cache.get("signs")
    if signs is None:
        signs = bit_planes(codes, alphas.shape[0])  # [b, N, K]
        if cache is not None:
            cache["signs"] = signs
    w = (expand_groups(alphas.float(), K, group_size) * signs).sum(0)
    if betas is not None:
        w = w + expand_groups(betas.float(), K, group_size)
    return w


def paged_attention_ref(
    q: torch.Tensor,  # [T, H, D] queries of this step, all sequences flattened
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: torch.Tensor,  # [B] context length after this step (cached + new tokens)
    query_start: torch.Tensor,  # [B+1] start of each sequence's queries in q
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole paged context.

    Sequence b owns queries q[query_start[b]:query_start[b+1]] at positions
    seq_lens[b] - L .. seq_lens[b] - 1; its keys live in blocks block_tables[b, :] in order.
    Returns o [T, H, D] in q's dtype (computed in float32).
    """
    T, H, D = q.shape
    block_size, KVH = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts = query_start.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        qs, qe, n = starts[b], starts[b + 1], lens[b]
        if qe == qs:
            continue
        nblk = (n + block_size - 1) // block_size
        blocks = block_tables[b, :nblk].long()
        k = k_cache[blocks].reshape(-1, KVH, D)[:n].float()  # [n, KVH, D]
        v = v_cache[blocks].reshape(-1, KVH, D)[:n].float()
        qq = q[qs:qe].float()  # [L, H, D]
        L = qe - qs
        rep = H // KVH
        k = k.repeat_interleave(rep, 1)
        v = v.repeat_interleave(rep, 1)
        att = torch.einsum("lhd,nhd->hln", qq, k) * scale
        qpos = torch.arange(n - L, n, device=q.device)[:, None]
        kpos = torch.arange(n, device=q.device)[None, :]
        att = att.masked_fill(kpos > qpos, float("-inf"))
        out[qs:qe] = torch.einsum("hln,nhd->lhd", att.softmax(-1), v).to(q.dtype)
    return out


# --- row-wise layer ops (kernels/fused.py) -------------------------------------------------------


def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y, h): h = x + delta (x when delta is None), y = weight * h / rms(h) in x's dtype."""
    h = x if delta is None else x + delta
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * hf).to(x.dtype), h


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, D]; cos/sin [..., T, 1, D] float32 (rotate-half convention of HF Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
