"""CUDA graphs of engine steps. A step's Python launches every Triton kernel of every layer; on a slow
host that is ~0.1 ms per launch, more than the GPU work of a decode step. A graph replays them all
with one launch. The engine packs each step's inputs into the static buffers here, then replays.

  DecodeGraphs   every row decodes one token: keyed by (batch bucket, RowAdapters.mode)
  PrefillGraphs  up to PREFILL_GRAPH_SEQS sequences prefill a chunk each: keyed by (token bucket, mode),
                 padded by empty sequences and a last, KV-less one that takes the leftover tokens
"""

from __future__ import annotations

import logging
import time

import torch

from scaleserve.kernels.linear import RowAdapters

from .batch import Batch
from .kv_cache import KVCache

log = logging.getLogger(__name__)


def scatter(staged: torch.Tensor, dsts: list[torch.Tensor]) -> None:
    """Copy consecutive slices of staged (int64 [sum of sizes], on the device) into each destination
    view in order, casting to its dtype: how a step's one packed upload reaches the static buffers."""
    o = 0
    for d in dsts:
        n = d.numel()
        d.copy_(staged[o : o + n].view(d.shape))
        o += n


PREFILL_GRAPH_SEQS = 8  # sequences one prefill graph takes (requests joining in the same step)


def graph_buckets(max_num_seqs: int) -> list[int]:
    b = [1, 2, 4, 8] + list(range(16, max_num_seqs + 16, 16))
    return sorted({x for x in b if x < max_num_seqs} | {max_num_seqs})


class _StepGraphs:
    """Captured CUDA graphs of one kind of step, keyed by (bucket, rows.mode), captured lazily (or all
    at warm-up) into a memory pool shared by every graph of the engine: a step consumes its logits
    before the next replay, so the graphs may reuse each other's activations."""

    def __init__(self, model, kv: KVCache, pool):
        self.model, self.kv, self.pool = model, kv, pool
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def run(self, b: int, mode: int) -> torch.Tensor:
        key = (b, mode)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(b, mode)
            self.graphs[key] = entry
        entry[0].replay()
        return entry[1]

    def _capture(self, b: int, mode: int):
        t0 = time.perf_counter()
        batch = self.batch(b, mode)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: Triton compiles and autotunes outside the capture
            for _ in range(2):
                self.model(batch, self.kv.k, self.kv.v)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            logits = self.model(batch, self.kv.k, self.kv.v)
        log.debug("captured %s graph %d mode %d in %.2f s", type(self).__name__, b, mode, time.perf_counter() - t0)
        return g, logits


class DecodeGraphs(_StepGraphs):
    """Static input buffers and graphs of the model's decode step, keyed by (batch bucket, rows.mode).
    Padded rows: token 0, slot -1 (writes nothing), block 0, context 0, base adapter row."""

    def __init__(self, model, kv: KVCache, max_bs: int, width: int, device, pool):
        super().__init__(model, kv, pool)
        self.buckets = graph_buckets(max_bs)
        self.max_bs, self.width = self.buckets[-1], width
        B, dev = self.max_bs, device
        self.tokens = torch.zeros(B, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        self.slots = torch.full((B,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(B, width, dtype=torch.int32, device=dev)
        self.rows = torch.zeros(3, B, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.logits_index = torch.arange(B, dtype=torch.int64, device=dev)

    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def batch(self, b: int, mode: int) -> Batch:
        rows = RowAdapters(self.rows[0, :b], self.rows[1, :b], self.rows[2, :b], mode)
        return Batch(self.tokens[:b], self.positions[:b], self.slots[:b], self.block_tables[:b],
                     self.seq_lens[:b], self.query_start[: b + 1], self.logits_index[:b], rows, 1)

    def load(self, b: int, staged: torch.Tensor) -> None:
        """staged: int64 [b * (7 + width)] on the device, laid out as Engine._pack_decode writes it."""
        scatter(staged, [self.tokens[:b], self.positions[:b], self.slots[:b], self.seq_lens[:b], self.rows[:, :b],
                         self.block_tables[:b]])


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token-count buckets of the prefill graphs: powers of two from 16, the last one >= max_tokens + 1
    (a chunk of n tokens runs in the first bucket > n: the padding sequence is never empty)."""
    b = [16]
    while b[-1] <= max_tokens:
        b.append(2 * b[-1])
    return b


class PrefillGraphs(_StepGraphs):
    """Graphs of a step that prefills up to PREFILL_GRAPH_SEQS chunks (requests joining a running batch
    together, or one alone — a lone request's time to first token), which eagerly is all Python launch
    overhead (~0.1 ms per kernel on a slow host, ~50 ms on a 7B model). Keyed by (token bucket Tb, mode).
    The chunks' tokens come first, sequence after sequence; unused sequence slots are empty (no query
    tokens: the attention programs of an empty sequence return at once); the last slot is a padding
    sequence holding the Tb - n leftover tokens (slots -1: writes no KV; block 0; its rows are dropped).
    So each real sequence's positions, context and causal mask are exactly those of the eager step."""

    def __init__(self, model, kv: KVCache, max_tokens: int, width: int, device, pool,
                 max_seqs: int = PREFILL_GRAPH_SEQS):
        super().__init__(model, kv, pool)
        self.buckets = prefill_buckets(max_tokens)
        self.width, self.max_seqs = width, max_seqs
        T, S, dev = self.buckets[-1], max_seqs + 1, device
        self.tokens = torch.zeros(T, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(T, dtype=torch.int64, device=dev)
        self.slots = torch.full((T,), -1, dtype=torch.int64, device=dev)
        self.rows = torch.zeros(3, T, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(S, width, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(S, dtype=torch.int32, device=dev)
        self.seq_lens[-1] = 1
        self.query_start = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        self.query_start[-1] = 1
        self.logits_index = torch.zeros(S, dtype=torch.int64, device=dev)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b > n), None)

    def batch(self, Tb: int, mode: int) -> Batch:
        rows = RowAdapters(self.rows[0, :Tb], self.rows[1, :Tb], self.rows[2, :Tb], mode)
        return Batch(self.tokens[:Tb], self.positions[:Tb], self.slots[:Tb], self.block_tables, self.seq_lens,
                     self.query_start, self.logits_index, rows, Tb)

    def load(self, Tb: int, staged: torch.Tensor) -> None:
        """staged: int64 [6 Tb + S width + 3 S + 1] (S = max_seqs + 1) on the device, laid out as
        Engine._pack_prefill writes it."""
        scatter(staged, [self.tokens[:Tb], self.positions[:Tb], self.slots[:Tb], self.rows[:, :Tb], self.block_tables,
                         self.seq_lens, self.query_start, self.logits_index])
