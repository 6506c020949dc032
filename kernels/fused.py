"""Fused row-wise kernels of the decoder layer: residual add + RMSNorm, RoPE on q/k, SiLU-gate.

Why: in eager torch each of these is 5-16 small kernels; a 7B decode step launched ~30 of them per
layer (1.8 ms of a 5.2 ms step on an H100, bench/decode_profile.py) — more than all the weights'
bytes take at the memory floor. Each function here is one launch.

Semantics (kernels/reference.py has the torch versions, and the model runs those on CPU):
  add_rms_norm(x, delta, w, eps) -> (y, h):  h = x + delta  (in x's dtype, as torch rounds it)
                                              y[t] = w * h[t] / sqrt(mean(h[t]^2) + eps)   (fp32 math)
  rope_qk_(qkv, cos, sin, H, KVH, hd):        in place on the q and k heads of qkv [T, (H + 2 KVH) hd]:
                                              x' = x * cos + rotate_half(x) * sin   (HF Llama convention)
  rope_qk_(..., kv_cache=(kc, vc, slots)):    also, for each t with s = slots[t] >= 0, writes the rotated
                                              k[t] and v[t] to kc / vc [blocks, bs, KVH, hd] at
                                              (s // bs, s % bs): attention.write_kv in the same launch
  silu_mul(gate_up) -> y:                     y[t, j] = silu(gate_up[t, j]) * gate_up[t, I + j]
  embed_scaled(tokens, table, w) -> (x, xg):  x[t] = table[tokens[t]], xg[t] = x[t] * w in table's dtype (w
                                              rounded to it first, one rounding of the product): a decode step's
                                              embedding and its first norm's scaled input in one launch
  embed_scaled(..., positions, rope_table)    also -> r[t] = rope_table[positions[t]] (its rows, [T, *row shape])
  argmax_rows(logits, out, home=None):        out[r] = torch.argmax(logits[r]) (the first maximum; a NaN counts as
                                              the maximum, as in torch), also written to home (pinned host memory)

CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, wait_for_producer


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, y_ptr, h_ptr, D, eps,
                         HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    # the norm's weight is a base weight (no kernel of the step writes it): read it while the producer
    # finishes, so the load is off the chain of dependent loads that is most of this kernel's time
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    wait_for_producer(PDL)
    h = tl.load(x_ptr + t * D + offs, mask=ok, other=0.0)
    if HAS_DELTA:
        # round the sum to the activation dtype first: the residual stream is stored in it
        h = (h.to(tl.float32) + tl.load(delta_ptr + t * D + offs, mask=ok, other=0.0).to(tl.float32))
        h = h.to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + t * D + offs, h, mask=ok)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
    tl.store(y_ptr + t * D + offs, (w * (hf * inv)).to(y_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta: [..., D] (same shape and dtype); weight [D] -> (y, h), both [..., D] in x's dtype.
    With delta None, h is x itself."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must be [{D}], got {list(weight.shape)}")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
        raise ValueError(f"delta {list(delta.shape)} {delta.dtype} must match x {list(x.shape)} {x.dtype}")
    x2 = x.reshape(-1, D).contiguous()
    T = x2.shape[0]
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if delta is not None else x2
    d2 = delta.reshape(-1, D).contiguous() if delta is not None else x2
    if T:
        _add_rms_norm_kernel[(T,)](x2, d2, weight, y, h, D, eps, HAS_DELTA=delta is not None,
                                   BLOCK_D=triton.next_power_of_2(D), num_warps=4 if D >= 2048 else 1,
                                   **launch_kwargs(x2))
    return y.view(x.shape), (h.view(x.shape) if delta is not None else x)


@triton.jit
def _rope_qk_kernel(qkv_ptr, cos_ptr, sin_ptr, stride_t, stride_c, n_rot_heads,
                    k_cache_ptr, v_cache_ptr, slot_ptr, n_heads, n_kv_heads, stride_kb, stride_ks, stride_vb,
                    stride_vs, BLOCK_SIZE,
                    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, WRITE_KV: tl.constexpr,
                    PDL: tl.constexpr):
    wait_for_producer(PDL)
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    if WRITE_KV:  # the grid also covers the v heads: they go to the cache as they are
        slot = tl.load(slot_ptr + t)
        blk = slot // BLOCK_SIZE
        pos = slot % BLOCK_SIZE
        kv_head = heads[:, None] - n_heads  # [BH, 1]: k heads 0..KVH-1, then v heads KVH..2KVH-1
        is_k = (kv_head >= 0) & (kv_head < n_kv_heads) & (j[None, :] < HALF) & (slot >= 0)
        is_v = (kv_head >= n_kv_heads) & (kv_head < 2 * n_kv_heads) & (j[None, :] < HALF) & (slot >= 0)
        pv = qkv_ptr + t * stride_t + heads[:, None] * (2 * HALF) + j[None, :]
        v1 = tl.load(pv, mask=is_v, other=0.0)
        v2 = tl.load(pv + HALF, mask=is_v, other=0.0)
        cv = v_cache_ptr + blk * stride_vb + pos * stride_vs + (kv_head - n_kv_heads) * (2 * HALF) + j[None, :]
        tl.store(cv, v1.to(v_cache_ptr.dtype.element_ty), mask=is_v)
        tl.store(cv + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=is_v)
    ok = (heads[:, None] < n_rot_heads) & (j[None, :] < HALF)
    # cos/sin: [T, 2 * HALF] with the two halves equal (cat(freqs, freqs)); read both as torch does
    c1 = tl.load(cos_ptr + t * stride_c + j, mask=j < HALF, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + t * stride_c + HALF + j, mask=j < HALF, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + t * stride_c + j, mask=j < HALF, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + t * stride_c + HALF + j, mask=j < HALF, other=0.0)[None, :]
    p1 = qkv_ptr + t * stride_t + heads[:, None] * (2 * HALF) + j[None, :]
    x1 = tl.load(p1, mask=ok, other=0.0)
    x2 = tl.load(p1 + HALF, mask=ok, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    r1 = (x1f * c1 - x2f * s1).to(x1.dtype)
    r2 = (x2f * c2 + x1f * s2).to(x1.dtype)
    tl.store(p1, r1, mask=ok)
    tl.store(p1 + HALF, r2, mask=ok)
    if WRITE_KV:
        ck = k_cache_ptr + blk * stride_kb + pos * stride_ks + kv_head * (2 * HALF) + j[None, :]
        tl.store(ck, r1.to(k_cache_ptr.dtype.element_ty), mask=is_k)
        tl.store(ck + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=is_k)


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, T: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin as the [T, head_dim] tables the RoPE kernels index with one row stride (views where they can
    be, copies where a row is not contiguous or the two strides differ)."""
    cos2, sin2 = cos.reshape(T, head_dim), sin.reshape(T, head_dim)
    if cos2.stride(1) != 1 or sin2.stride() != cos2.stride():
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    return cos2, sin2


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
             head_dim: int, kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) * hd] (rows contiguous); cos/sin [T, hd] float32 (any view that flattens
    to it). Rotates q and k heads in place; v is untouched. Returns qkv.
    kv_cache = (k_cache, v_cache, slot_mapping): caches [blocks, block_size, KVH, hd] with contiguous
    [KVH, hd] rows, slot_mapping [T] int64 (-1 = skip); the rotated k and v rows are written there too."""
    T, W = qkv.shape
    if W != (n_heads + 2 * n_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv width {W} != (H {n_heads} + 2 KVH {n_kv_heads}) x head_dim {head_dim} (even)")
    if qkv.stride(1) != 1:
        raise ValueError("qkv rows must be contiguous")
    cos2, sin2 = rope_rows(cos, sin, T, head_dim)
    n_rot = n_heads + n_kv_heads
    half = head_dim // 2
    n_grid = n_rot
    kc = vc = slots = qkv  # unused pointers when no cache is written
    strides, block_size = (0, 0, 0, 0), 1
    if kv_cache is not None:
        kc, vc, slots = kv_cache
        want = (kc.shape[0], kc.shape[1], n_kv_heads, head_dim)
        if tuple(kc.shape) != want or vc.shape != kc.shape or slots.shape != (T,):
            raise ValueError(f"caches {tuple(kc.shape)} / {tuple(vc.shape)} and slots {tuple(slots.shape)} do not "
                             f"fit T={T}, KVH={n_kv_heads}, hd={head_dim}")
        for name, c in (("k_cache", kc), ("v_cache", vc)):
            if c.stride(2) != head_dim or c.stride(3) != 1:
                raise ValueError(f"{name} must have contiguous [KVH, hd] rows")
        strides, block_size, n_grid = (kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1)), kc.shape[1], \
            n_rot + n_kv_heads
    block_h = min(triton.next_power_of_2(n_grid), 16)
    if T:
        _rope_qk_kernel[(T, triton.cdiv(n_grid, block_h))](
            qkv, cos2, sin2, qkv.stride(0), cos2.stride(0), n_rot, kc, vc, slots, n_heads, n_kv_heads, *strides,
            block_size, HALF=half, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half),
            WRITE_KV=kv_cache is not None, num_warps=2, **launch_kwargs(qkv))
    return qkv


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, I, stride_t, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producer(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = j < I
    g = tl.load(gu_ptr + t * stride_t + j, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * stride_t + I + j, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * I + j, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2I] -> silu(gate) * up, [..., I] in gate_up's dtype (into out, contiguous, if given)."""
    W = gate_up.shape[-1]
    if W % 2:
        raise ValueError(f"gate_up width must be even, got {W}")
    I = W // 2
    gu = gate_up.reshape(-1, W)
    if gu.stride(1) != 1:
        gu = gu.contiguous()
    T = gu.shape[0]
    if out is not None:
        if out.numel() != T * I or out.dtype != gate_up.dtype or not out.is_contiguous():
            raise ValueError(f"out must be {T * I} contiguous {gate_up.dtype} elements")
        y = out.view(T, I)
    else:
        y = torch.empty(T, I, dtype=gate_up.dtype, device=gate_up.device)
    block = min(triton.next_power_of_2(I), 1024)
    if T:
        _silu_mul_kernel[(T, triton.cdiv(I, block))](gu, y, I, gu.stride(0), BLOCK=block, num_warps=4, **launch_kwargs(gu))
    return out if out is not None else y.view(*gate_up.shape[:-1], I)


