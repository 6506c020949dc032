"""The engine: one thread that runs the model step after step over a continuously changing batch.

Threads: HTTP handlers (asyncio) call Engine.add / Engine.abort, which only touch a locked inbox.
The engine thread owns the scheduler, the KV cache and the adapter slab: each step it
  1. takes new requests and aborts from the inbox (aborted sequences free their KV blocks now),
  2. schedules (scheduler.Scheduler: decode + chunked prefill under a token budget),
  3. builds the step's tensors with one host->device copy (numpy, no per-token Python on decode; a batch-1
     decode graph fetches them from pinned memory itself: graphs.ZERO_COPY_BUCKETS),
  4. runs the model: eagerly, or on CUDA for pure-decode steps by replaying a CUDA graph captured
     per (padded batch-size bucket, RowAdapters.mode),
  5. samples every row at once (sampler.sample; counter-based noise, so seeded output does not
     depend on the batch), moves the tokens to the host once (a batch-1 decode graph's greedy tokens: the
     graph leaves them in pinned memory),
  6. appends tokens, detokenizes incrementally, applies stop conditions, and hands each
     sequence's StepOutput to its sink (main.py: loop.call_soon_threadsafe into an asyncio queue).

Overlap (settings.overlap_steps, on by default with CUDA): when the next step can only be the same
sequences decoding again, the engine dispatches it before step 6 of the last one: the sampled tokens
go from the sampler's output straight into the next step's inputs on the device, and the host does
step 6 (and the next step's 1-4) while the GPU computes. A sequence that turns out to have stopped
wastes its row of the step in flight; its output is dropped. Steps whose next batch changes (a
request joins, a known last token, logprobs or penalties that need the host's token history) run
one at a time as before.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from scaleserve.adapters.slab import BASE
from scaleserve.kernels.linear import MODE_ALPHA, MODE_CHANNEL, MODE_GROUP, RowAdapters
from scaleserve.kernels.pdl import set_pdl

from .batch import Batch
from .detokenizer import Detokenizer, cut_stop, window_delta
from .generate import eos_ids
from .graphs import ZERO_COPY_BUCKETS, DecodeGraphs, PrefillGraphs, decode_nbytes, decode_views
from .kv_cache import KVCache
from .sampler import SamplingTensors, apply_penalties, logit_bias, sample
from .scheduler import Scheduler, Sequence, Status
from .staging import HostStaging

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BLOCKS = 2048
# CUDA: a step's sampled tokens go home (device -> pinned host copy) on a stream of their own, so the copy runs
# beside the next step's input upload instead of between it and the last replay; the next step's first write
# to what the copy reads waits for it (Engine._await_home). Correct on the H100 (the engine's CUDA-graph test has a
# configuration with it); off: `bench/decode_profile.py --tokens-home-stream off,on` (7B, batch 1, one process) gave
# the overlapped step 2.006 -> 2.005 ms, within the noise (bench/NOTES-kernels.md, session 27).
TOKENS_HOME_STREAM = False
# CUDA: a batch-1 decode step whose context fits this many of the decode attention's tiles (one tile a split,
# kernels/attention.py DECODE_BLOCK_N tokens each) replays graphs of its own whose attention runs that many splits,
# not the heuristic's (9 on an H100 for 32 KV heads, sized for long contexts; at short ones most of its programs get
# no keys; a count meant to be below the heuristic's). 0: off. H100, 144 tokens, the attention alone forced to 4
# splits: -11.6 µs a step (bench/NOTES-kernels.md, session 26). In the engine (`bench/decode_profile.py
# --short-graphs off,on`, session 27, contexts 85-150): back-to-back replays 2.009 -> 2.003 ms, the overlapped step
# 2.006 -> 2.007. `bench/decode_bounds.py --context 144 --variants base,attn-s2,attn-s4,attn-s6,...` (H100,
# session 28): 4 splits -4.6 µs, 2 splits +57, 6 splits -1.0. On at 4: the serve bench's batch-1 requests decode
# at contexts 16-272. Correct on the H100 (the engine's CUDA-graph test).
SHORT_DECODE_SPLITS = 4


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(lp: torch.Tensor, ids: torch.Tensor, ks: list[int | None]) -> tuple[list[int], list]:
    """lp [R, V] log-probabilities, ids [R] the tokens taken, ks[r] alternatives wanted for row r (None:
    no entry) -> (ids as a list, [TokenLogprob or None]), with one device->host copy."""
    chosen = lp.gather(1, ids[:, None])[:, 0]
    k = max((x for x in ks if x is not None), default=0)
    top_v, top_i = lp.topk(k, -1) if k > 0 else (lp[:, :0], ids[:, None][:, :0])
    rows = torch.cat([ids[:, None].double(), chosen[:, None].double(), top_i.double(), top_v.double()], 1).tolist()
    entries = [None if kr is None else
               TokenLogprob(int(r[0]), float(r[1]), [(int(r[2 + j]), float(r[2 + k + j])) for j in range(kr)])
               for kr, r in zip(ks, rows)]
    return [int(r[0]) for r in rows], entries


@dataclass
class _Sampled:
    """A step's sampled tokens on their way to the host (Engine overlap)."""

    seqs: list[Sequence]
    tokens: torch.Tensor | list[int]  # [B] on the device, or already host ids
    host: torch.Tensor | None = None  # CUDA: pinned copy, valid once `ready` has happened; CPU: a copy
    ready: torch.cuda.Event | None = None
    lps: list | None = None
    timing: tuple | None = None  # (kind, start, end): CUDA events around the step's forward (gpu_step_timing)


