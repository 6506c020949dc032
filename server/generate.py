"""Offline generation: a fixed batch of prompts, each with its own adapter, run to completion.

This is the Python API behind `scaleserve generate` and the reference the server's batching is
checked against. It uses the same model forward, paged KV cache, slab and sampler as the engine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from scaleserve.adapters.format import Adapter, BaseSpec, validate
from scaleserve.adapters.slab import BASE, AdapterSlab

from .batch import Batch
from .kv_cache import KVCache
from .loader import LoadedModel
from .sampler import SamplingTensors, sample


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"


def encode_prompt(lm: LoadedModel, prompt: str, chat: bool = False) -> list[int]:
    tok = lm.tokenizer
    if chat:
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)
        return list(out["input_ids"])
    return tok.encode(prompt)


def eos_ids(lm: LoadedModel) -> set[int]:
    ids = set()
    for src in (getattr(lm.hf_config, "eos_token_id", None), lm.tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids


@torch.inference_mode()
def generate_ids(lm: LoadedModel, prompts: list[list[int]], adapters: list[Adapter | None] | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop_ids: set[int] | None = None, block_size: int = 16):
    """Token-level generation for B prompts. Returns (new token ids per prompt, finish reasons)."""
    B = len(prompts)
    adapters = adapters or [None] * B
    model, dev = lm.model, lm.device
    a = model.args
    for p in prompts:
        if not p:
            raise ValueError("the prompt is empty: it encodes to no tokens")
        if len(p) + max_new_tokens > a.max_position_embeddings:
            raise ValueError(f"the prompt ({len(p)} tokens) plus {max_new_tokens} new tokens exceed the model's "
                             f"context of {a.max_position_embeddings} tokens")
    stop_ids = eos_ids(lm) if stop_ids is None else stop_ids
    spec = BaseSpec.from_model(lm)
    distinct = {id(x): x for x in adapters if x is not None}
    checked = {k: validate(x, spec) for k, x in distinct.items()}
    slab = AdapterSlab(model, chan_slots=max(1, len(checked)), group_slots=max(1, len(checked)),
                       alpha_slots=max(1, len(checked)))
    refs_by_id = {}
    for k, x in checked.items():
        refs_by_id[k] = slab.write(x)
    refs = [BASE if x is None else refs_by_id[id(x)] for x in adapters]

    blocks_per_seq = -(-(max(len(p) for p in prompts) + max_new_tokens) // block_size)
    kv = KVCache(a.n_layers, B * blocks_per_seq + 1, block_size, a.n_kv_heads, a.head_dim,
                 model.embed.weight.dtype, dev)
    tables = [kv.allocator.allocate(blocks_per_seq) for _ in range(B)]
    seed = random.getrandbits(62) if seed is None else seed
    params = SamplingTensors(
        temperature=torch.full((B,), float(temperature), device=dev),
        top_p=torch.full((B,), float(top_p), device=dev),
        top_k=torch.full((B,), int(top_k), dtype=torch.int64, device=dev),
        seeds=torch.tensor([seed + i for i in range(B)], dtype=torch.int64, device=dev),
        steps=torch.zeros(B, dtype=torch.int64, device=dev),
        needs_filter=top_p < 1.0 or top_k > 0,
    )
    out = [[] for _ in range(B)]
    reasons = ["length"] * B
    live = list(range(B))
    pending = [list(p) for p in prompts]
    cached = [0] * B
    for _ in range(max_new_tokens):
        seqs = [(pending[i], cached[i], tables[i]) for i in live]
        rows = slab.rows([refs[i] for i in live], [len(pending[i]) for i in live])
        batch = Batch.build(seqs, block_size, rows, dev)
        logits = model(batch, kv.k, kv.v)
        sub = SamplingTensors(params.temperature[live], params.top_p[live], params.top_k[live],
                              params.seeds[live], params.steps[live], needs_filter=params.needs_filter)
        toks, _ = sample(logits, sub)
        params.steps[live] += 1
        still = []
        for j, i in enumerate(live):
            cached[i] += len(pending[i])
            t = int(toks[j])
            if t in stop_ids:
                reasons[i] = "stop"
                continue
            out[i].append(t)
            pending[i] = [t]
            still.append(i)
        live = still
        if not live:
            break
    return out, reasons


def generate(lm: LoadedModel, prompts: str | list[str], adapters: list[Adapter | None] | Adapter | None = None,
             chat: bool = False, **kw) -> list[GenerationResult]:
    """Text in, text out. `adapters`: one per prompt (None = base), or one for all."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if adapters is None or isinstance(adapters, Adapter):
        adapters = [adapters] * len(prompts)
    ids = [encode_prompt(lm, p, chat) for p in prompts]
    toks, reasons = generate_ids(lm, ids, adapters, **kw)
    return [GenerationResult(lm.tokenizer.decode(t, skip_special_tokens=True), t, len(p), r)
            for t, p, r in zip(toks, ids, reasons)]
