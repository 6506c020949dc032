"""Sequences and the continuous-batching scheduler (engine thread only).

Every step the scheduler picks, under a token budget (settings.max_num_batched_tokens):
  1. running sequences that decode (1 token each), oldest first;
  2. running sequences still in prefill, oldest first, each a chunk of what is left of its prompt;
  3. waiting sequences, FIFO, while there are free batch slots, budget, KV blocks and adapter slots.
So prefill and decode share a step, long prompts are chunked, and requests join and leave the
batch every step. KV blocks are taken on demand; when a running sequence needs a block and none is
free, the newest running sequence is preempted (its blocks freed, its adapter released) and goes
back to the front of the queue; on readmission it recomputes prompt + generated tokens.

With prefix caching (settings.prefix_caching), each full block of a prompt has a hash of its tokens, the
tokens before it, the tenant and the adapter version (whose K/V they are). Once its K/V are computed the block
is registered with the allocator; a sequence admitted later with the same leading blocks takes them and starts
its prefill after them. The block holding the last prompt token is always computed (its logits sample the
first token), so only whole blocks before it are taken, and scoring requests (prompt logprobs) take none.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from scaleserve.adapters.slab import SlabFull, SlotRef

from .kv_cache import BlockAllocator


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None = off; k >= 0 = the chosen token's logprob + k alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs added to the logits before sampling


class Status(Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


_seq_ids = itertools.count(1)


@dataclass
class Sequence:
    """One request's state. The engine thread owns every field except `aborted` (set via Engine.abort)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: object = None  # AdapterVersion resolved at admission (None = base); kept for life
    adapter_name: str = "base"
    tenant: str = "default"
    sink: object = None  # callable(StepOutput) run on the engine thread; must not block
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    slot: SlotRef | None = None  # adapter slab slot while running
    status: Status = Status.WAITING
    finish_reason: str | None = None
    aborted: bool = False
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_preemptions: int = 0
    # sampled tokens still on their way to the host (Engine overlap: up to 2, the last step's and the
    # one being computed); they count in num_tokens, so the scheduler sees a decode row, but are not in
    # output_ids yet
    inflight: int = 0
    prompt_logprobs: list = field(default_factory=list)  # engine.TokenLogprob of prompt tokens 1.. (scoring)
    # prefix caching: the hashes of the prompt's full blocks (made at first need), how many are registered
    block_hashes: list[bytes] | None = None
    num_registered: int = 0
    # incremental detokenization (detokenizer.py)
    text: str = ""  # emitted text (stop strings removed)
    prefix_offset: int = 0
    read_offset: int = 0
    held: str = ""  # decoded but withheld: might be the start of a stop string

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.inflight

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 registry=None, prefix_caching: bool = False):
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.registry = registry  # AdapterRegistry: acquire/release slab slots
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_query_tokens = 0  # prompt tokens admitted with prefix caching on, and those found cached
        self.prefix_hit_tokens = 0

    def block_hashes(self, seq: Sequence) -> list[bytes]:
        """The chained hashes of seq's full prompt blocks: block i's covers the tenant, the adapter version and
        prompt tokens 0 .. (i + 1) * block_size - 1 (blake2b: a collision would hand one prompt another's K/V)."""
        if seq.block_hashes is None:
            ids = array("I", seq.prompt_ids)
            step, raw = ids.itemsize * self.block_size, ids.tobytes()  # (step: the bytes of a block's ids)
            key = seq.adapter.key if seq.adapter is not None else None
            h = hashlib.blake2b(repr((seq.tenant, key)).encode(), digest_size=16).digest()
            out = []
            for i in range(len(raw) // step):
                h = hashlib.blake2b(h + raw[i * step:(i + 1) * step], digest_size=16).digest()
                out.append(h)
            seq.block_hashes = out
        return seq.block_hashes

    def _register(self, seq: Sequence) -> None:
        """Offer seq's computed full prompt blocks to the prefix cache."""
        done = min(seq.num_computed, len(seq.prompt_ids)) // self.block_size
        if done > seq.num_registered:
            hashes = self.block_hashes(seq)
            for i in range(seq.num_registered, done):
                self.allocator.register(seq.blocks[i], hashes[i])
            seq.num_registered = done

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """A sequence about to be admitted starts after the cached blocks of its prompt (whole blocks before the
        one holding its last prompt token)."""
        if seq.params.prompt_logprobs is not None or seq.num_computed or seq.blocks:
            return
        usable = (len(seq.prompt_ids) - 1) // self.block_size
        seq.blocks = self.allocator.lookup(self.block_hashes(seq)[:usable])
        seq.num_computed = len(seq.blocks) * self.block_size
        seq.num_registered = len(seq.blocks)

    def _untake(self, seq: Sequence) -> None:
        """Undo _take_cached_prefix for a sequence that stays waiting."""
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks, seq.num_computed, seq.num_registered = [], 0, 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_needed(self, seq: Sequence, n: int) -> int:
        want = -(-(seq.num_computed + n) // self.block_size)
        return max(0, want - len(seq.blocks))

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            if self.prefix_caching:
                self._register(seq)
            self.allocator.free(seq.blocks)
            seq.blocks = []
            seq.num_registered = 0
        if seq.slot is not None:
            if self.registry is not None:
                self.registry.release(seq.adapter)
            seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Drop a sequence wherever it is; frees its KV blocks and adapter pin at once."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> [(sequence, number of new tokens)] for this step, in running-batch order."""
        budget = self.max_num_batched_tokens
        out: list[tuple[Sequence, int]] = []
        preempted = False
        if self.prefix_caching:
            for seq in self.running:
                self._register(seq)
        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        for seq in decoding + prefilling:
            if budget <= 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.blocks_needed(seq, n)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                out = [(s, k) for s, k in out if s is not victim]
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            seq.blocks += self.allocator.allocate(need)
            out.append((seq, n))
            budget -= n
        budget = self.max_num_batched_tokens - sum(k for _, k in out)
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.prefix_caching:
                self._take_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.blocks_needed(seq, n)
            if need > self.allocator.num_free:
                self._untake(seq)
                break
            if self.registry is not None:
                try:
                    seq.slot = self.registry.acquire(seq.adapter)
                except SlabFull:
                    self._untake(seq)
                    break  # every slot of its table is pinned by running sequences: wait for one
            else:
                from scaleserve.adapters.slab import BASE

                seq.slot = BASE
            self.waiting.popleft()
            if self.prefix_caching and seq.params.prompt_logprobs is None:
                self.prefix_query_tokens += len(seq.prompt_ids)
                self.prefix_hit_tokens += seq.num_computed
            seq.blocks += self.allocator.allocate(need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out
