"""Shared plumbing of the generation routes: OpenAI-shaped errors, model resolution, admission
(queue bound, per-tenant limit, context check), and the bridge from the engine thread to asyncio."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scaleserve.adapters.registry import AdapterNotFound

from ..engine import LoopSink, StepOutput
from ..scheduler import SamplingParams, Sequence

request_log = logging.getLogger("scaleserve.requests")
log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}


def error_body(status: int, message: str, param=None, code=None, type=None) -> dict:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code, e.type), status_code=e.status,
                        headers=e.headers)


def note_error(request: Request, kind: str, status: int, message: str) -> None:
    """A request answered with an error: scaleserve_errors_total{type=kind} and one structured log line (the
    requests that ran log theirs in release())."""
    m = getattr(request.app.state, "metrics", None)
    if m:
        m.error(kind)
    request_log.info(json.dumps({"event": "rejected", "method": request.method, "path": request.url.path,
                                 "status": status, "error": kind, "message": message[:300]}))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        note_error(request, e.code or e.type, e.status, e.message)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        detail = str(first.get("msg", "invalid request")).removeprefix("Value error, ")  # our validators' text
        msg = f"{'.'.join(loc) or 'request'}: {detail}"
        if first.get("type") == "json_invalid":  # (its loc is the byte offset, not a field)
            msg = f"the request body is not valid JSON: {(first.get('ctx') or {}).get('error', detail)} " \
                  f"(position {'.'.join(loc) or '?'})"
            loc = []
        note_error(request, "invalid_request", 400, msg)
        return JSONResponse(error_body(400, msg, ".".join(loc) or None, "invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code >= 400:
            note_error(request, f"http_{e.status_code}", e.status_code, detail)
        return JSONResponse(error_body(e.status_code, detail), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        msg = f"internal error: {type(e).__name__}"
        note_error(request, "internal", 500, msg)
        return JSONResponse(error_body(500, msg, code="internal_error"), status_code=500)


# --- model names -> adapters ----------------------------------------------------------------------


def base_model_name(app) -> str:
    return app.state.served_model_name


def resolve_model(request: Request, tenant, model: str):
    """-> (AdapterVersion or None for the base, label). 404 in OpenAI's shape for an unknown name."""
    if model == base_model_name(request.app):
        return None, "base"
    try:
        av = request.app.state.registry.resolve(tenant.name, model)
    except AdapterNotFound:
        raise APIError(404, f"The model `{model}` does not exist or you do not have access to it.", "model",
                       "model_not_found") from None
    return av, model


# --- admission -------------------------------------------------------------------------------------


def sampling_params(req, vocab: int, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                    sample: int = 0) -> SamplingParams:
    """The engine's parameters of one sequence; `sample` j of a request's n gets seed + j (or a random one),
    wrapped into int64 (the sampler's seeds are an int64 tensor; OpenAI takes any int64 seed)."""
    seed = ((req.seed + sample + 2**63) % 2**64 - 2**63) if req.seed is not None else random.getrandbits(62)
    stops = req.stop_list()
    if len(stops) > 4:
        raise APIError(400, "stop: at most 4 stop sequences", "stop", "invalid_value")
    if any(not s for s in stops):
        raise APIError(400, "stop: stop sequences must be non-empty", "stop", "invalid_value")
    bias = tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items())
    if any(t >= vocab for t, _ in bias):
        raise APIError(400, f"logit_bias: token ids must be in [0, {vocab})", "logit_bias", "invalid_value")
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=seed,
        stop=stops, stop_token_ids=frozenset(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, logit_bias=bias)


def check_prompt(request: Request, prompt_ids: list[int], max_tokens: int | None, param: str) -> int:
    """Validate the prompt against vocab and context; -> the effective max_tokens."""
    engine = request.app.state.engine
    if not prompt_ids:
        raise APIError(400, f"{param}: the prompt is empty", param, "invalid_value")
    vocab = engine.vocab
    if any(not (0 <= t < vocab) for t in prompt_ids):
        raise APIError(400, f"{param}: token ids must be in [0, {vocab})", param, "invalid_value")
    limit = engine.max_tokens_capacity()
    n = len(prompt_ids)
    if max_tokens is None:
        max_tokens = limit - n
        if max_tokens < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                           f"{n} tokens, leaving no room for a completion.", param, "context_length_exceeded")
    elif n + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                       f"Please reduce the length of the prompt or max_tokens.", "max_tokens",
                       "context_length_exceeded")
    return max_tokens


