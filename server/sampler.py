"""Per-row sampling with no host sync: logit biases, temperature, top-k, top-p, penalties, seeds.

Randomness is counter-based: row b's noise at step t is a hash of (seed_b, t, token id), so a
seeded request gives the same tokens whatever else shares its batch, on any batch size. Sampling
is Gumbel-max over the filtered logits, which draws from softmax(logits / T) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_M1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M2 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M3 = -7723592293110705685  # 0x94D049BB133111EB


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """u [B, V] in (0, 1): splitmix64 of (seed, step, token id)."""
    v = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = (seeds.long() * _M1 + steps.long() * _M3)[:, None] + v[None, :] * _M1
    x = (x ^ _srl(x, 30)) * _M2
    x = (x ^ _srl(x, 27)) * _M3
    x = x ^ _srl(x, 31)
    return (_srl(x, 40).double() + 0.5) / float(1 << 24)


@dataclass
class SamplingTensors:
    """Per-row parameters, [B] each, on the logits' device."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32 in (0, 1]
    top_k: torch.Tensor  # int64; 0 = off
    seeds: torch.Tensor  # int64
    steps: torch.Tensor  # int64, tokens generated so far (the noise counter)
    presence_penalty: torch.Tensor | None = None  # float32
    frequency_penalty: torch.Tensor | None = None  # float32
    needs_filter: bool = False  # host-side: some row has top_p < 1 or top_k > 0


def logit_bias(biases: list[tuple[tuple[int, float], ...]], vocab: int, upload) -> torch.Tensor:
    """[B, V] float32: row b's (token id, bias) pairs of biases[b] (OpenAI's logit_bias), zeros elsewhere, on the
    device upload(array) puts arrays on (the engine's staging ring: asynchronous copies)."""
    where = upload(np.array([(b, t) for b, pairs in enumerate(biases) for t, _ in pairs], np.int64).reshape(-1, 2))
    vals = upload(np.array([v for pairs in biases for _, v in pairs], np.float32))
    out = torch.zeros(len(biases), vocab, device=vals.device)
    out[where[:, 0], where[:, 1]] = vals
    return out


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor):
    # logits [B, V]; counts [B, V]: how often each token was generated so far (OpenAI semantics)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).float()


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf. logits [B, V] already / temperature."""
    B, V = logits.shape
    sorted_logits, order = logits.sort(-1, descending=True)
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly above each token
    drop = (ranks >= k) | ((before >= top_p[:, None]) & (ranks > 0))
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, p: SamplingTensors, counts: torch.Tensor | None = None):
    """logits [B, V] float32 -> (tokens [B] int64, logprobs [B, V] of the distribution sampled from)."""
    if counts is not None and p.presence_penalty is not None:
        logits = apply_penalties(logits, counts, p.presence_penalty, p.frequency_penalty)
    greedy = p.temperature <= 0
    t = torch.where(greedy, torch.ones_like(p.temperature), p.temperature)
    scaled = logits / t[:, None]
    if p.needs_filter:
        scaled = filter_top_k_top_p(scaled, p.top_k, p.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(p.seeds, p.steps, logits.shape[1]))).float()
    drawn = (scaled + gumbel).argmax(-1)
    tokens = torch.where(greedy, logits.argmax(-1), drawn)
    return tokens, torch.log_softmax(scaled, -1)
