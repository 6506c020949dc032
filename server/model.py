"""A compact Llama-family transformer (Llama, Mistral, Qwen2, Qwen3) over int4 QuantLinears.

gpt-fast style: one file, shape comments, quantization is a module swap. Every projection is a
kernels.linear.QuantLinear that takes the batch's per-row adapter indices; q/k/v and gate/up are
fused into one matmul each. Two forwards:
  forward(batch, kv)      the serving path: flattened tokens of many sequences, paged KV cache
  forward_dense(tokens)   [B, S] causal, no cache: training, perplexity and equivalence tests
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaleserve.kernels.linear import NormedInput, QuantLinear, RowAdapters
from scaleserve.kernels.reference import add_rms_norm_ref, paged_attention_ref, rope_ref, silu_mul_ref

from .batch import Batch

# A one-token step with the norms in the projections (Transformer.decode_fused_norms) gathers its embedding, scales
# it by the first norm's weight and gathers its rope rows in one PDL kernel (kernels/fused.py embed_scaled) instead
# of three torch launches, none of which lets the first projection launch early. Bit-identical to those (interpreter
# tests, the fused-norm model test on the GPU too): 6.1 µs less a batch-1 7B step on an H100 (bench/decode_bounds.py
# `embed-scaled`, session 29).
EMBED_SCALED = True

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} heads is not a multiple of {self.n_kv_heads} KV heads")

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelArgs":
        archs = list(getattr(cfg, "architectures", None) or [])
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            found = ", ".join(archs) or f"model_type={getattr(cfg, 'model_type', '?')}"
            raise UnsupportedArchitecture(
                f"unsupported architecture {found}; scaleserve supports {', '.join(ARCHITECTURES)}")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            arch=arch,
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            qk_norm=arch == "qwen3",
        )


def rope_inv_freq(cfg, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and attention scaling, as transformers computes them."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        exps = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        return 1.0 / (theta ** exps), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # llama3, yarn, linear, ...

    with torch.device("cpu"):  # the model may be built under a meta-device context
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq.float(), float(scaling)


def fused_ok(x: torch.Tensor, module: nn.Module) -> bool:
    """The fused Triton kernels (kernels/fused.py) run for CUDA inference; autograd (training) and
    CPU take the torch reference ops."""
    return x.is_cuda and module.use_kernels and not torch.is_grad_enabled()


def _decode_fused_rope() -> bool:
    from scaleserve.kernels import attention  # (Triton only when the kernels run)

    return attention.DECODE_FUSED_ROPE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.use_kernels = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_forward(x)[0]

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (norm(x + delta), x + delta): the residual add and the norm in one kernel on CUDA."""
        if fused_ok(x, self):
            from scaleserve.kernels.fused import add_rms_norm

            return add_rms_norm(x, delta, self.weight, self.eps)
        return add_rms_norm_ref(x, delta, self.weight, self.eps)


