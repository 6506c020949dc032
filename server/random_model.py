"""Random int4 models of real shapes, for benchmarks and GPU tests (speed does not depend on the
weights' values). Built straight in our format — no checkpoint, no quantization pass.

Codes are uniform, zero points mid-range, scales sized so each projection keeps the activations'
scale (std(W) ~ 1/sqrt(K)); embeddings N(0, 1) / sqrt(D); norms 1. The default tokenizer is a
word-level one whose vocabulary covers every id ("w3" .. "wV"), so any generated id decodes.

    python -m scaleserve.server.random_model OUT --preset llama2-7b
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from scaleserve.kernels.quant import QuantConfig, num_groups, pack_int4, rtn_to_alphas

from .loader import FORMAT, FORMAT_VERSION, LoadedModel, base_fingerprint, build_model
from .model import ModelArgs

# HF LlamaConfig arguments, plus the group size the benchmarks use for each
PRESETS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0, group_size=128),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0, group_size=32),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048, tie_word_embeddings=False,
                 rms_norm_eps=1e-5, rope_theta=10000.0, group_size=32),
}
# the same shape with per-channel scales (group size -1): the layers the MMA GEMV serves at batch 1
PRESETS["llama2-7b-pc"] = {**PRESETS["llama2-7b"], "group_size": -1}

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def preset_config(preset: str):
    """-> (LlamaConfig, QuantConfig) of a preset."""
    from transformers import LlamaConfig

    kw = dict(PRESETS[preset])
    q = QuantConfig("rtn", 4, kw.pop("group_size"))
    return LlamaConfig(**kw, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"]), q


def word_tokenizer(vocab_size: int):
    """Word-level tokenizer: ids 0..2 are <unk> <s> </s>, id i >= 3 is the word 'w<i>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _random_quantized(name: str, N: int, K: int, q: QuantConfig, gen: torch.Generator, device) -> dict:
    """Uniform random codes of an [N, K] linear, with scales that keep its outputs ~unit for unit inputs."""
    G = num_groups(K, q.group_size)
    code_std = ((4**q.bits - 1) / 12) ** 0.5  # std of uniform codes 0 .. 2**bits - 1
    codes = torch.randint(0, 2**q.bits, (N, K), generator=gen, device=device, dtype=torch.uint8)
    scales = (0.75 + 0.5 * torch.rand(N, G, generator=gen, device=device)) / (code_std * K**0.5)
    zeros = torch.full((N, G), (2**q.bits - 1) / 2, device=device)
    if q.method == "rtn":
        out = {f"{name}.zeros": zeros, f"{name}.scales": scales}
    else:
        alphas, betas = rtn_to_alphas(zeros, scales, q.bits)
        out = {f"{name}.alphas": alphas, f"{name}.betas": betas}
    out[f"{name}.packed"] = pack_int4(codes)
    return out


@torch.no_grad()
def random_tensors(hf_config, q: QuantConfig, seed: int = 0, device: str = "cpu",
                   quantize_lm_head: bool = False) -> tuple[dict, dict]:
    """-> (tensors of our format on `device`, scaleserve.json) for hf_config's shapes. quantize_lm_head: the
    output projection in int4 too (`scaleserve quantize --quantize-lm-head`), not bf16."""
    a = ModelArgs.from_hf_config(hf_config)
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = {"attn.qkv": ((a.n_heads + 2 * a.n_kv_heads) * a.head_dim, a.dim),
              "attn.o": (a.dim, a.n_heads * a.head_dim),
              "mlp.gate_up": (2 * a.intermediate_size, a.dim), "mlp.down": (a.dim, a.intermediate_size)}
    tensors: dict[str, torch.Tensor] = {}
    for i in range(a.n_layers):
        for suffix, (N, K) in shapes.items():
            tensors.update(_random_quantized(f"layers.{i}.{suffix}", N, K, q, gen, device))
            if a.qkv_bias and suffix == "attn.qkv":
                tensors[f"layers.{i}.{suffix}.bias"] = torch.zeros(N, dtype=torch.bfloat16, device=device)
    ones = lambda n: torch.ones(n, dtype=torch.bfloat16, device=device)  # noqa: E731
    tensors["embed.weight"] = (torch.randn(a.vocab_size, a.dim, generator=gen, device=device) / a.dim**0.5).bfloat16()
    tensors["norm.weight"] = ones(a.dim)
    for i in range(a.n_layers):
        tensors[f"layers.{i}.input_norm.weight"] = ones(a.dim)
        tensors[f"layers.{i}.post_attn_norm.weight"] = ones(a.dim)
        if a.qk_norm:
            tensors[f"layers.{i}.attn.q_norm.weight"] = ones(a.head_dim)
            tensors[f"layers.{i}.attn.k_norm.weight"] = ones(a.head_dim)
    if quantize_lm_head:
        tensors.update(_random_quantized("lm_head", a.vocab_size, a.dim, q, gen, device))
    elif not a.tie_word_embeddings:
        tensors["lm_head.weight"] = (torch.randn(a.vocab_size, a.dim, generator=gen, device=device)
                                     / a.dim**0.5).bfloat16()
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".packed")})
    linear_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rsplit(".", 1)[0] in modules)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": q.method, "bits": q.bits,
            "group_size": q.group_size, "quantize_lm_head": quantize_lm_head, "quantized_modules": modules,
            "base_fingerprint": base_fingerprint(tensors, modules), "source": f"random (seed {seed})",
            "sqnr_db": {},
            "sizes": {"linear_bf16_bytes": sum(2 * N * K for N, K in shapes.values()) * a.n_layers,
                      "linear_int4_bytes": linear_bytes,
                      "total_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}}
    return tensors, meta


def random_model(preset: str, device: str = "cpu", seed: int = 0, q: QuantConfig | None = None,
                 quantize_lm_head: bool = False) -> LoadedModel:
    """A LoadedModel of a preset's shapes, built in device memory (nothing written to disk)."""
    cfg, default_q = preset_config(preset)
    tensors, meta = random_tensors(cfg, q or default_q, seed, device, quantize_lm_head)
    model = build_model(cfg, meta, tensors, device)
    return LoadedModel(model, word_tokenizer(cfg.vocab_size), cfg, meta, Path(f"random-{preset}"), f"random-{preset}")


def write_random_model(out: str | Path, hf_config_or_preset, q: QuantConfig | None = None, seed: int = 0,
                       device: str = "cpu", tokenizer_dir: str | Path | None = None,
                       quantize_lm_head: bool = False) -> Path:
    """Write a random model directory OUT (kept if OUT/scaleserve.json exists). Returns OUT."""
    out = Path(out)
    if (out / "scaleserve.json").exists():
        return out
    if isinstance(hf_config_or_preset, str):
        cfg, default_q = preset_config(hf_config_or_preset)
        q = q or default_q
    else:
        cfg = hf_config_or_preset
    tensors, meta = random_tensors(cfg, q, seed, device, quantize_lm_head)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": FORMAT})
    cfg.architectures = cfg.architectures or ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    if tokenizer_dir is None:
        word_tokenizer(cfg.vocab_size).save_pretrained(tmp)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    (tmp / "scaleserve.json").write_text(json.dumps(meta, indent=2))
    tmp.replace(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda is faster)")
    p.add_argument("--quantize-lm-head", action="store_true", help="the output projection in int4 too (default: bf16)")
    a = p.parse_args()
    t0 = time.time()
    write_random_model(a.out, a.preset, seed=a.seed, device=a.device, quantize_lm_head=a.quantize_lm_head)
    print(f"random {a.preset} model in {a.out} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