@triton.jit
def _embed_scaled_kernel(tok_ptr, table_ptr, w_ptr, x_ptr, xg_ptr, D, pos_ptr, rope_ptr, r_ptr, R,
                         BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(table_ptr.dtype.element_ty).to(tl.float32)  # (a base weight)
    # the tokens come from the step's inputs: after the wait. Waiting lets the first projection launch, whose
    # programs then pull their first weight tiles while this gather runs
    wait_for_producer(PDL)
    tok = tl.load(tok_ptr + t).to(tl.int64)
    row = tl.load(table_ptr + tok * D + offs, mask=ok, other=0.0)
    tl.store(x_ptr + t * D + offs, row, mask=ok)
    tl.store(xg_ptr + t * D + offs, (row.to(tl.float32) * w).to(xg_ptr.dtype.element_ty), mask=ok)
    if BLOCK_R:  # the position's rope row (R elements)
        r = tl.arange(0, BLOCK_R)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        tl.store(r_ptr + t * R + r, tl.load(rope_ptr + pos * R + r, mask=r < R), mask=r < R)


def embed_scaled(tokens: torch.Tensor, table: torch.Tensor, weight: torch.Tensor,
                 positions: torch.Tensor | None = None, rope_table: torch.Tensor | None = None) -> tuple:
    """tokens [T] (ids < V), table [V, D], weight [D] -> (x, xg), both [T, D] in table's dtype: the rows of the
    tokens and those rows times weight; with positions [T] and rope_table [P, ...] (contiguous), also their rows
    of rope_table, [T, ...] (see the module docstring)."""
    V, D = table.shape
    if tokens.dim() != 1 or weight.shape != (D,) or not table.is_contiguous():
        raise ValueError(f"embed_scaled: tokens [T], a contiguous table [V, D] and weight [D]; got tokens "
                         f"{list(tokens.shape)}, table {list(table.shape)}, weight {list(weight.shape)}")
    T = tokens.shape[0]
    rope = rope_table is not None
    if rope and (positions is None or positions.shape != tokens.shape or not rope_table.is_contiguous()):
        raise ValueError(f"embed_scaled: positions [T] and a contiguous rope table; got positions "
                         f"{None if positions is None else list(positions.shape)} for tokens {list(tokens.shape)}")
    x = torch.empty(T, D, dtype=table.dtype, device=table.device)
    xg = torch.empty_like(x)
    rows = torch.empty(T, *rope_table.shape[1:], dtype=rope_table.dtype, device=table.device) if rope else None
    R = rope_table[0].numel() if rope else 0
    if T:
        _embed_scaled_kernel[(T,)](tokens, table, weight, x, xg, D, positions if rope else tokens,
                                   rope_table if rope else x, rows if rope else x, R,
                                   BLOCK_D=triton.next_power_of_2(D), BLOCK_R=triton.next_power_of_2(R) if R else 0,
                                   num_warps=4 if D >= 2048 else 1, **launch_kwargs(x))
    return (x, xg, rows) if rope else (x, xg)


ARGMAX_BLOCK = 4096


@triton.jit
def _argmax_rows_kernel(x_ptr, stride, V, out_ptr, home_ptr, HOME: tl.constexpr, BLOCK: tl.constexpr,
                        CHUNKS: tl.constexpr, PDL: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    wait_for_producer(PDL)
    best_val = float("-inf")
    best_idx = 0
    first_nan = V  # (none yet)
    for c in tl.static_range(CHUNKS):  # (unrolled: one vocabulary a model)
        start = c * BLOCK
        offs = start + tl.arange(0, BLOCK)
        ok = offs < V
        x = tl.load(x_ptr + r * stride + offs, mask=ok, other=float("-inf")).to(tl.float32)
        nan = (x != x) & ok
        first_nan = tl.minimum(first_nan, tl.min(tl.where(nan, offs, V), axis=0))
        # the chunk's first maximum; an earlier chunk keeps a tie (strictly greater to take over)
        v, i = tl.max(tl.where(nan, float("-inf"), x), axis=0, return_indices=True, return_indices_tie_break_left=True)
        take = v > best_val
        best_idx = tl.where(take, start + i, best_idx)
        best_val = tl.where(take, v, best_val)
    idx = tl.where(first_nan < V, first_nan, best_idx).to(tl.int64)
    tl.store(out_ptr + r, idx)
    if HOME:
        tl.store(home_ptr + r, idx, cache_modifier=".wt")


def argmax_rows(logits: torch.Tensor, out: torch.Tensor, home: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (rows of unit stride) -> out [B] int64 = their argmax (torch's: the first maximum, a NaN the
    maximum), one program a row; home [B] int64 (pinned host memory): the same values, for the host. -> out."""
    B, V = logits.shape
    if logits.stride(1) != 1 or out.shape != (B,) or out.dtype != torch.int64 or \
            (home is not None and (home.shape != (B,) or home.dtype != torch.int64)):
        raise ValueError(f"argmax_rows: logits [B, V] with rows of unit stride into int64 [B]; got logits "
                         f"{list(logits.shape)} strides {list(logits.stride())}, out {out.dtype} {list(out.shape)}"
                         + ("" if home is None else f", home {home.dtype} {list(home.shape)}"))
    block = min(ARGMAX_BLOCK, triton.next_power_of_2(V))
    if B:
        _argmax_rows_kernel[(B,)](logits, logits.stride(0), V, out, out if home is None else home,
                                  HOME=home is not None, BLOCK=block, CHUNKS=triton.cdiv(V, block), num_warps=4,
                                  **launch_kwargs(logits))
    return out