@dataclass
class Submitted:
    seq: Sequence
    queue: asyncio.Queue
    model: str
    tenant: str
    started: float = field(default_factory=time.monotonic)
    finished: bool = False


def submit_many(request: Request, tenant, model: str, adapter, adapter_label: str, prompts: list[list[int]],
                params: list[SamplingParams]) -> list[Submitted]:
    """Admission control, then hand a request's sequences (one per prompt and sample) to the engine, all
    together or none: each takes one queue place and one of the tenant's in-flight requests. 429 / 503 as
    OpenAI clients expect."""
    st = request.app.state
    if st.draining or not st.ready:
        raise APIError(503, "the server is shutting down" if st.draining else "the server is starting up",
                       code="unavailable", headers={"Retry-After": "1"})
    engine, k = st.engine, len(prompts)
    if engine.num_waiting + k > st.settings.max_waiting:
        raise APIError(429, f"the request queue is full ({st.settings.max_waiting} waiting); retry later",
                       code="queue_full", headers={"Retry-After": "1"})
    per_tenant = st.tenant_inflight
    if per_tenant.get(tenant.name, 0) + k > st.settings.tenant_max_concurrent:
        raise APIError(429, f"tenant {tenant.name!r} may have {st.settings.tenant_max_concurrent} requests in "
                       f"flight ({per_tenant.get(tenant.name, 0)} now, {k} asked); retry later",
                       code="tenant_concurrency_limit", headers={"Retry-After": "1"})
    subs = []
    for ids, p in zip(prompts, params):
        queue: asyncio.Queue = asyncio.Queue()
        sink = LoopSink(asyncio.get_running_loop(), queue.put_nowait)  # the engine batches these per step
        seq = Sequence(uuid.uuid4().hex[:24], ids, p, adapter=adapter, adapter_name=adapter_label,
                       tenant=tenant.name, sink=sink)
        per_tenant[tenant.name] = per_tenant.get(tenant.name, 0) + 1
        st.inflight += 1
        if st.metrics:
            st.metrics.count_adapter_request(adapter_label)
        engine.add(seq)
        subs.append(Submitted(seq, queue, model, tenant.name))
    return subs


def release(request: Request, sub: Submitted, status: int = 200, stream: bool = False) -> None:
    """Bookkeeping at the end of a request (normal, error or disconnect): abort if still running,
    free the tenant slot, log one structured line."""
    st = request.app.state
    if not sub.finished:  # disconnect or error before the end: free its KV blocks next step
        st.engine.abort(sub.seq)
    n = st.tenant_inflight.get(sub.tenant, 1) - 1
    if n <= 0:
        st.tenant_inflight.pop(sub.tenant, None)
    else:
        st.tenant_inflight[sub.tenant] = n
    st.inflight -= 1
    seq = sub.seq
    ttft = None if seq.first_token_at is None else round(seq.first_token_at - seq.arrival, 4)
    request_log.info(json.dumps({
        "event": "request", "id": seq.request_id, "tenant": sub.tenant, "model": sub.model,
        "adapter": seq.adapter_name, "adapter_version": getattr(seq.adapter, "version", None),
        "prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.output_ids),
        "finish_reason": seq.finish_reason or "disconnect", "status": status, "stream": stream,
        "ttft_s": ttft, "latency_s": round(time.monotonic() - seq.arrival, 4),
        "preemptions": seq.num_preemptions}))


async def next_outputs(sub: Submitted) -> list[StepOutput]:
    """Wait for the next output, then take whatever else is already queued (a stream that fell behind
    sends several steps' events in one write), stopping at the last one."""
    q = sub.queue
    out = await q.get()
    outs = [out]
    while not out.finished and not q.empty():
        out = q.get_nowait()
        outs.append(out)
    if out.finished:
        sub.finished = True
    return outs