def make_linear(args_q: dict, in_f: int, out_f: int, bias: bool = False) -> QuantLinear:
    return QuantLinear(in_f, out_f, bias=bias, **args_q)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, q: dict):
        super().__init__()
        self.a = a
        self.qkv = make_linear(q, a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=a.qkv_bias)
        self.o = make_linear(q, a.n_heads * a.head_dim, a.dim)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.norm_eps)
        self.use_kernels = True  # False: torch reference attention on CUDA too

    def split_heads(self, qkv):
        # qkv: [..., T, (H + 2 KVH) hd] -> views q [..., T, H, hd], k / v [..., T, KVH, hd]
        a = self.a
        q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], -1)
        return (q.unflatten(-1, (a.n_heads, a.head_dim)), k.unflatten(-1, (a.n_kv_heads, a.head_dim)),
                v.unflatten(-1, (a.n_kv_heads, a.head_dim)))

    def project(self, qkv, cos, sin, cache=None):
        # qkv: [..., T, (H + 2 KVH) hd] -> q [..., T, H, hd], k/v [..., T, KVH, hd] with rope applied.
        # cache = (k_cache, v_cache, slot_mapping) on the cache path (qkv [T, ...], cos/sin [T, 1, hd] row for
        # row): on CUDA one kernel rotates q and k in place and writes k and v to the cache -> (q, None, None)
        a = self.a
        if cache is not None and not a.qk_norm and fused_ok(qkv, self):
            from scaleserve.kernels.fused import rope_qk_

            rope_qk_(qkv, cos, sin, a.n_heads, a.n_kv_heads, a.head_dim, kv_cache=cache)
            return self.split_heads(qkv)[0], None, None
        q, k, v = self.split_heads(qkv)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope_ref(q, cos, sin), rope_ref(k, cos, sin), v

    def forward(self, x, rows: RowAdapters, cos, sin, batch: Batch, k_cache, v_cache):
        # x: [T, D]; k_cache/v_cache: [num_blocks, block_size, KVH, hd]
        return self.o(self.attend(self.qkv(x, rows), cos, sin, batch, k_cache, v_cache), rows)

    def attend(self, qkv, cos, sin, batch: Batch, k_cache, v_cache):
        # qkv: [T, (H + 2 KVH) hd] -> o [T, H hd], the output projection's input; writes the tokens' K/V
        if batch.max_query_len == 1 and not self.a.qk_norm and fused_ok(qkv, self) and _decode_fused_rope():
            return self.decode_fused_rope(qkv, cos, sin, batch, k_cache, v_cache).flatten(-2)
        q, k, v = self.project(qkv, cos, sin, cache=(k_cache, v_cache, batch.slot_mapping))
        if qkv.is_cuda and self.use_kernels:
            from scaleserve.kernels.attention import paged_attention, write_kv

            if k is not None:  # not written by the RoPE kernel (q/k-norm models)
                write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
            o = paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start,
                                self.a.head_dim ** -0.5, batch.max_query_len, num_splits=batch.decode_splits)
        else:
            keep = batch.slot_mapping >= 0
            k_cache.view(-1, *k.shape[1:])[batch.slot_mapping[keep]] = k[keep].to(k_cache.dtype)
            v_cache.view(-1, *v.shape[1:])[batch.slot_mapping[keep]] = v[keep].to(v_cache.dtype)
            o = paged_attention_ref(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start,
                                    self.a.head_dim ** -0.5)
        return o.flatten(-2)

    def decode_fused_rope(self, qkv, cos, sin, batch: Batch, k_cache, v_cache):
        # decode, qkv: [B, (H + 2 KVH) hd] -> o [B, H, hd]: RoPE and the new K/V row's cache write inside the
        # attention kernel
        from scaleserve.kernels.attention import paged_attention

        a = self.a
        q, k, v = self.split_heads(qkv)
        return paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start,
                               a.head_dim ** -0.5, 1, num_splits=batch.decode_splits,
                               rope_kv=(k, v, cos, sin, batch.slot_mapping))

    def forward_dense(self, x, rows, cos, sin):
        # x: [B, S, D] causal self-attention with no cache
        q, k, v = self.project(self.qkv(x, rows), cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=self.a.n_heads != self.a.n_kv_heads)
        return self.o(o.transpose(1, 2).flatten(-2), rows)


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs, q: dict):
        super().__init__()
        self.gate_up = make_linear(q, a.dim, 2 * a.intermediate_size)
        self.down = make_linear(q, a.intermediate_size, a.dim)
        self.use_kernels = True

    def forward(self, x, rows):
        if fused_ok(x, self):
            return self.down(self.gate_up.silu_gate(x, rows), rows)
        return self.down(silu_mul_ref(self.gate_up(x, rows)), rows)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, q: dict):
        super().__init__()
        self.attn = Attention(a, q)
        self.mlp = FeedForward(a, q)
        self.input_norm = RMSNorm(a.dim, a.norm_eps)
        self.post_attn_norm = RMSNorm(a.dim, a.norm_eps)

    def decode_fused_norms(self, x, xg, rows: RowAdapters, cos, sin, batch: Batch, k_cache, v_cache,
                           next_norm: RMSNorm | None, sumsq: torch.Tensor, sumsq_in: bool) -> None:
        # one token, each norm inside the projections around it (Transformer.fuses_norms): x [1, D] the residual
        # stream, updated in place; xg [1, D] = round(x * input_norm.weight) on entry, round(x * next_norm.weight)
        # on return (not written when next_norm is None). sumsq [ceil(D / 16)]: x's sums of squares per 16
        # elements, which each projection into x writes for the one after the norm (on entry where sumsq_in)
        o = self.attn.attend(self.attn.qkv(NormedInput(xg, x, self.input_norm.eps, sumsq if sumsq_in else None),
                                           rows), cos, sin, batch, k_cache, v_cache)
        self.attn.o.add_into(o, rows, x, (self.post_attn_norm.weight, xg, sumsq))
        up = self.mlp.gate_up.silu_gate(NormedInput(xg, x, self.post_attn_norm.eps, sumsq), rows)
        self.mlp.down.add_into(up, rows, x, None if next_norm is None else (next_norm.weight, xg, sumsq))


