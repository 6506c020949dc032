"""Incremental detokenization and stop strings, for the engine's step 6 (engine thread only).

Each step decodes, per sequence, two short token windows (before and after the new tokens) and emits the
difference; stop strings are matched on the text, with a suffix that could still become a stop string held
back until the next token decides.
"""

from __future__ import annotations

import logging

from .scheduler import Sequence

log = logging.getLogger(__name__)


class Detokenizer:
    """decode_many(windows) == [tok.decode(w, skip_special_tokens=True) for w in windows], calling the Rust
    tokenizer directly: transformers' per-call Python wrapper costs ~4x the decode itself. Falls back to
    tok.decode for tokenizers without a Rust backend, with a custom decode, or whose fast path disagrees
    with tok.decode on a probe."""

    def __init__(self, tok, vocab_size: int | None = None):
        self.tok = tok
        self.backend = None
        self.clean = False
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:  # another transformers layout: the plain path
            return
        cls = type(tok)
        if not isinstance(tok, TokenizersBackend) or cls._decode is not TokenizersBackend._decode or \
                cls.decode is not TokenizersBackend.decode:
            return
        backend = tok.backend_tokenizer
        clean = bool(tok.clean_up_tokenization_spaces)
        if clean and type(backend.model).__name__ == "BPE" and not getattr(
                tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False):
            clean = False
        self.backend, self.clean = backend, clean
        n = min(vocab_size or len(tok), len(tok))
        probe = [list(range(i, min(n, i + 5))) for i in range(0, n, max(1, n // 64))]
        if self.decode_many(probe) != [tok.decode(w, skip_special_tokens=True) for w in probe]:
            log.warning("fast detokenization disagrees with tokenizer.decode: using the slow path")
            self.backend = None

    def decode_many(self, windows: list[list[int]]) -> list[str]:
        if self.backend is None:
            return [self.tok.decode(w, skip_special_tokens=True) for w in windows]
        decode = self.backend.decode  # a loop beats decode_batch: its thread pool costs more than short windows
        texts = [decode(w, skip_special_tokens=True) for w in windows]
        if self.clean:
            texts = [self.tok.clean_up_tokenization(t) for t in texts]
        return texts


def window_delta(seq: Sequence, prefix: str, full: str, final: bool) -> str:
    """New text of seq.output_ids since the last call, from the decoded windows ids[prefix_offset:read_offset]
    (`prefix`) and ids[prefix_offset:] (`full`); advances the offsets. Decoding a short window makes
    multi-token characters come out whole: a trailing U+FFFD means "wait for the next token", unless `final`."""
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.output_ids)
        return full[len(prefix) :]
    return ""


def tail(text: str, n: int) -> str:
    """The last n characters of text ("" for n = 0, where text[-0:] would be all of it)."""
    return text[max(0, len(text) - n) :] if n > 0 else ""


def cut_stop(seq: Sequence, delta: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """-> (text to emit now, whether a stop string matched). Withholds a suffix that could still grow
    into a stop string; `final` flushes it."""
    pending = seq.held + delta
    if not stops:
        seq.held = ""
        return pending, False
    window = tail(seq.text, max(len(s) for s in stops) - 1)  # emitted text a stop string may start in
    hay = window + pending
    best = -1
    for s in stops:
        i = hay.find(s)
        if i >= 0 and (best < 0 or i < best):
            best = i
    if best >= 0:
        seq.held = ""
        return pending[: max(0, best - len(window))], True
    if final:
        seq.held = ""
        return pending, False
    hold = 0
    for s in stops:  # longest suffix of hay that is a proper prefix of a stop string
        for k in range(min(len(s) - 1, len(hay)), hold, -1):
            if hay.endswith(s[:k]):
                hold = k
                break
    hold = min(hold, len(pending))
    seq.held = pending[len(pending) - hold :] if hold else ""
    return pending[: len(pending) - hold], False
