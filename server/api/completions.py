"""POST /v1/completions (OpenAI legacy completions: a prompt or a batch of prompts, text or token ids;
n completions each). A batch of k prompts is k * n sequences in the engine (admitted together or not at
all) and as many choices, index i * n + j for sample j of prompt i; streamed, their chunks interleave as
they are produced. `echo` puts the prompt before the completion (streamed: each choice's first chunk);
with `logprobs` it scores every prompt token (None for the first, as OpenAI), and with max_tokens 0 it only
scores (what evaluation harnesses ask for loglikelihoods)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..auth import Tenant, get_tenant
from ..engine import StepOutput
from ..schemas import CompletionRequest, ErrorResponse
from .common import (SSE_HEADERS, APIError, check_prompt, complete, resolve_model, sampling_params, sse,
                     SSETemplate, stream_events, submit_many, token_text, usage)

router = APIRouter(tags=["openai"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 429, 503)}


MAX_BATCH_PROMPTS = 64


def prompt_batch(tok, prompt) -> tuple[list, list[list[int]]]:
    """The request's prompts as given and as token ids: a string or a token list is one prompt, a list of
    either a batch."""
    if isinstance(prompt, list) and len(prompt) == 0:
        raise APIError(400, "prompt: must not be empty", "prompt", "invalid_value")
    given = prompt if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else [prompt]
    if len(given) > MAX_BATCH_PROMPTS:
        raise APIError(400, f"prompt: at most {MAX_BATCH_PROMPTS} prompts in one request, got {len(given)}",
                       "prompt", "invalid_value")
    return given, [tok.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in given]


def prompt_logprobs_block(tok, ids: list[int], lps) -> dict:
    """The logprobs block of an echoed prompt: its tokens, None then each later token's logprob."""
    tokens = [token_text(tok, t) for t in ids]
    offsets = [0]
    for t in tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    return {"tokens": tokens, "token_logprobs": [None] + [lp.logprob for lp in lps],
            "top_logprobs": [None] + [{token_text(tok, t): v for t, v in lp.top} if lp.top else None for lp in lps],
            "text_offset": offsets}


def logprobs_block(tok, outs, start_offset: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    off = start_offset
    for out in outs:
        for lp in out.logprobs or ():
            s = token_text(tok, lp.token_id)
            tokens.append(s)
            token_lps.append(lp.logprob)
            tops.append({token_text(tok, t): v for t, v in lp.top} if lp.top else None)
            offsets.append(off)
            off += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions", responses=ERRORS)
async def create_completion(body: CompletionRequest, request: Request, tenant: Tenant = Depends(get_tenant)):
    st = request.app.state
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens: 0 needs echo (to score the prompt)", "max_tokens", "invalid_value")
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix", "unsupported")
    adapter, label = resolve_model(request, tenant, body.model)
    tok = st.lm.tokenizer
    given, batch = prompt_batch(tok, body.prompt)
    score_only = body.max_tokens == 0  # generates one token internally, returns none
    max_tokens = [check_prompt(request, ids, 1 if score_only else body.max_tokens, "prompt") for ids in batch]
    want_lp = body.logprobs is not None
    prompt_lp = body.logprobs if body.echo and want_lp else None
    if len(batch) * body.n > MAX_BATCH_PROMPTS:
        raise APIError(400, f"n: {len(batch)} prompts x n = {body.n} is more than {MAX_BATCH_PROMPTS} completions",
                       "n", "invalid_value")
    vocab = request.app.state.engine.vocab
    params = [sampling_params(body, vocab, m, body.logprobs, prompt_lp, j) for m in max_tokens for j in range(body.n)]
    batch = [ids for ids in batch for _ in range(body.n)]  # choice i * n + j: sample j of prompt i
    subs = submit_many(request, tenant, body.model, adapter, label, batch, params)
    rid, created = f"cmpl-{subs[0].seq.request_id}", int(time.time())
    echo_of = None
    if body.echo:
        def echo_of(i):
            return _prompt_echo(given[i // body.n], batch[i], subs[i].seq, tok, want_lp)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(request, subs, rid, created, body.model, include_usage, want_lp, tok,
                                         echo_of, score_only),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await complete(request, subs, lambda results: _response(results, echo_of, score_only, want_lp, rid,
                                                                   created, body.model, tok))


def _prompt_echo(given, ids: list[int], seq, tok, want_lp: bool) -> tuple[str, dict | None]:
    """An echoed prompt: the prompt as given (token ids decoded), and with logprobs its scored tokens."""
    text = given if isinstance(given, str) else tok.decode(ids)
    return text, prompt_logprobs_block(tok, ids, seq.prompt_logprobs) if want_lp else None


def _chars(text: str, lp: dict | None) -> int:
    """Where the completion's text_offset starts after an echoed prompt."""
    return sum(len(t) for t in lp["tokens"]) if lp else len(text)


def _usage(lasts, score_only: bool) -> dict:
    if score_only:  # the one token generated internally is not returned
        lasts = [StepOutput([], "", prompt_tokens=o.prompt_tokens) for o in lasts]
    return usage(lasts)


def _response(results, echo_of, score_only, want_lp, rid, created, model, tok) -> dict:
    """The non-streamed response: a choice per sequence, its text (after its echoed prompt) and with
    logprobs its tokens (the prompt's scored ones first)."""
    choices = []
    for i, (outs, last) in enumerate(results):
        outs = [] if score_only else outs
        text, lp = echo_of(i) if echo_of else ("", None)
        if want_lp:
            gen = logprobs_block(tok, outs, _chars(text, lp))
            lp = gen if lp is None else {k: lp[k] + gen[k] for k in lp}
        choices.append({"index": i, "text": text + "".join(o.text for o in outs), "logprobs": lp,
                        "finish_reason": last.finish_reason})
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": _usage([last for _, last in results], score_only)}


def _stream(request, subs, rid, created, model, include_usage, want_lp, tok, echo_of=None, score_only=False):
    offsets = [0] * len(subs)  # characters streamed so far per choice: logprobs' text_offset
    echoed = [echo_of is None] * len(subs)  # with echo, each choice's first chunk is its prompt

    def chunk(i, text, lp=None, finish=None) -> dict:
        c = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return c

    # the common event per choice: new text, no logprobs, not last
    text_events = [SSETemplate(chunk(i, SSETemplate.SPLICE)) for i in range(len(subs))]

    def render(i, out) -> list[bytes]:
        parts = []
        if not echoed[i]:  # the prompt is scored by now: its first output comes after its prefill
            text, lp = echo_of(i)
            parts.append(sse(chunk(i, text, lp)))
            offsets[i] = _chars(text, lp)
            echoed[i] = True
        if score_only:
            if out.finished:
                parts.append(sse(chunk(i, "", None, out.finish_reason)))
            return parts
        if not (out.text or out.finished or out.logprobs):
            return parts
        if not want_lp and not out.finished:
            parts.append(text_events[i](out.text))
        else:
            lp = logprobs_block(tok, [out], offsets[i]) if want_lp else None
            parts.append(sse(chunk(i, out.text, lp, out.finish_reason if out.finished else None)))
        offsets[i] += len(out.text)
        return parts

    def final(lasts) -> list[bytes]:
        if not include_usage:
            return []
        return [sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                     "usage": _usage(lasts, score_only)})]

    return stream_events(request, subs, render, final)
