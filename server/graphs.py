"""CUDA graphs of engine steps. A step's Python launches every Triton kernel of every layer; on a slow
host that is ~0.1 ms per launch, more than the GPU work of a decode step. A graph replays them all
with one launch. The engine packs each step's inputs into the static buffers here, then replays.

  DecodeGraphs   every row decodes one token: keyed by (batch bucket, RowAdapters.mode); each bucket's inputs
                 are views of one byte buffer, filled by one copy a step
  PrefillGraphs  up to PREFILL_GRAPH_SEQS sequences prefill a chunk each: keyed by (token bucket, mode),
                 padded by empty sequences and a last, KV-less one that takes the leftover tokens
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from scaleserve.kernels.fused import argmax_rows
from scaleserve.kernels.host_copy import HEADER_WORDS, fetch_words, send_home
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
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.greedy: torch.Tensor | None = None  # the last replay's argmax tokens (its graph's output buffer)

    def run(self, b: int, mode: int) -> torch.Tensor:
        """Replay (capturing first if new); -> its logits. self.greedy: their argmax, from the same replay."""
        entry = self._entry(b, mode)
        entry[0].replay()
        self.greedy = entry[2]
        return entry[1]

    def _entry(self, b: int, mode: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """(graph, logits, greedy) of (b, mode), captured on first use."""
        entry = self.graphs.get((b, mode))
        if entry is None:
            entry = self.graphs[b, mode] = self._capture(b, mode)
        return entry

    def _capture(self, b: int, mode: int):
        t0 = time.perf_counter()
        batch = self.batch(b, mode)
        self._warm_up(batch)
        entry = self._record(lambda: self.forward(batch))
        log.debug("captured %s graph %d mode %d in %.2f s", type(self).__name__, b, mode, time.perf_counter() - t0)
        return entry

    def _warm_up(self, batch: Batch, *args) -> None:
        """Two eager runs of the step (forward(batch, *args)) before its capture: Triton compiles and autotunes
        outside it."""
        # a decode graph's forward writes its argmax into its own tokens input: the step being captured (lazily,
        # mid-serving) must still embed the tokens it was loaded with, so the warm-up runs put them back
        tokens = batch.tokens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(batch, *args)
                batch.tokens.copy_(tokens)
        torch.cuda.current_stream().wait_stream(side)

    def _record(self, step) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """step() -> (logits, greedy), captured into a graph in the shared pool."""
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            logits, greedy = step()
        return g, logits, greedy

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """What a graph runs: the logits [rows, V] and their argmax [rows] (a greedy step's tokens: one kernel
        less between replays than sampling them outside)."""
        logits = self.model(batch, self.kv.k, self.kv.v)
        return logits, logits.argmax(-1)


@functools.cache  # (per step on the host: a handful of buckets, one width)
def _decode_regions(b: int, width: int) -> tuple[tuple[int, int, bool], ...]:
    """(byte offset, elements, int64?) of each decode input: tokens, positions, slots, seq_lens, the rows' three
    slab indices, block tables [b, width]. Each region starts 16-byte aligned, as a tensor of its own would: the
    kernels' compiles are keyed by their pointers' alignment."""
    regions, offset = [], 0
    for n, wide in [(b, True)] * 3 + [(b, False)] * 4 + [(b * width, False)]:
        regions.append((offset, n, wide))
        offset += -(-n * (8 if wide else 4) // 16) * 16  # (rounded up to 16 bytes)
    return tuple(regions)


def decode_nbytes(b: int, width: int) -> int:
    """Bytes of one decode bucket's inputs (decode_views)."""
    offset, n, _ = _decode_regions(b, width)[-1]
    return offset + -(-n * 4 // 16) * 16


def decode_views(buf, b: int, width: int, i64, i32) -> tuple:
    """(tokens, positions, slots [b] int64; seq_lens, chan_idx, scale_idx, alpha_idx [b], block tables [b, width]
    int32) as views of buf, decode_nbytes(b, width) bytes: a uint8 numpy array (i64, i32: numpy's dtypes), where
    the engine packs a step, or a uint8 tensor (torch's), the bucket's graph inputs that one copy fills."""
    views = [buf[o : o + n * (8 if wide else 4)].view(i64 if wide else i32) for o, n, wide in _decode_regions(b, width)]
    views[-1] = views[-1].reshape(b, width)
    return tuple(views)


# Decode graphs leave a one-token step's int4-head logits in the model's dtype (Transformer.forward float_logits): the
# argmax a greedy step takes is the same, without the float32 conversion's launch in the graph; Engine._sample
# converts where a step samples. 3.8 µs less a batch-1 7B step on an H100 (bench/decode_bounds.py `bf16-logits`,
# session 29).
DECODE_LOGITS_IN_MODEL_DTYPE = True

# Decode graphs take the argmax of their logits with one PDL kernel (kernels/fused.py argmax_rows; it launches during
# the head's tail, where torch's argmax waits for it to end), which in a zero-copy graph also leaves the tokens in
# pinned memory (send_home's launch gone). Bit-identical to torch.argmax (interpreter tests, the engine's CUDA-graph
# test). Off: it costs a batch-1 7B step 6.1 µs more on an H100 (bench/decode_bounds.py `argmax-kernel`, session 29),
# as its one program a row scans a 32,000-logit row alone, where torch's argmax spreads the row over many blocks.
DECODE_ARGMAX_KERNEL = False

# Decode buckets whose graphs exchange inputs and tokens with the host themselves (CUDA): the graph's first kernel
# reads its inputs from pinned host memory and its last leaves the tokens there (kernels/host_copy.py), so nothing
# runs on the stream between two replays. A copy engine's upload and copy home cost the batch-1 7B step 18.5 µs on
# an H100 (bench/decode_bounds.py `ops`, session 28); at larger batches the step is long and that cost is small.
ZERO_COPY_BUCKETS = (1,)


class DecodeGraphs(_StepGraphs):
    """Static inputs and graphs of the model's decode step, keyed by (batch bucket, rows.mode). Each bucket's
    graphs read their inputs as views of one byte buffer (decode_views), so a step's inputs arrive in one
    host->device copy with no kernel between it and the replay (a scatter into typed buffers was six).
    Padded rows: token 0, slot -1 (writes nothing), block 0, context 0, base adapter row.

    Zero-copy buckets (zero_copy, CUDA only) have two graphs a key, replayed in turn, each fetching its inputs from
    its own pinned buffer and sending its argmax to its own pinned tokens buffer: load() writes the buffer of the
    next replay, which the replay before it does not read, and `home` holds the last replay's tokens once it has
    run. The host writes a turn's input buffer only after that turn's last replay has run (its event), and the engine
    reads a replay's tokens (Engine._complete) before it loads the next step of the same turn, so neither side touches
    a buffer the other may still be using."""

    def __init__(self, model, kv: KVCache, max_bs: int, width: int, device, pool, decode_splits: int | None = None,
                 zero_copy: tuple[int, ...] = ()):
        super().__init__(model, kv, pool)
        self.decode_splits = decode_splits  # the attention's context splits in these graphs (None: its heuristic)
        self.buckets = graph_buckets(max_bs)
        self.max_bs, self.width = self.buckets[-1], width
        B, dev = self.max_bs, device
        self.inputs = {b: torch.zeros(decode_nbytes(b, width), dtype=torch.uint8, device=dev) for b in self.buckets}
        self.views = {b: decode_views(buf, b, width, torch.int64, torch.int32) for b, buf in self.inputs.items()}
        for v in self.views.values():
            v[2].fill_(-1)  # slots: a padded row writes no KV
        self.query_start = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.logits_index = torch.arange(B, dtype=torch.int64, device=dev)
        self.zero_copy = {b for b in self.buckets if b in zero_copy} if torch.device(dev).type == "cuda" else set()
        self.home: torch.Tensor | None = None  # the last replay's tokens in pinned memory (a zero-copy bucket's)
        # per zero-copy bucket, two of each: pinned input words (a header, then the inputs as `inputs` holds
        # them), pinned tokens, the event after the last replay that read / wrote them; and the turn last replayed
        self.host_in: dict[int, list[torch.Tensor]] = {}
        self.host_out: dict[int, list[torch.Tensor]] = {}
        self.turn_done: dict[int, list[torch.cuda.Event]] = {}
        self.turn: dict[int, int] = {}
        self.twins: dict[tuple[int, int], list[tuple[torch.cuda.CUDAGraph, torch.Tensor]]] = {}
        for b in sorted(self.zero_copy):
            words = self.inputs[b].view(torch.int32).cpu()  # (slots -1: as the device buffer starts)
            self.host_in[b] = [torch.cat([torch.zeros(HEADER_WORDS, dtype=torch.int32), words]).pin_memory()
                               for _ in range(2)]
            self.host_out[b] = [torch.zeros(b, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self.turn_done[b] = [torch.cuda.Event(), torch.cuda.Event()]
            self.turn[b] = 1  # (the first replay takes turn 0)

    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def batch(self, b: int, mode: int) -> Batch:
        tokens, positions, slots, seq_lens, chan_idx, scale_idx, alpha_idx, tables = self.views[b]
        return Batch(tokens, positions, slots, tables, seq_lens, self.query_start[: b + 1], self.logits_index[:b],
                     RowAdapters(chan_idx, scale_idx, alpha_idx, mode), 1, self.decode_splits)

    def forward(self, batch: Batch, home: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As _StepGraphs.forward, with the argmax written into the graph's own tokens input: a greedy step
        whose next step decodes the same rows leaves them there (load's keep_tokens) for the next replay to
        embed, so no copy runs between the two replays. The logits may be in the model's dtype
        (DECODE_LOGITS_IN_MODEL_DTYPE). home: pinned memory that gets the argmax too (a zero-copy graph's)."""
        logits = self.model(batch, self.kv.k, self.kv.v, float_logits=not DECODE_LOGITS_IN_MODEL_DTYPE)
        if DECODE_ARGMAX_KERNEL and logits.is_cuda:
            return logits, argmax_rows(logits, batch.tokens, home)
        greedy = torch.argmax(logits, -1, out=batch.tokens)
        if home is not None:
            send_home(greedy, home)
        return logits, greedy

    def tokens(self, b: int) -> torch.Tensor:
        return self.views[b][0]

    def input_buffer(self, b: int) -> torch.Tensor | None:
        """A zero-copy bucket: the next replay's pinned input bytes (uint8 [decode_nbytes(b, width)]), free to write
        once the replay that last read them has run, to pack the step into and load() in place; else None (pack
        into a staging buffer, which load() copies to the device)."""
        if b not in self.zero_copy:
            return None
        turn = 1 - self.turn[b]
        self.turn_done[b][turn].synchronize()  # (the replay that last read this buffer: two steps ago, long done)
        return self.host_in[b][turn][HEADER_WORDS:].view(torch.uint8)

    def load(self, b: int, packed: torch.Tensor, keep_tokens: bool = False) -> None:
        """packed: uint8 [decode_nbytes(b, width)] on the host (pinned, for an asynchronous copy), laid out as
        decode_views reads it: Engine._pack_decode writes it. keep_tokens: copy everything but the tokens,
        which the last replay of this bucket's graphs left in place (its argmax: the rows' next tokens), or which
        the caller writes into tokens(b) on the device. A zero-copy bucket: into the next replay's pinned buffer,
        which that replay fetches itself."""
        start = _decode_regions(b, self.width)[1][0] if keep_tokens else 0
        if b not in self.zero_copy:
            self.inputs[b][start:].copy_(packed[start:], non_blocking=True)
            return
        words = self.host_in[b][1 - self.turn[b]]
        if packed.data_ptr() != words[HEADER_WORDS:].data_ptr():  # (not packed in place by way of input_buffer)
            self.input_buffer(b).copy_(packed)
        words[0] = start // 4

    def run(self, b: int, mode: int) -> torch.Tensor:
        """As _StepGraphs.run; a zero-copy bucket replays the next of its key's two graphs (what load() wrote), and
        `home` is where that replay leaves its argmax."""
        if b not in self.zero_copy:
            self.home = None
            return super().run(b, mode)
        turn = 1 - self.turn[b]
        entry = self._entry(b, mode)
        graph, logits = self.twins[b, mode][turn]
        graph.replay()
        self.turn_done[b][turn].record()
        self.turn[b] = turn
        self.greedy, self.home = entry[2], self.host_out[b][turn]
        return logits

    def _capture(self, b: int, mode: int):
        """A zero-copy bucket's two graphs: each fetches the inputs from its pinned buffer, runs the step, and
        sends the argmax to its pinned tokens; -> the first's (graph, logits, greedy)."""
        if b not in self.zero_copy:
            return super()._capture(b, mode)
        t0 = time.perf_counter()
        batch, words = self.batch(b, mode), self.inputs[b].view(torch.int32)
        turn = 1 - self.turn[b]
        # the inputs of the step being captured (its replay fetches the same), which the warm-up runs read: their
        # K / V writes are the step's own rows
        fetch_words(self.host_in[b][turn], words)
        self._warm_up(batch, self.host_out[b][turn])

        def step(t: int):
            fetch_words(self.host_in[b][t], words)
            return self.forward(batch, self.host_out[b][t])

        pair = [self._record(lambda t=t: step(t)) for t in (0, 1)]
        self.twins[b, mode] = [(g, logits) for g, logits, _ in pair]
        log.debug("captured zero-copy decode graphs %d mode %d in %.2f s", b, mode, time.perf_counter() - t0)
        return pair[0]


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