async def collect(sub: Submitted) -> tuple[list[StepOutput], StepOutput]:
    """Wait for the whole sequence (non-streaming)."""
    outs = []
    while True:
        outs += await next_outputs(sub)
        if sub.finished:
            return outs, outs[-1]


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away. The body was read already, so the server's next message
    is the disconnect (read the way Request.is_disconnected reads it)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def finish_error(out: StepOutput) -> APIError | None:
    if out.finish_reason == "error":
        return APIError(500, f"generation failed: {out.error}", code="engine_error")
    if out.finish_reason == "abort":
        return APIError(503, "the request was cancelled: the server is shutting down", code="unavailable")
    return None


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class SSETemplate:
    """sse(obj) with one string field left open: built once per stream, then each event splices in just
    its text (json.dumps of one string instead of the whole chunk). tpl(v) == sse(obj with SPLICE -> v)."""

    SPLICE = "\x00splice\x00"

    def __init__(self, obj):
        marker = json.dumps(self.SPLICE).encode()
        full = sse(obj)
        assert full.count(marker) == 1, "the template needs exactly one SSETemplate.SPLICE field"
        self.head, self.tail = full.split(marker)

    def __call__(self, value: str) -> bytes:
        return self.head + json.dumps(value, ensure_ascii=False).encode() + self.tail


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def usage(lasts: list[StepOutput]) -> dict:
    """The usage block of a request from its sequences' last outputs (summed over a batch of prompts)."""
    prompt = sum(o.prompt_tokens for o in lasts)
    completion = sum(o.completion_tokens for o in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id])


async def complete(request: Request, subs: list[Submitted], render) -> JSONResponse:
    """A non-streamed answer: wait for every sequence's whole output, `render([(outs, last), ...])` them
    (in prompt order) into the response body, and release the slots whatever happens (499 if the
    client went away)."""
    status = 200
    gathered = asyncio.ensure_future(asyncio.gather(*(collect(sub) for sub in subs)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        # the client may leave while tokens still come: watch for it all along, not only in a lull
        await asyncio.wait((gathered, gone), return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            raise asyncio.CancelledError("client disconnected")
        results = gathered.result()
        for _, last in results:
            err = finish_error(last)
            if err is not None:
                status = err.status
                raise err
        return JSONResponse(render(results))
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        gone.cancel()
        gathered.cancel()
        for sub in subs:
            release(request, sub, status)


async def _merged_outputs(subs: list[Submitted]):
    """(i, outputs) of several sequences as they come: one reader task per sequence into one queue."""
    merged: asyncio.Queue = asyncio.Queue()

    async def read(i, sub):
        while not sub.finished:
            merged.put_nowait((i, await next_outputs(sub)))

    tasks = [asyncio.create_task(read(i, sub)) for i, sub in enumerate(subs)]
    try:
        while True:
            yield await merged.get()
    finally:
        for t in tasks:
            t.cancel()


async def stream_events(request: Request, subs: list[Submitted], render, final=None, first: bytes = b""):
    """The SSE body of one streamed request (one or several sequences). Each output of sequence i
    becomes `render(i, out)` (a list of encoded events); once every sequence finished, `final(lasts)`
    adds the closing events (usage); an engine error becomes an OpenAI error event; `data: [DONE]`
    closes the stream; the slots are released however the stream ends (499 when the client went away)."""
    status = 200
    single = len(subs) == 1
    merged = None if single else _merged_outputs(subs)
    lasts: dict[int, StepOutput] = {}
    try:
        if first:
            yield first
        done = False
        while not done:
            i, outs = (0, await next_outputs(subs[0])) if single else await merged.__anext__()
            parts = []
            for out in outs:
                err = finish_error(out)
                if err is not None:
                    status = err.status
                    parts.append(sse({"error": {"message": err.message, "type": err.type, "param": None,
                                                "code": err.code}}))
                    done = True
                    break
                parts.extend(render(i, out))
                if out.finished:
                    lasts[i] = out
                    if len(lasts) == len(subs):
                        done = True
                        if final is not None:
                            parts.extend(final([lasts[j] for j in range(len(subs))]))
                    break
            if done:
                parts.append(SSE_DONE)
            yield b"".join(parts)
    except (asyncio.CancelledError, GeneratorExit):
        status = 499
        raise
    finally:
        if merged is not None:
            await merged.aclose()
        for sub in subs:
            release(request, sub, status, stream=True)
