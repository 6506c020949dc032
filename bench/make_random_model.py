"""A randomly initialised scaleserve int4 model directory, built directly (no checkpoint, no quantizer).

Speed does not depend on the weights' values, so benchmarks run on random codes with the exact
shapes of a real model: packed int4 codes (uniform), rtn zero points near the middle of the range,
group scales that give weights of std ~0.02, bf16 embeddings / norms / lm_head, a Llama config and a
word-level tokenizer whose vocabulary covers every id ("w0" .. "wN"), so any generated id decodes.

  python bench/make_random_model.py OUT --preset llama2-7b      # 32 layers, 4096 wide, group 128
  python bench/make_random_model.py OUT --preset smollm2-135m   # SmolLM2's shapes, group 32
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

PRESETS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0, group_size=128),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0, group_size=32),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=False,
                 rms_norm_eps=1e-5, rope_theta=10000.0, group_size=32),
}

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def make_tokenizer(vocab_size: int):
    """Word-level tokenizer: ids 0..2 are <unk> <s> </s>, id i >= 3 is the word 'w<i>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def linear_shapes(c: dict) -> dict[str, tuple[int, int]]:
    """Our fused module names -> (N, K)."""
    d, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    H, KVH, I = c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    out = {}
    for i in range(c["num_hidden_layers"]):
        out[f"layers.{i}.attn.qkv"] = ((H + 2 * KVH) * hd, d)
        out[f"layers.{i}.attn.o"] = (d, H * hd)
        out[f"layers.{i}.mlp.gate_up"] = (2 * I, d)
        out[f"layers.{i}.mlp.down"] = (d, I)
    return out


@torch.no_grad()
def make_random_model(out: str | Path, preset: str = "llama2-7b", seed: int = 0, device: str = "cpu") -> Path:
    """Write the model directory OUT (skipped if OUT/scaleserve.json exists). Returns OUT."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from scaleserve.server.loader import FORMAT, FORMAT_VERSION, base_fingerprint

    out = Path(out)
    if (out / "scaleserve.json").exists():
        return out
    t0 = time.time()
    c = dict(PRESETS[preset])
    gs = c.pop("group_size")
    cfg = LlamaConfig(**c, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    g = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    shapes = linear_shapes(c)
    for name, (N, K) in shapes.items():
        G = math.ceil(K / gs)
        tensors[f"{name}.packed"] = torch.randint(0, 256, (N, (K + 1) // 2), dtype=torch.uint8, device=device,
                                                  generator=g).cpu()
        tensors[f"{name}.zeros"] = torch.randint(7, 9, (N, G), device=device, generator=g).float().cpu()
        tensors[f"{name}.scales"] = (torch.rand(N, G, device=device, generator=g) * 0.004 + 0.002).cpu()
    D, V = c["hidden_size"], c["vocab_size"]

    def normal(*shape):
        return (torch.randn(*shape, device=device, generator=g) * 0.02).to(torch.bfloat16).cpu()

    tensors["embed.weight"] = normal(V, D)
    tensors["norm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    for i in range(c["num_hidden_layers"]):
        tensors[f"layers.{i}.input_norm.weight"] = torch.ones(D, dtype=torch.bfloat16)
        tensors[f"layers.{i}.post_attn_norm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    if not c["tie_word_embeddings"]:
        tensors["lm_head.weight"] = normal(V, D)
    modules = sorted(shapes)
    linear_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rsplit(".", 1)[0] in shapes)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": "rtn", "bits": 4, "group_size": gs,
        "quantize_lm_head": False, "quantized_modules": modules,
        "base_fingerprint": base_fingerprint(tensors, modules), "source": f"random:{preset}:seed{seed}",
        "sqnr_db": {},
        "sizes": {"linear_bf16_bytes": sum(2 * N * K for N, K in shapes.values()), "linear_int4_bytes": linear_bytes,
                  "total_bytes": sum(t.numel() * t.element_size() for t in tensors.values())},
    }
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    cfg.save_pretrained(tmp)
    make_tokenizer(V).save_pretrained(tmp)
    (tmp / "scaleserve.json").write_text(json.dumps(meta, indent=2))
    tmp.replace(out)
    print(f"random {preset} model in {out}: {meta['sizes']['total_bytes'] / 2**30:.2f} GiB, {time.time() - t0:.1f} s",
          flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda is faster)")
    a = p.parse_args()
    make_random_model(a.out, a.preset, a.seed, a.device)


if __name__ == "__main__":
    main()