@dataclass
class StepOutput:
    """What one step produced for one sequence (handed to Sequence.sink on the engine thread)."""

    token_ids: list[int]
    text: str  # new text (stop strings cut, a possible stop-string prefix held back until resolved)
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class LoopSink:
    """A Sequence.sink that puts StepOutputs into an asyncio queue on `loop`. Called alone it hops threads
    with one call_soon_threadsafe per output; inside an engine step the engine instead gathers every
    LoopSink output of the step and delivers them with one call_soon_threadsafe per event loop."""

    __slots__ = ("loop", "put")

    def __init__(self, loop, put):
        self.loop, self.put = loop, put

    def __call__(self, out: "StepOutput") -> None:
        try:
            self.loop.call_soon_threadsafe(self.put, out)
        except RuntimeError:  # loop closed
            pass


def _deliver(items: list) -> None:
    """Runs on the event loop: hand a step's outputs to their queues, in order."""
    for put, out in items:
        put(out)


# --- the engine ------------------------------------------------------------------------------


class Engine:
    def __init__(self, lm, slab, registry, settings, metrics=None):
        self.lm, self.slab, self.registry, self.settings, self.metrics = lm, slab, registry, settings, metrics
        model = lm.model
        a = model.args
        self.device = lm.device
        self.vocab = a.vocab_size
        self.block_size = settings.kv_block_size
        self.max_model_len = min(settings.max_model_len or a.max_position_embeddings, a.max_position_embeddings)
        self.width = -(-self.max_model_len // self.block_size)
        dtype = model.embed.weight.dtype
        per_block = KVCache.bytes_per_block(a.n_layers, self.block_size, a.n_kv_heads, a.head_dim, dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = int(free * settings.kv_cache_memory_fraction) // per_block
            if settings.kv_cache_max_blocks:
                num_blocks = min(num_blocks, settings.kv_cache_max_blocks)
        else:
            num_blocks = settings.kv_cache_max_blocks or CPU_DEFAULT_KV_BLOCKS
        self.kv = KVCache(a.n_layers, max(2, num_blocks + 1), self.block_size, a.n_kv_heads, a.head_dim, dtype,
                          self.device)
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.kv.num_blocks, self.block_size,
                 self.kv.num_blocks * per_block / 2**20)
        self.scheduler = Scheduler(self.kv.allocator, self.block_size, settings.max_num_seqs,
                                   settings.max_num_batched_tokens, registry, settings.prefix_caching)
        self._prefix_reported = (0, 0)  # the scheduler's prefix-cache token counts already in the metrics
        self.eos = frozenset(eos_ids(lm))
        self.detok = Detokenizer(lm.tokenizer, self.vocab)
        self.graphs = self.prefill_graphs = self.short_graphs = None
        self.short_context = 0  # a batch-1 decode step's context (this step's token included) up to which it
        # replays short_graphs
        self._replayed: DecodeGraphs | None = None  # the decode graphs of the last decode-graph step
        set_pdl(settings.pdl)  # before any graph is captured: the launches are recorded with it
        if self.device.type == "cuda" and settings.cuda_graphs:
            pool = torch.cuda.graph_pool_handle()
            self.graphs = DecodeGraphs(model, self.kv, settings.max_num_seqs, self.width, self.device, pool,
                                       zero_copy=ZERO_COPY_BUCKETS)
            if SHORT_DECODE_SPLITS:
                from scaleserve.kernels.attention import DECODE_BLOCK_N

                self.short_graphs = DecodeGraphs(model, self.kv, 1, self.width, self.device, pool,
                                                 decode_splits=SHORT_DECODE_SPLITS, zero_copy=ZERO_COPY_BUCKETS)
                self.short_context = SHORT_DECODE_SPLITS * DECODE_BLOCK_N
            # chunks above 512 tokens run eagerly: there the GPU work outweighs the launch overhead
            self.prefill_graphs = PrefillGraphs(model, self.kv, min(settings.max_num_batched_tokens,
                                                                    self.max_model_len, 511), self.width,
                                                self.device, pool)
        self._lock = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: list[Sequence] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
        self.step_kinds: dict[str, int] = {}  # how the model ran, per step kind (see _forward)
        self._outbox: dict | None = None  # during a step: event loop -> [(put, StepOutput)] (LoopSink batching)
        overlap = settings.overlap_steps
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._inflight: _Sampled | None = None  # the last step's tokens, not processed yet (overlap)
        self.overlapped_steps = 0
        self.tokens_in_place = 0  # overlapped decode-graph steps whose input tokens were the last replay's argmax
        self.short_steps = 0  # decode-graph steps that replayed short_graphs
        self.tokens_sent_home = 0  # steps whose tokens a zero-copy decode graph left in pinned memory itself
        # a step this long stalled every stream: over 100x a 7B decode step on the H100, above the longest prefill
        # chunk (2048 tokens), far below a kernel compile or a collection of the whole heap (seconds)
        warn_ms = settings.slow_step_warn_ms
        warn_ms = (250.0 if self.device.type == "cuda" else 0.0) if warn_ms is None else warn_ms
        self.slow_step_s = warn_ms / 1e3 if warn_ms > 0 else math.inf
        self._step_kind = ""
        # CUDA events around each step's forward, read when its tokens are home (no extra sync)
        self.gpu_step_timing = settings.gpu_step_timing and self.device.type == "cuda" and metrics is not None
        self._pinned = None
        self._home: torch.cuda.Stream | None = None  # the tokens' device -> host copies (TOKENS_HOME_STREAM)
        self._home_done: torch.cuda.Event | None = None  # the last such copy, until a main-stream write waits on it
        if self.device.type == "cuda":  # two: the step in flight and the one being processed
            self._pinned = [torch.empty(settings.max_num_seqs, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._home = torch.cuda.Stream(self.device)
        self.staging = HostStaging(self.device)  # the steps' packed inputs on their way to the device

    # --- thread-safe API (any thread) --------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def max_tokens_capacity(self) -> int:
        """The longest sequence (prompt + output) that can ever be served."""
        return min(self.max_model_len, self.kv.allocator.usable * self.block_size)

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self._inbox.append(seq)
            self._lock.notify()

    def abort(self, seq: Sequence) -> None:
        """Cancel a sequence; its KV blocks are freed at the start of the next step."""
        seq.aborted = True
        with self._lock:
            self._aborts.append(seq)
            self._lock.notify()

    def start(self) -> None:
        def run():
            if self.device.type == "cuda" and self.settings.cuda_warmup:
                self.warm_up()
                if self.settings.tune_decode_graph:
                    try:
                        self.tune_decode_graph()
                    except Exception:  # (an opt-in speed-up: a failure costs the pins, not the server)
                        log.exception("decode graph tuning failed; serving with the autotuner's configs")
            self._loop()

        self._thread = threading.Thread(target=run, name="scaleserve-engine", daemon=True)
        self._thread.start()

    def warm_up(self) -> None:
        """Compile and tune every kernel shape serving can meet, and capture every decode graph, before
        the first request: a batch size or adapter kind seen for the first time mid-serving would
        otherwise stall every running stream for the tuning and capture (seconds on a 7B model).
        Shapes: prefill chunks of each power-of-two token count (the kernels' tuning buckets) up to the
        step's token budget, and each decode bucket; each for every adapter mode the slab can produce."""
        t0 = time.perf_counter()
        modes = self._modes()
        budget = min(self.settings.max_num_batched_tokens, self.max_model_len)
        counts = sorted({min(1 << i, budget) for i in range(budget.bit_length() + 1)})
        with torch.inference_mode():
            for mode in modes:
                # mode 2 takes a different kernel with rows on one scale slot than on several
                for scale_slots in ((1, 2) if mode == MODE_GROUP else (1,)):
                    for T in counts:
                        self.lm.model(self._warm_batch(T, mode, scale_slots), self.kv.k, self.kv.v)
                for graphs in (self.graphs, self.short_graphs, self.prefill_graphs):
                    for b in graphs.buckets if graphs is not None else ():
                        graphs.run(b, mode)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        n_graphs = sum(len(g.graphs) for g in (self.graphs, self.short_graphs, self.prefill_graphs) if g is not None)
        log.info("warm-up: %d prefill sizes, %d graphs, modes %s, in %.1f s", len(counts), n_graphs, list(modes),
                 time.perf_counter() - t0)

    def tune_decode_graph(self) -> None:
        """The one-row GEMV's configs picked by timing the batch-1 decode graph (server/graph_tune.py), read from
        data_dir/kernel-pins/<GPU>.json where an earlier start saved them, else tuned now (after warm-up: the
        kernels are compiled and autotuned) and saved there; then pinned, and the batch-1 graphs captured again."""
        from scaleserve.kernels import int4_mma_gemv as mg

        from . import graph_tune

        if self.graphs is None or 1 not in self.graphs.buckets or not mg.LOOKED_UP:
            return  # (no batch-1 graph, or the model's batch-1 step never took the one-row GEMV: nothing to tune)
        t0 = time.perf_counter()
        path = mg.pins_file(self.settings.data_dir / "kernel-pins", torch.cuda.get_device_name(self.device))

        def tune() -> dict:
            step_ms = graph_tune.decode_step_timer(self.graphs, 1, MODE_CHANNEL)
            start = graph_tune.current_picks(self.device)
            pins, before, after = graph_tune.descend(start, mg.PIN_CONFIGS, step_ms)
            log.info("decode graph tuning: batch-1 step %.3f -> %.3f ms", before, after)
            return pins

        pins, how = graph_tune.load_or_tune(path, set(mg.LOOKED_UP), tune)
        mg.PINNED.update(pins)
        with torch.inference_mode():
            for mode in self._modes():  # (the tuning dropped the mode-1 graph; every batch-1 graph takes the pins)
                for graphs in filter(None, (self.graphs, self.short_graphs)):
                    graphs.graphs.pop((1, mode), None)
                    graphs.run(1, mode)
        torch.cuda.synchronize(self.device)
        log.info("decode graph pins %s (%s, %d shapes) in %.1f s", path, how, len(pins), time.perf_counter() - t0)

    def _modes(self) -> tuple[int, ...]:
        """The adapter modes the slab can produce (each takes its own kernels and graphs)."""
        return (MODE_ALPHA,) if self.slab.bcq_base else (MODE_CHANNEL, MODE_GROUP, MODE_ALPHA)

    def _warm_batch(self, T: int, mode: int, scale_slots: int = 1) -> Batch:
        """One sequence prefilling T tokens on base rows with a given kernel mode and scale-slot count (the
        kernel choice; the rows are base rows either way); writes no KV (slots -1) and reads block 0 for
        its context: only the shapes matter."""
        dev = self.device
        rows = torch.tensor(self.slab.row_indices(BASE), dtype=torch.int32, device=dev)[:, None].repeat(1, T)
        return Batch(torch.zeros(T, dtype=torch.int64, device=dev), torch.arange(T, device=dev),
                     torch.full((T,), -1, dtype=torch.int64, device=dev),
                     torch.zeros(1, self.width, dtype=torch.int32, device=dev),
                     torch.tensor([T], dtype=torch.int32, device=dev),
                     torch.tensor([0, T], dtype=torch.int32, device=dev),
                     torch.tensor([T - 1], dtype=torch.int64, device=dev),
                     RowAdapters(rows[0], rows[1], rows[2], mode, scale_slots), T)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        # fail whatever is left, so no handler waits forever
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting) + self._inbox:
            self._emit(seq, StepOutput([], "", True, "abort", prompt_tokens=len(seq.prompt_ids),
                                       completion_tokens=len(seq.output_ids)))

    # --- engine thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._inbox and not self._aborts and not self.scheduler.has_work():
                    self._lock.wait(0.5)
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for seq in inbox:
                if seq.aborted:
                    seq.status = Status.FINISHED
                    continue
                self.scheduler.add(seq)
            for seq in aborts:
                if seq.status != Status.FINISHED:
                    self._finish(seq, "abort")
            if self.scheduler.has_work():
                try:
                    self.step()
                except Exception as e:  # a failed step fails its sequences, not the server
                    log.exception("engine step failed")
                    if self.metrics:
                        self.metrics.error("engine")
                    for seq in list(self.scheduler.running):
                        self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            self._update_gauges()

    def _report_prefix_cache(self) -> None:
        """The scheduler's prefix-cache token counts since the last report into the metrics' counters."""
        sch = self.scheduler
        (q0, h0), self._prefix_reported = self._prefix_reported, (sch.prefix_query_tokens, sch.prefix_hit_tokens)
        self.metrics.prefix_cache_queries.inc(sch.prefix_query_tokens - q0)
        self.metrics.prefix_cache_hits.inc(sch.prefix_hit_tokens - h0)

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        self.metrics.requests_waiting.set(self.num_waiting)
        self.metrics.requests_running.set(self.num_running)
        self.metrics.kv_cache_usage.set(self.kv.allocator.usage())

    @torch.inference_mode()
    def step(self) -> None:
        prev = self._inflight
        if prev is not None and not self._can_overlap(prev):
            self._inflight = None
            self._complete(prev)
            prev = None
        sched = self.scheduler.schedule()
        if self.metrics and self.scheduler.prefix_caching:
            self._report_prefix_cache()
        if not sched:
            if self.scheduler.waiting and not self.scheduler.running:
                time.sleep(0.001)  # waiting on an adapter slot / KV that nobody will free: avoid a hot spin
            return
        self.steps += 1
        t0 = time.perf_counter()
        seqs = [s for s, _ in sched]
        scoring = [i for i, (s, _) in enumerate(sched) if s.params.prompt_logprobs is not None
                   and len(s.prompt_logprobs) < len(s.prompt_ids) - 1]
        if self.gpu_step_timing:
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        logits = self._forward(sched, prev, scoring)
        if self.gpu_step_timing:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
        # rows whose last prompt token was computed (or decodes) sample; chunk-interior rows do not
        done = [i for i, (s, n) in enumerate(sched) if s.num_computed + n == s.num_tokens]
        for s, n in sched:
            s.num_computed += n
        cur = None
        if done:
            # a decode graph's replay also took the argmax of its logits: a greedy step's tokens, ready
            greedy = self._replayed.greedy[: len(seqs)] if self._step_kind == "decode_graph" else None
            if len(done) < len(seqs):
                logits = logits[torch.tensor(done, device=logits.device)]
                seqs = [seqs[i] for i in done]
                greedy = None
            cur = self._dispatch(seqs, *self._sample(seqs, logits, greedy))
            if self.gpu_step_timing:
                cur.timing = (self._step_kind, started, ended)
        if prev is not None:  # the GPU runs this step while the host finishes the last one
            self.overlapped_steps += 1
            if self.metrics:
                self.metrics.overlapped_steps.inc()
            self._inflight = None
            self._complete(prev)
        if cur is not None:
            if self.overlap and cur.lps is None:
                self._inflight = cur
            else:
                self._complete(cur)
        took = time.perf_counter() - t0
        if took > self.slow_step_s:  # (with no compile logged, an autotune of a key warm-up missed is likely)
            self._warn_slow_step(sched, took)

    def _warn_slow_step(self, sched: list[tuple[Sequence, int]], seconds: float) -> None:
        """What the stalled step was, for finding why (a kernel compiled mid-serving logs its own line)."""
        prefill = [n for _, n in sched if n > 1]
        log.warning("slow engine step: %.0f ms (%s; %d sequences, %d decoding, %d prefilling %d tokens; "
                    "the step's wall time, including the wait for the step before it)", seconds * 1e3,
                    self._step_kind, len(sched), len(sched) - len(prefill), len(prefill), sum(prefill))

    def _can_overlap(self, prev: _Sampled) -> bool:
        """Whether the next step is exactly prev's (still running) sequences decoding one more token each,
        with nothing that needs prev's tokens on the host first."""
        sch = self.scheduler
        if prev.lps is not None or sch.waiting or not sch.running or len(sch.running) > sch.max_num_batched_tokens:
            return False
        ids = {id(s) for s in prev.seqs}
        new_blocks = 0
        for s in sch.running:
            p = s.params
            if id(s) not in ids or s.inflight != 1 or s.aborted or p.logprobs is not None \
                    or p.presence_penalty or p.frequency_penalty or p.prompt_logprobs is not None:
                return False
            if len(s.output_ids) + 1 >= p.max_tokens or s.num_tokens >= self.max_model_len:
                return False  # the token in flight is its last: the step after it would be wasted
            new_blocks += sch.blocks_needed(s, 1)
        return new_blocks <= sch.allocator.num_free  # so scheduling cannot preempt

    def _dispatch(self, seqs: list[Sequence], tokens, lps) -> _Sampled:
        """Start moving a step's sampled tokens to the host; they count in num_tokens from now on."""
        for s in seqs:
            s.inflight += 1
        f = _Sampled(seqs, tokens, lps=lps)
        if isinstance(tokens, torch.Tensor) and tokens.device.type != "cuda":
            # (the CPU tests' eager graphs: a decode graph's argmax buffer, which the next step overwrites in place)
            f.host = tokens.clone()
        elif isinstance(tokens, torch.Tensor) and self._step_kind == "decode_graph" and \
                self._replayed.home is not None and tokens.data_ptr() == self._replayed.greedy.data_ptr():
            f.host = self._replayed.home[: len(seqs)]  # (a zero-copy graph sent its argmax home itself)
            f.ready = torch.cuda.Event()
            f.ready.record()
            self.tokens_sent_home += 1
        elif isinstance(tokens, torch.Tensor):
            self._pinned.reverse()
            f.host = self._pinned[0][: len(seqs)]
            f.ready = torch.cuda.Event()
            if TOKENS_HOME_STREAM:
                self._home.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._home):
                    f.host.copy_(tokens, non_blocking=True)
                    f.ready.record()
                tokens.record_stream(self._home)  # (a sampler's output: not reused before the copy has read it)
                self._home_done = f.ready
            else:
                f.host.copy_(tokens, non_blocking=True)
                f.ready.record()
        return f

    def _await_home(self) -> None:
        """Before the main stream writes a decode graph's tokens input (its load, the token copy, its replay's
        argmax): the last tokens' copy home, which may read that buffer, has finished."""
        if self._home_done is not None:
            torch.cuda.current_stream().wait_event(self._home_done)
            self._home_done = None

    def _complete(self, f: _Sampled) -> None:
        """Step 6 for a dispatched step: its tokens on the host, appended, detokenized, stopped, emitted."""
        if f.ready is not None:
            f.ready.synchronize()
        if f.timing is not None:  # (its end was recorded before the tokens' copy home: done too)
            kind, started, ended = f.timing
            self.metrics.gpu_step.labels(kind).observe(started.elapsed_time(ended) / 1e3)
        tokens = f.host.tolist() if f.host is not None else f.tokens
        for s in f.seqs:
            s.inflight -= 1
        self._outbox = {}
        try:
            self._process(f.seqs, tokens, f.lps)
        finally:
            self._flush()

    def _forward(self, sched: list[tuple[Sequence, int]], prev: _Sampled | None = None,
                 scoring: list[int] = ()) -> torch.Tensor:
        """Logits [len(sched), V]. On CUDA, graphs wherever the step allows: all decode rows -> a decode
        graph; up to PREFILL_GRAPH_SEQS short prefill chunks alone -> a prefill graph; decode rows plus
        such chunks (requests joining a running batch) -> both graphs, one after the other, instead of one
        eager step (which on a slow host costs ~0.1 ms of Python per kernel launch).
        prev: an overlapped step (all rows decode prev's sequences): the input tokens are prev's
        sampled tokens, taken on the device.
        scoring: rows with prompt tokens to score (echo with logprobs): the step runs eagerly with logits
        at every position of their chunks (_score_prompts)."""
        prefill = [i for i, (_, n) in enumerate(sched) if n > 1]
        logits, kind = None, "eager"
        tokens = None if prev is None else self._tokens_from(prev, sched)
        if not prefill and not scoring:
            logits, kind = self._decode_graph(sched, tokens), "decode_graph"
        elif not scoring and self.prefill_graphs is not None and len(prefill) <= self.prefill_graphs.max_seqs and \
                self.prefill_graphs.bucket(sum(sched[i][1] for i in prefill)) is not None:
            chunks = [sched[i] for i in prefill]
            decode = [i for i, (_, n) in enumerate(sched) if n == 1]
            dec = self._decode_graph([sched[i] for i in decode]) if decode else None
            if dec is not None or not decode:
                # the graphs share one memory pool: copy the decode logits out before the prefill replay
                dec = None if dec is None else dec.to(torch.float32, copy=True)
                pre = self._prefill_graph(chunks)
                logits = pre if dec is None else self._in_order(torch.cat([dec, pre]), decode + prefill)
                kind = "prefill_graph" if dec is None else "split_graphs"
        if logits is None:
            kind = "eager"
            mode = self.slab.mode_for([s.slot for s, _ in sched])
            batch = self._build_batch(sched, mode, every_position=scoring)
            if tokens is not None:
                batch.tokens.copy_(tokens)
            logits = self.lm.model(batch, self.kv.k, self.kv.v)
            if scoring:
                logits = self._score_prompts(sched, scoring, logits)
        self._step_kind = kind
        self.step_kinds[kind] = self.step_kinds.get(kind, 0) + 1
        if self.metrics:
            self.metrics.engine_steps.labels(kind).inc()
        return logits

    def _score_prompts(self, sched, scoring: list[int], out: torch.Tensor) -> torch.Tensor:
        """out: logits at every position of the `scoring` rows' chunks and at the other rows' last one.
        Records each prompt token's logprob (given the tokens before it) and top alternatives in
        seq.prompt_logprobs, once per token (a recomputed chunk adds nothing). -> logits [len(sched), V] at
        each row's last position, as _forward gives."""
        ends = np.cumsum([n if i in scoring else 1 for i, (_, n) in enumerate(sched)])
        rows, targets, owners = [], [], []  # logit row, the prompt token it predicts, the sequence
        for i in scoring:
            s, n = sched[i]
            for j in range(n):
                pos = s.num_computed + j + 1  # the prompt token this position predicts
                if len(s.prompt_logprobs) < pos < len(s.prompt_ids):  # not scored before (a recompute)
                    rows.append(ends[i] - n + j)
                    targets.append(s.prompt_ids[pos])
                    owners.append(s)
        if rows:
            lp = torch.log_softmax(out[torch.tensor(rows, device=out.device)].float(), -1)
            _, entries = token_logprobs(lp, torch.tensor(targets, device=out.device),
                                        [s.params.prompt_logprobs for s in owners])
            for s, e in zip(owners, entries):
                s.prompt_logprobs.append(e)
        return out[torch.tensor(ends - 1, device=out.device)]

    def _decode_graph(self, sched, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [B, V] of decode rows by graph replay, or None (no graphs, or B above every bucket).
        tokens: [B] input tokens already on the device (overlap), instead of the packed ones."""
        graphs = self.graphs
        if self.short_graphs is not None and len(sched) == 1 and sched[0][0].num_computed < self.short_context:
            graphs = self.short_graphs  # (num_computed + 1: the context after this step)
        b = graphs.bucket(len(sched)) if graphs is not None else None
        if b is None:
            return None
        mode = self.slab.mode_for([s.slot for s, _ in sched])
        host = graphs.input_buffer(b)  # (a zero-copy graph's own pinned inputs: packed in place, no copy)
        staged = host is None
        if staged:
            host = self.staging.buffer(decode_nbytes(b, self.width))
        self._pack_decode(sched, b, host.numpy())
        # tokens that are this bucket's graph's own argmax, rows in order (a greedy step of the same sequences
        # again): they are already where the replay reads them
        in_place = tokens is not None and tokens.data_ptr() == graphs.tokens(b).data_ptr()
        if not in_place:
            self._await_home()
        # (in place: the upload runs beside the copy home; a zero-copy graph fetches its inputs after the token
        # copy below, so it keeps whatever tokens are on the device)
        graphs.load(b, host, keep_tokens=in_place or (tokens is not None and b in graphs.zero_copy))
        if staged:
            self.staging.sent()
        if tokens is not None and not in_place:
            graphs.tokens(b)[: len(sched)].copy_(tokens)
        self.tokens_in_place += in_place
        self.short_steps += graphs is self.short_graphs
        self._await_home()
        self._replayed = graphs
        return graphs.run(b, mode)[: len(sched)]

    def _tokens_from(self, prev: _Sampled, sched) -> torch.Tensor:
        """[B] prev's sampled tokens in sched's row order (rows of sequences that stopped are gone)."""
        if len(sched) == len(prev.seqs) and all(s is t for (s, _), t in zip(sched, prev.seqs)):
            return prev.tokens
        row = {id(s): i for i, s in enumerate(prev.seqs)}
        idx = np.fromiter((row[id(s)] for s, _ in sched), np.int64, len(sched))
        return prev.tokens.index_select(0, self.staging.upload(idx))

    def _prefill_graph(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Logits [len(chunks), V], each at the last token of its chunk, by a padded prefill graph."""
        Tb = self.prefill_graphs.bucket(sum(n for _, n in chunks))
        mode = self.slab.mode_for([s.slot for s, _ in chunks])
        self.prefill_graphs.load(Tb, self.staging.upload(self._pack_prefill(chunks, Tb)))
        return self.prefill_graphs.run(Tb, mode)[: len(chunks)]

    def _in_order(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """logits [B, V] of sched rows `rows` (in that order) -> logits in sched order."""
        if rows == list(range(len(rows))):
            return logits
        where = np.empty(len(rows), dtype=np.int64)
        where[rows] = np.arange(len(rows))
        return logits.index_select(0, self.staging.upload(where))

    def _row_indices(self, seq: Sequence) -> tuple[int, int, int]:
        return self.slab.row_indices(seq.slot or BASE)

    def _pack_decode(self, sched, b: int, buf: np.ndarray) -> None:
        """Writes buf (uint8 [decode_nbytes(b, width)]) in graphs.decode_views' layout: tokens, positions, slots
        (int64), seq_lens, the rows' slab indices, block tables [b, width] (int32) of the decode rows, padded to the
        bucket b."""
        B, bs, W = len(sched), self.block_size, self.width
        buf[:] = 0
        tokens, positions, slots, seq_lens, *r, tables = decode_views(buf, b, W, np.int64, np.int32)
        pos = np.fromiter((s.num_computed for s, _ in sched), np.int64, B)
        tokens[:B] = [0 if s.inflight else s.token_slice(s.num_computed, s.num_computed + 1)[0] for s, _ in sched]
        positions[:B] = pos
        slots[:B] = [s.blocks[p // bs] * bs + p % bs for (s, _), p in zip(sched, pos.tolist())]
        slots[B:] = -1
        seq_lens[:B] = pos + 1
        rows = np.array([self._row_indices(s) for s, _ in sched], dtype=np.int64).reshape(B, 3)
        for idx, mine, base in zip(r, rows.T, self.slab.row_indices(BASE)):
            idx[:B], idx[B:] = mine, base
        for i, (s, _) in enumerate(sched):
            tables[i, : len(s.blocks)] = s.blocks

    def _pack_prefill(self, chunks: list[tuple[Sequence, int]], Tb: int) -> np.ndarray:
        """int64 [6 Tb + S width + 3 S + 1], S = PrefillGraphs.max_seqs + 1: tokens, positions, slots, rows
        (3 x Tb) of the chunks' tokens one after the other, then the padding sequence's leftover tokens;
        block tables [S, width]; seq_lens [S]; query_start [S + 1]; logits_index [S]. Sequence slots
        past the chunks are empty; the last one is the padding sequence."""
        bs, W, S = self.block_size, self.width, self.prefill_graphs.max_seqs + 1
        buf = np.zeros(6 * Tb + S * W + 3 * S + 1, dtype=np.int64)
        r = buf[3 * Tb : 6 * Tb].reshape(3, Tb)
        tables = buf[6 * Tb : 6 * Tb + S * W].reshape(S, W)
        seq_lens, query_start, logits_index = np.split(buf[6 * Tb + S * W :], [S, 2 * S + 1])
        o = 0
        for i, (seq, n) in enumerate(chunks):
            start = seq.num_computed
            buf[o : o + n] = seq.token_slice(start, start + n)
            pos = np.arange(start, start + n, dtype=np.int64)
            buf[Tb + o : Tb + o + n] = pos
            blocks = np.asarray(seq.blocks, dtype=np.int64)
            buf[2 * Tb + o : 2 * Tb + o + n] = blocks[pos // bs] * bs + pos % bs
            r[:, o : o + n] = np.array(self._row_indices(seq), dtype=np.int64)[:, None]
            tables[i, : len(blocks)] = blocks
            seq_lens[i] = start + n
            o += n
            query_start[i + 1] = o
            logits_index[i] = o - 1
        query_start[len(chunks) + 1 :] = o  # empty sequences, then the padding one ends at Tb
        query_start[S] = Tb
        buf[Tb + o : 2 * Tb] = np.arange(Tb - o)  # padding: its own positions 0.., no KV writes, block 0
        buf[2 * Tb + o : 3 * Tb] = -1
        r[:, o:] = np.array(self.slab.row_indices(BASE), dtype=np.int64)[:, None]
        seq_lens[S - 1] = Tb - o
        logits_index[S - 1] = Tb - 1
        return buf

    def _build_batch(self, sched, mode: int, every_position: list[int] = ()) -> Batch:
        """A general (prefill and/or decode) Batch, from numpy arrays and one host->device copy. Logits
        at each row's last position, and at every position of the rows in `every_position`."""
        B, bs = len(sched), self.block_size
        counts = np.fromiter((n for _, n in sched), np.int64, B)
        starts = np.fromiter((s.num_computed for s, _ in sched), np.int64, B)
        T = int(counts.sum())
        # every block table as wide as the longest sequence can need, as in warm-up and the graphs: the attention
        # kernels' compiles are keyed by the table's row stride (== 1, a multiple of 16, or else), so a width of the
        # step's longest sequence would compile them again mid-serving for the first step of each kind
        W = self.width
        qstart = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(counts, out=qstart[1:])
        tok = np.fromiter((t for s, n in sched for t in ([0] if s.inflight else  # its token is on the device
                                                          s.token_slice(s.num_computed, s.num_computed + n))),
                          np.int64, T)
        # positions: start of each sequence + offset inside its chunk
        seg = np.repeat(np.arange(B), counts)
        positions = starts[seg] + (np.arange(T) - qstart[:-1][seg])
        tables = np.zeros((B, W), dtype=np.int64)
        for i, (s, _) in enumerate(sched):
            tables[i, : len(s.blocks)] = s.blocks
        slots = tables[seg, positions // bs] * bs + positions % bs
        seq_rows = np.array([self._row_indices(s) for s, _ in sched], dtype=np.int64).reshape(B, 3)
        scale_slots = len(np.unique(seq_rows[:, 1]))  # one lets mode 2 take the fold GEMM (kernels/int4_gemm.py)
        rows = np.repeat(seq_rows, counts, 0)
        logits_index = qstart[1:] - 1
        if len(every_position):
            logits_index = np.concatenate([np.arange(qstart[i], qstart[i + 1]) if i in every_position
                                           else qstart[i + 1 : i + 2] - 1 for i in range(B)])
        parts = [tok, positions, slots, starts + counts, qstart, logits_index, rows.T.reshape(-1), tables.reshape(-1)]
        dev = self.staging.upload(np.concatenate(parts))
        o = [0]

        def take(n):
            x = dev[o[0] : o[0] + n]
            o[0] += n
            return x

        tokens, pos_t, slot_t = take(T), take(T), take(T)
        seq_lens = take(B).int()
        qs = take(B + 1).int()
        logits_index = take(len(logits_index))
        r = take(3 * T).view(3, T).int()
        bt = take(B * W).view(B, W).int()
        return Batch(tokens, pos_t, slot_t, bt, seq_lens, qs, logits_index,
                     RowAdapters(r[0], r[1], r[2], mode, scale_slots), int(counts.max()))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, greedy: torch.Tensor | None = None):
        """-> (tokens [B], logprobs or None). greedy: logits.argmax(-1) where a graph already took it."""
        B, dev = len(seqs), logits.device
        ps = [s.params for s in seqs]
        if all(p.temperature <= 0 and p.logprobs is None and not (p.presence_penalty or p.frequency_penalty)
               and not p.logit_bias for p in ps):  # all greedy: skip the noise and filters (batch-1 decode latency)
            return (logits.argmax(-1) if greedy is None else greedy), None
        logits = logits.float()  # (a decode graph's may be in the model's dtype)
        if any(p.logit_bias for p in ps):  # (not in place: a graph's logits are its output buffer)
            logits = logits + logit_bias([p.logit_bias for p in ps], logits.shape[1], self.staging.upload)
        floats = self.staging.upload(np.array([[p.temperature, p.top_p, p.presence_penalty, p.frequency_penalty]
                                               for p in ps], dtype=np.float32))
        # the noise counter: tokens generated so far, the one still in flight included
        ints = self.staging.upload(np.array([[p.top_k, p.seed, len(s.output_ids) + s.inflight]
                                             for p, s in zip(ps, seqs)], dtype=np.int64))
        penal = any(p.presence_penalty or p.frequency_penalty for p in ps)
        st = SamplingTensors(
            temperature=floats[:, 0], top_p=floats[:, 1], top_k=ints[:, 0], seeds=ints[:, 1], steps=ints[:, 2],
            presence_penalty=floats[:, 2] if penal else None, frequency_penalty=floats[:, 3] if penal else None,
            needs_filter=any(p.top_p < 1.0 or p.top_k > 0 for p in ps))
        counts = None
        if penal:
            L = max(1, max(len(s.output_ids) for s in seqs))
            ids = torch.full((B, L), self.vocab, dtype=torch.int64)  # pad id = an extra column, dropped
            for i, s in enumerate(seqs):
                if s.output_ids:
                    ids[i, : len(s.output_ids)] = torch.tensor(s.output_ids)
            counts = torch.zeros(B, self.vocab + 1, device=dev)
            counts.scatter_add_(1, ids.to(dev), torch.ones(B, L, device=dev))
            counts = counts[:, : self.vocab]
        tokens, _ = sample(logits, st, counts)
        want = [p.logprobs for p in ps if p.logprobs is not None]
        if not want:
            return tokens, None
        base = logits if counts is None else apply_penalties(logits, counts, st.presence_penalty,
                                                             st.frequency_penalty)
        return token_logprobs(torch.log_softmax(base.float(), -1), tokens, [p.logprobs for p in ps])

    def _process(self, seqs: list[Sequence], tokens: list[int], lps) -> None:
        now = time.monotonic()
        # pass 1: append tokens, decide which sequences end on a token, gather every detokenization window
        live = []  # (row, seq, token, ended on a stop token, final, has windows)
        windows: list[list[int]] = []
        first, itls, gen = [], [], 0
        eos, max_len = self.eos, self.max_model_len
        for i, (seq, t) in enumerate(zip(seqs, tokens)):
            if seq.status != Status.RUNNING or seq.aborted:
                continue
            p = seq.params
            if seq.first_token_at is None:
                seq.first_token_at = now
                first.append(seq)
            else:
                itls.append(now - seq.last_token_at)
            seq.last_token_at = now
            ids = seq.output_ids
            stop_tok = (t in eos and not p.ignore_eos) or t in p.stop_token_ids
            if stop_tok:
                final = True
            else:
                ids.append(t)
                gen += 1
                # tokens on the host only: one still in flight (overlap) is not generated yet
                final = len(ids) >= p.max_tokens or len(seq.prompt_ids) + len(ids) >= max_len
            decode = final or seq.read_offset != len(ids)
            if decode:
                windows.append(ids[seq.prefix_offset : seq.read_offset])
                windows.append(ids[seq.prefix_offset :])
            live.append((i, seq, t, stop_tok, final, decode))
        m = self.metrics
        if m:
            for seq in first:
                m.ttft.observe(now - seq.arrival)
                m.prompt_tokens.inc(len(seq.prompt_ids))
            if itls:
                m.observe_many(m.itl, itls)
            if gen:
                m.generation_tokens.inc(gen)
        texts = self.detok.decode_many(windows) if windows else ()
        # pass 2: new text, stop strings, finish or emit
        w = 0
        for i, seq, t, stop_tok, final, decode in live:
            delta = ""
            if decode:
                delta = window_delta(seq, texts[w], texts[w + 1], final)
                w += 2
            p = seq.params
            text, hit = cut_stop(seq, delta, p.stop, final=final)
            seq.text += text
            if stop_tok:
                self._finish(seq, "stop", text=text)
                continue
            lp = [lps[i]] if lps is not None and lps[i] is not None else None
            if hit:
                self._finish(seq, "stop", text=text, token_ids=[t], logprobs=lp)
            elif final:
                self._finish(seq, "length", text=text, token_ids=[t], logprobs=lp)
            else:
                self._emit(seq, StepOutput([t], text, logprobs=lp))

    def _finish(self, seq: Sequence, reason: str, text: str = "", token_ids=None, logprobs=None,
                error: str | None = None) -> None:
        seq.held = ""  # stop/length paths flushed it through cut_stop(final=True); aborts drop it
        self.scheduler.finish(seq, reason)
        if self.metrics and seq.first_token_at is not None:
            self.metrics.e2e.observe(time.monotonic() - seq.arrival)
        self._emit(seq, StepOutput(token_ids or [], text, True, seq.finish_reason, logprobs,
                                   len(seq.prompt_ids), len(seq.output_ids), error))

    def _emit(self, seq: Sequence, out: StepOutput) -> None:
        sink = seq.sink
        if sink is None:
            return
        if self._outbox is not None and type(sink) is LoopSink:
            self._outbox.setdefault(sink.loop, []).append((sink.put, out))
            return
        try:
            sink(out)
        except Exception:  # a closed event loop must not kill the engine thread
            log.debug("sink of %s failed", seq.request_id, exc_info=True)

    def _flush(self) -> None:
        """Deliver the step's LoopSink outputs: one thread hop per event loop, not one per sequence."""
        outbox, self._outbox = self._outbox, None
        for loop, items in (outbox or {}).items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # loop closed
                pass
