"""Shared fixtures: tiny random Llama-family checkpoints built from transformers configs, quantized
into real scaleserve model directories on disk, and the embedded SmolLM2 default (slow)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` puts the checkout itself on sys.path, where its top-level kernels/ folder (installed
# as scaleserve.kernels) would shadow Hugging Face's `kernels` package, which transformers >= 5.25
# requires and imports. Tests import the project only through the installed `scaleserve` names.
_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_TEXT = (
    "Once upon a time there was a little robot named Bolt. Bolt liked to count numbers and to sort "
    "colours: red, green, blue. The capital of France is Paris. Adapters change the scales of a "
    "quantized model. Every request picks its own task. 0123456789 {}[]\":,.!? The end."
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 320):
    """A small byte-level BPE tokenizer trained on TINY_TEXT, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_hf_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random tiny HF checkpoint (safetensors + tokenizer) of the given architecture."""
    import transformers as tf

    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}
    Cfg, Model = classes[arch]
    tok = make_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Model(Cfg(**kw)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so logits are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_hf_checkpoint():
    """build_hf_checkpoint(path, arch="llama", seed=0, **config overrides) -> path."""
    return build_hf_checkpoint


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory):
    """Factory: (arch, method, group_size, bits, **config overrides) -> quantized model dir (cached)."""
    from scaleserve.kernels.quant import QuantConfig
    from scaleserve.server.loader import quantize_checkpoint

    cache: dict = {}

    def make(arch: str = "llama", method: str = "rtn", group_size: int = 32, bits: int = 4, **overrides) -> Path:
        key = (arch, method, group_size, bits, tuple(sorted(overrides.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{arch}-{method}-g{group_size}")
            src = build_hf_checkpoint(root / "hf", arch, **overrides)
            quantize_checkpoint(src, root / "q", QuantConfig(method, bits, group_size), progress=False)
            cache[key] = root / "q"
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model) -> Path:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from scaleserve.server.loader import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default, converted once into SCALESERVE_TEST_CACHE (default ~/.cache/scaleserve)."""
    from scaleserve.server.loader import ensure_default_model

    cache = Path(os.environ.get("SCALESERVE_TEST_CACHE", Path.home() / ".cache" / "scaleserve"))
    return ensure_default_model(cache, progress=False)


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3-compatible server (moto's server mode) on a loopback port, for the S3 store tests."""
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def has_cuda() -> bool:
    return torch.cuda.is_available()
