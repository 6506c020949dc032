"""The dense oracle: a Hugging Face model whose projections hold our (adapter-merged) weights."""

from __future__ import annotations

import torch

from scaleserve.adapters.format import Adapter
from scaleserve.kernels.quant import dequantize_bcq, dequantize_rtn, expand_groups


def merged_weight(m, adapter: Adapter | None, name: str) -> torch.Tensor:
    """W [N, K] float32 of QuantLinear `m` with `adapter` merged (docs/adapters.md semantics)."""
    codes = m.codes()
    if adapter is None:
        if m.method == "rtn":
            return dequantize_rtn(codes, m.zeros, m.scales, m.group_size)
        return dequantize_bcq(codes, m.alphas, m.betas, m.group_size)
    t = adapter.tensors
    if adapter.kind == "alphatuning":
        return dequantize_bcq(codes, t[f"{name}.alphas"].float(), t.get(f"{name}.betas"), m.group_size)
    s = t[f"{name}.scales"].float()
    if s.dim() == 1:  # per-channel multiplier of every group scale
        return s[:, None] * dequantize_rtn(codes, m.zeros, m.scales, m.group_size)
    return dequantize_rtn(codes, m.zeros, s, m.group_size)


def hf_model_with(lm, adapter: Adapter | None = None):
    """An HF model (float32) equal to our model with `adapter` merged into every projection."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(lm.hf_config, dtype=torch.float32).eval()
    a = lm.model.args
    sd = {}
    ours = lm.model.state_dict()
    sd["model.embed_tokens.weight"] = ours["embed.weight"].float()
    sd["model.norm.weight"] = ours["norm.weight"].float()
    if "lm_head.weight" in ours:
        sd["lm_head.weight"] = ours["lm_head.weight"].float()
    elif not a.tie_word_embeddings:
        raise NotImplementedError("quantized lm_head")
    for i in range(a.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = ours[f"layers.{i}.input_norm.weight"].float()
        sd[p + "post_attention_layernorm.weight"] = ours[f"layers.{i}.post_attn_norm.weight"].float()
        if a.qk_norm:
            sd[p + "self_attn.q_norm.weight"] = ours[f"layers.{i}.attn.q_norm.weight"].float()
            sd[p + "self_attn.k_norm.weight"] = ours[f"layers.{i}.attn.k_norm.weight"].float()
        mods = lm.model.layers[i]
        qkv = merged_weight(mods.attn.qkv, adapter, f"layers.{i}.attn.qkv")
        q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim])
        sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"] = q, k, v
        if mods.attn.qkv.bias is not None:
            bq, bk, bv = mods.attn.qkv.bias.float().split(
                [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim])
            sd[p + "self_attn.q_proj.bias"], sd[p + "self_attn.k_proj.bias"], sd[p + "self_attn.v_proj.bias"] = bq, bk, bv
        sd[p + "self_attn.o_proj.weight"] = merged_weight(mods.attn.o, adapter, f"layers.{i}.attn.o")
        g, u = merged_weight(mods.mlp.gate_up, adapter, f"layers.{i}.mlp.gate_up").chunk(2)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = g, u
        sd[p + "mlp.down_proj.weight"] = merged_weight(mods.mlp.down, adapter, f"layers.{i}.mlp.down")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in k or "lm_head" in k for k in missing), missing
    if a.tie_word_embeddings:
        hf.tie_weights()
    return hf


def random_adapter(lm, kind: str, granularity: str = "group", seed: int = 0, scale: float = 0.3) -> Adapter:
    """A random (non-identity) adapter of this base: the identity perturbed by ~`scale` relative noise."""
    from scaleserve.adapters.format import identity_adapter

    g = torch.Generator().manual_seed(seed)
    ident = identity_adapter(lm, kind, per_channel=granularity == "channel", name=f"rand-{kind}-{seed}")
    tensors = {k: v * (1 + scale * torch.randn(v.shape, generator=g)) for k, v in ident.tensors.items()}
    return Adapter(kind, ident.name, ident.base_fingerprint, tensors)


__all__ = ["merged_weight", "hf_model_with", "random_adapter", "expand_groups"]
