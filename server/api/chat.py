"""POST /v1/chat/completions: the tokenizer's chat template, then the same engine path as completions."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..auth import Tenant, get_tenant
from ..schemas import ChatCompletionRequest, ErrorResponse
from .common import (SSE_HEADERS, APIError, check_prompt, complete, resolve_model, sampling_params, sse,
                     SSETemplate, stream_events, submit_many, token_text, usage)

router = APIRouter(tags=["openai"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 429, 503)}


def _content(c) -> str:
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    parts = []
    for p in c:  # OpenAI content parts: only text is understood
        if p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise APIError(400, "messages: only text content parts are supported", "messages", "invalid_value")
        parts.append(p["text"])
    return "".join(parts)


def chat_prompt_ids(tok, messages) -> list[int]:
    msgs = [{"role": m.role if m.role != "developer" else "system", "content": _content(m.content)}
            for m in messages]
    if getattr(tok, "chat_template", None) is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages", "unsupported")
    try:
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as e:  # a template may reject some role sequences
        raise APIError(400, f"messages: the chat template rejected them ({e})", "messages", "invalid_value") \
            from None
    return list(out["input_ids"])


def _lp_entry(tok, token_id: int, logprob: float) -> dict:
    s = token_text(tok, token_id)
    return {"token": s, "logprob": logprob, "bytes": list(s.encode())}


def logprobs_content(tok, outs) -> list[dict]:
    items = []
    for out in outs:
        for lp in out.logprobs or ():
            e = _lp_entry(tok, lp.token_id, lp.logprob)
            e["top_logprobs"] = [_lp_entry(tok, t, v) for t, v in lp.top]
            items.append(e)
    return items


@router.post("/v1/chat/completions", responses=ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 tenant: Tenant = Depends(get_tenant)):
    st = request.app.state
    adapter, label = resolve_model(request, tenant, body.model)
    tok = st.lm.tokenizer
    ids = chat_prompt_ids(tok, body.messages)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if asked == 0:
        raise APIError(400, "max_tokens: must be at least 1", "max_tokens", "invalid_value")
    max_tokens = check_prompt(request, ids, asked, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    params = [sampling_params(body, request.app.state.engine.vocab, max_tokens, logprobs, None, j)
              for j in range(body.n)]
    subs = submit_many(request, tenant, body.model, adapter, label, [ids] * body.n, params)
    rid, created = f"chatcmpl-{subs[0].seq.request_id}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(request, subs, rid, created, body.model, include_usage, logprobs, tok),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await complete(request, subs, lambda results: {
        "id": rid, "object": "chat.completion", "created": created, "model": body.model,
        "system_fingerprint": None,
        "choices": [{"index": i,
                     "message": {"role": "assistant", "content": "".join(o.text for o in outs)},
                     "logprobs": {"content": logprobs_content(tok, outs)} if logprobs is not None else None,
                     "finish_reason": last.finish_reason} for i, (outs, last) in enumerate(results)],
        "usage": usage([last for _, last in results]),
    })


def _stream(request, subs, rid, created, model, include_usage, logprobs, tok):
    want_lp = logprobs is not None

    def chunk(i: int, delta: dict, finish=None, lp=None) -> dict:
        c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None,
             "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return c

    # the common event per choice: new text only
    content_events = [SSETemplate(chunk(i, {"content": SSETemplate.SPLICE})) for i in range(len(subs))]

    def render(i, out) -> list[bytes]:
        parts = []
        lp = {"content": logprobs_content(tok, [out])} if want_lp and out.logprobs else None
        if lp:
            parts.append(sse(chunk(i, {"content": out.text}, lp=lp)))
        elif out.text:
            parts.append(content_events[i](out.text))
        if out.finished:
            parts.append(sse(chunk(i, {}, finish=out.finish_reason)))
        return parts

    def final(lasts) -> list[bytes]:
        if not include_usage:
            return []
        return [sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "system_fingerprint": None, "choices": [], "usage": usage(lasts)})]

    first = b"".join(sse(chunk(i, {"role": "assistant", "content": ""})) for i in range(len(subs)))
    return stream_events(request, subs, render, final, first=first)