def _split_rope(rows: torch.Tensor):
    """Gathered rope table rows [..., T, 2, hd] -> (cos, sin), views [..., T, 1, hd]."""
    return rows[..., 0:1, :], rows[..., 1:2, :]


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs, quant: dict, hf_config, quantize_lm_head: bool = False):
        super().__init__()
        self.args = a
        self.quant = dict(quant)  # bits, group_size, method
        self.embed = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a, quant) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.quantize_lm_head = quantize_lm_head
        if quantize_lm_head:
            self.lm_head = make_linear(quant, a.dim, a.vocab_size)
        elif a.tie_word_embeddings:
            self.lm_head = None  # logits use embed.weight
        else:
            self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        inv_freq, self.rope_scaling = rope_inv_freq(hf_config, a.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_table, self._rope_key = None, None  # see rope()

    def set_kernels(self, enabled: bool) -> None:
        """Triton kernels (True, the default) or the torch reference, for every linear and attention."""
        for m in self.modules():
            if hasattr(m, "use_kernels"):
                m.use_kernels = enabled

    def quant_linears(self) -> dict[str, QuantLinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, QuantLinear)}

    def rope(self, positions: torch.Tensor, n_positions: int | None = None):
        # positions: [..., T] (each < n_positions, default the model's max) -> cos/sin [..., T, 1, hd] float32.
        # Rows of a table built once per device: a step gathers them (one launch) instead of running
        # the ~8 elementwise ops below; the table holds what those ops give at each position.
        return _split_rope(self.rope_table(positions.device, n_positions)[positions])

    def rope_table(self, device: torch.device, n_positions: int | None = None) -> torch.Tensor:
        """[n, 2, hd] float32: cos and sin rows at each position (n: n_positions, at least the model's max)."""
        n = max(n_positions or 0, self.args.max_position_embeddings)
        key = (device, self.inv_freq.data_ptr(), n)
        if self._rope_key != key:
            pos = torch.arange(n, device=device)
            freqs = pos.float()[:, None] * self.inv_freq.to(device)
            emb = torch.cat((freqs, freqs), -1)  # [n, hd]
            table = torch.stack((emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling), 1)  # [n, 2, hd]
            if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
                return table  # (inside a graph: the memory is the graph's)
            self._rope_table, self._rope_key = table, key
        return self._rope_table

    def logits(self, h: torch.Tensor, rows: RowAdapters, delta: torch.Tensor | None = None,
               idx: torch.Tensor | None = None) -> torch.Tensor:
        # h (+ delta, the last sublayer's output, added in the final norm's kernel): [..., D] -> [..., V] float32,
        # at the rows idx of a flat [T, D] h (None: every row, no gathers)
        if idx is not None:
            h, delta = h[idx], (None if delta is None else delta[idx])
        h = self.norm.add_forward(h, delta)[0]
        if self.quantize_lm_head:
            return self.lm_head(h, rows if idx is None else rows.select(idx)).float()
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w).float()

    def fuses_norms(self, x: torch.Tensor, rows: RowAdapters) -> bool:
        """Whether a step on x [T, D] runs every RMSNorm inside the projections around it (kernels/int4_matmul.py
        FUSE_NORMS): one token, and every projection of a layer (all layers have the same) on the one-row MMA
        GEMV, whose epilogue alone can do it."""
        if x.shape[0] != 1 or not fused_ok(x, self.norm):
            return False
        from scaleserve.kernels import int4_matmul

        first = self.layers[0]
        return int4_matmul.FUSE_NORMS and all(
            int4_matmul.mma_gemv_takes(m, 1, rows.mode, x.dtype, x.device)
            for m in (first.attn.qkv, first.attn.o, first.mlp.gate_up, first.mlp.down))

    def forward(self, batch: Batch, k_caches: list, v_caches: list, float_logits: bool = True) -> torch.Tensor:
        """Logits [B, V] at each sequence's last new token (float32; where not float_logits, a one-token step whose
        head takes the fused norm leaves them in the model's dtype: a decode graph takes their argmax, the same
        either way, without the conversion's launch); writes K/V of every token."""
        rows = batch.rows
        # (a view of the table's first rows: what fuses_norms reads of the step's embedding is its shape and place)
        if self.fuses_norms(self.embed.weight[: batch.tokens.shape[0]], rows):
            logits = self.decode_fused_norms(batch.tokens, rows, batch, k_caches, v_caches)
            return logits.float() if float_logits else logits
        x = self.embed(batch.tokens)  # [T, D]
        cos, sin = self.rope(batch.positions)
        delta = None  # the last sublayer's output, added to the residual stream x by the next norm
        for layer, kc, vc in zip(self.layers, k_caches, v_caches):
            h, x = layer.input_norm.add_forward(x, delta)
            delta = layer.attn(h, rows, cos, sin, batch, kc, vc)
            h, x = layer.post_attn_norm.add_forward(x, delta)
            delta = layer.mlp(h, rows)
        # one new token per sequence (decode): every row's logits, in order
        return self.logits(x, rows, delta, None if batch.max_query_len == 1 else batch.logits_index)

    def decode_fused_norms(self, tokens, rows: RowAdapters, batch: Batch, k_caches: list,
                           v_caches: list) -> torch.Tensor:
        # tokens: [1] (at batch.positions) -> logits [1, V] in the model's dtype. x [1, D], the embedding, is the
        # residual stream, updated in place. Each projection before a norm adds into x and writes xg = round(x * the
        # norm's weight); the one after reads xg and scales by the norm's rsqrt(mean(x^2) + eps). An int4 head on the
        # MMA GEMV takes the final norm the same way; the bf16 head runs it as a kernel.
        from scaleserve.kernels.fused import embed_scaled
        from scaleserve.kernels.int4_matmul import mma_gemv_takes

        # x, xg = round(x * the first norm's weight) (16-bit operands: one rounding of the product), the rope rows
        if EMBED_SCALED:  # (in one kernel)
            x, xg, rope_rows = embed_scaled(tokens, self.embed.weight, self.layers[0].input_norm.weight,
                                            batch.positions, self.rope_table(tokens.device))
            cos, sin = _split_rope(rope_rows)
        else:
            x = self.embed(tokens)
            xg = x * self.layers[0].input_norm.weight.to(x.dtype)
            cos, sin = self.rope(batch.positions)
        head_fuses = self.quantize_lm_head and mma_gemv_takes(self.lm_head, 1, rows.mode, x.dtype, x.device)
        # the stream's sums of squares, written by each projection into it and read by the one after the next norm
        # (whose sum then waits until after its loop); the first layer's input norm reads the embedding itself
        sumsq = torch.empty(-(-x.shape[-1] // 16), dtype=torch.float32, device=x.device)
        for i, (layer, kc, vc) in enumerate(zip(self.layers, k_caches, v_caches)):
            if i + 1 < len(self.layers):
                nxt = self.layers[i + 1].input_norm
            else:
                nxt = self.norm if head_fuses else None
            layer.decode_fused_norms(x, xg, rows, cos, sin, batch, kc, vc, nxt, sumsq, i > 0)
        if head_fuses:
            return self.lm_head(NormedInput(xg, x, self.norm.eps, sumsq), rows)
        return self.logits(x, rows)

    def forward_dense(self, tokens: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V] float32; rows has one entry per token (B*S)."""
        return self.logits(self.hidden_dense(tokens, rows), rows)

    def hidden_dense(self, tokens: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """tokens [B, S] -> final hidden states [B, S, D] (before the final norm); causal, no cache.
        Training asks for logits only where the loss is, so it stops here."""
        B, S = tokens.shape
        x = self.embed(tokens)  # [B, S, D]
        cos, sin = self.rope(torch.arange(S, device=tokens.device), S)
        for layer in self.layers:
            x = x + layer.attn.forward_dense(layer.input_norm(x), rows, cos, sin)
            x = x + layer.mlp(layer.post_attn_norm(x), rows)
        return x
