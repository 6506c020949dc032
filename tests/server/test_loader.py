"""The int4 format on disk: contents, fingerprint, round trip, and clear errors on bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from scaleserve.kernels.quant import QuantConfig, unpack_int4
from scaleserve.server.loader import ModelFormatError, load_model, quantize_checkpoint, read_meta
from scaleserve.server.model import UnsupportedArchitecture


def test_format_contents(tiny_model_dir):
    meta = read_meta(tiny_model_dir)
    assert meta["method"] == "rtn" and meta["bits"] == 4 and meta["group_size"] == 32
    assert len(meta["base_fingerprint"]) == 64
    assert meta["quantized_modules"] == sorted(
        f"layers.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"))
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (tiny_model_dir / f).exists()
    st = load_file(tiny_model_dir / "model.safetensors")
    assert st["layers.0.mlp.down.packed"].dtype == torch.uint8
    assert st["layers.0.mlp.down.packed"].shape == (64, 86)  # K = 172 -> 86 bytes
    assert st["layers.0.mlp.down.zeros"].shape == (64, 6)  # ceil(172 / 32): ragged last group
    assert st["embed.weight"].dtype == torch.bfloat16
    assert meta["sizes"]["linear_int4_bytes"] < meta["sizes"]["linear_bf16_bytes"] / 2.5


def test_fingerprint_is_deterministic_and_covers_codes(make_tiny_model, tmp_path, make_hf_checkpoint):

    src = make_hf_checkpoint(tmp_path / "hf")
    a = quantize_checkpoint(src, tmp_path / "a", QuantConfig("rtn", 4, 32), progress=False)
    b = quantize_checkpoint(src, tmp_path / "b", QuantConfig("rtn", 4, 32), progress=False)
    c = quantize_checkpoint(src, tmp_path / "c", QuantConfig("rtn", 4, 64), progress=False)
    assert a["base_fingerprint"] == b["base_fingerprint"] != c["base_fingerprint"]


def test_loading_needs_no_source(tmp_path, make_hf_checkpoint):
    import shutil

    src = make_hf_checkpoint(tmp_path / "hf")
    quantize_checkpoint(src, tmp_path / "q", QuantConfig("bcq", 3, 64), progress=False)
    shutil.rmtree(src)
    lm = load_model(tmp_path / "q")
    m = lm.model.layers[0].mlp.down
    assert m.method == "bcq" and m.alphas.shape == (3, 64, 3)
    assert int(unpack_int4(m.packed, 172).max()) <= 7  # 3-bit codes in 4-bit containers


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match=r"unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM"):
        quantize_checkpoint(tmp_path, tmp_path / "out", progress=False)


def test_missing_files(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="no config.json"):
        quantize_checkpoint(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelFormatError, match=r"no \*.safetensors"):
        quantize_checkpoint(tmp_path / "cfgonly", tmp_path / "out", progress=False)
    with pytest.raises(ModelFormatError, match="has no scaleserve.json"):
        load_model(tmp_path / "cfgonly")
    (tmp_path / "notgguf.bin").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="not a .gguf"):
        quantize_checkpoint(tmp_path / "notgguf.bin", tmp_path / "out", progress=False)


def test_wrong_format_version(tmp_path, tiny_model_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    meta = json.loads((d / "scaleserve.json").read_text())
    meta["format_version"] = 99
    (d / "scaleserve.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="v99"):
        load_model(d)


def test_quantized_lm_head(tmp_path, make_hf_checkpoint):
    """--quantize-lm-head: lm_head becomes a QuantLinear (it takes the rows' adapters too)."""
    from scaleserve.adapters.format import identity_adapter
    from scaleserve.kernels.linear import QuantLinear
    from scaleserve.server.generate import generate_ids

    src = make_hf_checkpoint(tmp_path / "hf")
    meta = quantize_checkpoint(src, tmp_path / "q", QuantConfig("rtn", 4, 32), quantize_lm_head=True,
                               progress=False)
    assert "lm_head" in meta["quantized_modules"] and "lm_head" in meta["sqnr_db"]
    lm = load_model(tmp_path / "q")
    assert isinstance(lm.model.lm_head, QuantLinear)
    ids = [[5, 17, 42, 7]]
    base, _ = generate_ids(lm, ids, max_new_tokens=5, stop_ids=set())
    same, _ = generate_ids(lm, ids, [identity_adapter(lm, "peqa")], max_new_tokens=5, stop_ids=set())
    assert base == same and len(base[0]) == 5
