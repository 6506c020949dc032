"""POST /v1/completions (OpenAI legacy completions: one prompt, text or token ids; n = 1)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..auth import Tenant, get_tenant
from ..schemas import CompletionRequest, ErrorResponse
from .common import (SSE_HEADERS, APIError, check_prompt, complete, resolve_model, sampling_params, sse,
                     SSETemplate, stream_events, submit, token_text, usage)

router = APIRouter(tags=["openai"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 429, 503)}


def prompt_ids(tok, prompt) -> list[int]:
    if isinstance(prompt, list):
        if len(prompt) == 0:
            raise APIError(400, "prompt: must not be empty", "prompt", "invalid_value")
        if isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "prompt: batched prompts are not supported; send one prompt per request",
                               "prompt", "invalid_value")
            prompt = prompt[0]
    if isinstance(prompt, str):
        return tok.encode(prompt)
    return [int(t) for t in prompt]


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
    if body.echo:
        raise APIError(400, "echo is not supported", "echo", "unsupported")
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix", "unsupported")
    adapter, label = resolve_model(request, tenant, body.model)
    tok = st.lm.tokenizer
    ids = prompt_ids(tok, body.prompt)
    max_tokens = check_prompt(request, ids, body.max_tokens, "prompt")
    params = sampling_params(body, max_tokens, body.logprobs)
    sub = submit(request, tenant, body.model, adapter, label, ids, params)
    rid, created = f"cmpl-{sub.seq.request_id}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(request, sub, rid, created, body.model, include_usage, tok),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await complete(request, sub, lambda outs, last: {
        "id": rid, "object": "text_completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "text": "".join(o.text for o in outs),
                     "logprobs": logprobs_block(tok, outs) if params.logprobs is not None else None,
                     "finish_reason": last.finish_reason}],
        "usage": usage(last),
    })


def _stream(request, sub, rid, created, model, include_usage, tok):
    want_lp = sub.seq.params.logprobs is not None
    offset = 0  # characters streamed so far: logprobs' text_offset

    def chunk(text, lp=None, finish=None) -> dict:
        c = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return c

    text_event = SSETemplate(chunk(SSETemplate.SPLICE))  # the common event: new text, no logprobs, not last

    def render(out) -> list[bytes]:
        nonlocal offset
        parts = []
        if out.text or out.finished or out.logprobs:
            if not want_lp and not out.finished:
                parts.append(text_event(out.text))
            else:
                lp = logprobs_block(tok, [out], offset) if want_lp else None
                parts.append(sse(chunk(out.text, lp, out.finish_reason if out.finished else None)))
            offset += len(out.text)
        if out.finished and include_usage:
            parts.append(sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                              "choices": [], "usage": usage(out)}))
        return parts

    return stream_events(request, sub, render)
