"""A real uvicorn on a loopback port over the tiny model: the official openai client, streaming,
concurrent requests over several adapters, disconnects, queue limits, errors and metrics."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import re
import time

import httpx
import openai
import pytest
import torch

from scaleserve.adapters.format import load_adapter
from scaleserve.server.generate import generate_ids


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def stream_tokens(server, model: str, prompt, max_tokens: int = 16, logit_bias=None,
                  **extra) -> tuple[str, list[str]]:
    """Stream a greedy completion with the openai client (extra: fields it does not know); -> (text, finish
    reasons seen)."""
    c = client(server)
    text, reasons = [], []
    for chunk in c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      stream=True, logit_bias=logit_bias, extra_body=extra or None):
        for ch in chunk.choices:
            text.append(ch.text)
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    return "".join(text), reasons


def test_openai_client_completion_chat_and_models(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    again = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text
    chat = c.chat.completions.create(model="chan-a", messages=[{"role": "user", "content": "Hello robot"}],
                                     max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 for e in chat.choices[0].logprobs.content)
    models = {m.id: m for m in c.models.list().data}
    assert set(models) >= {"tiny", "chan-a", "chan-b", "group-a", "alpha-a"} and "broken" not in models
    assert models["chan-a"].parent == "tiny" and models["tiny"].parent is None
    assert models["tiny"].root == "tiny" and models["chan-a"].root.startswith("chan-a@v")  # no host paths
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_streaming_matches_non_streaming_and_usage(server):
    c = client(server)
    full = c.completions.create(model="group-a", prompt="The capital of France", max_tokens=12, temperature=0)
    text, reasons = stream_tokens(server, "group-a", "The capital of France", 12)
    assert text == full.choices[0].text and reasons == [full.choices[0].finish_reason]
    chunks = list(c.chat.completions.create(model="alpha-a", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 5
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")
    # the raw SSE framing: data lines, a final usage chunk, then [DONE]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "Bolt", "max_tokens": 3, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] <= 3


def test_concurrent_adapters_each_equal_alone_and_offline(server, tiny_lm, adapter_files):
    """Many streams over several adapters at once: each one's output is what it gets alone, and what
    offline generate_ids gives with that adapter."""
    tok = tiny_lm.tokenizer
    jobs = [(m, p) for m in ("tiny", "chan-a", "chan-b", "group-a", "alpha-a")
            for p in ("Once upon a time", "Adapters change the scales of")]
    alone = {job: stream_tokens(server, *job, 14)[0] for job in jobs}
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda j: stream_tokens(server, *j, 14)[0], jobs)))
    assert together == alone
    for (m, p), text in alone.items():
        adapter = None if m == "tiny" else load_adapter(adapter_files[m])
        ids, _ = generate_ids(tiny_lm, [tok.encode(p)], [adapter], max_new_tokens=14)
        assert text == tok.decode(ids[0], skip_special_tokens=True), (m, p)
    assert len(set(alone.values())) > len(jobs) // 2  # adapters do change the output


def test_disconnect_frees_kv_blocks(server):
    engine = server.state.engine
    alloc = engine.kv.allocator
    assert alloc.num_free == alloc.usable
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "chan-b", "prompt": "Once upon a time", "max_tokens": 230, "stream": True,
                            "ignore_eos": True}) as r:
        it = r.iter_lines()
        for _ in range(6):
            next(it)
        assert alloc.num_free < alloc.usable and engine.num_running == 1
    t0 = time.monotonic()
    while alloc.num_free != alloc.usable:  # freed within a step of the server noticing
        assert time.monotonic() - t0 < 5, "KV blocks not freed after disconnect"
        time.sleep(0.01)
    assert engine.num_running == 0
    # a streamed batch of prompts: every one of its sequences is cancelled
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "chan-b", "prompt": ["Once upon a time", "Bolt"], "max_tokens": 230,
                            "stream": True, "ignore_eos": True}) as r:
        seen = set()  # (until both prompts have streamed a token: one may be admitted a step after the other)
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.update(c["index"] for c in json.loads(line[6:])["choices"])
            if seen == {0, 1}:
                break
        assert seen == {0, 1} and engine.num_running == 2
    t0 = time.monotonic()
    while alloc.num_free != alloc.usable or server.state.inflight:
        assert time.monotonic() - t0 < 5, "KV blocks not freed after disconnect"
        time.sleep(0.01)
    assert engine.num_running == 0


def test_disconnect_cancels_a_non_streamed_request_while_it_generates(server):
    """A non-streamed request whose client goes away is aborted at once, even while its tokens keep coming
    (it used to notice only after a full second without output, i.e. never while it generated, and ran to
    max_tokens for nobody)."""
    import socket

    engine = server.state.engine
    alloc = engine.kv.allocator
    body = json.dumps({"model": "chan-b", "prompt": "Once upon a time", "max_tokens": 230,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    t0 = time.monotonic()
    while not (engine.scheduler.running and engine.scheduler.running[0].output_ids):
        assert time.monotonic() - t0 < 30, "the request never started generating"
        time.sleep(0.001)
    seq = engine.scheduler.running[0]
    sock.close()
    t0 = time.monotonic()
    while seq.finish_reason is None or server.state.inflight:
        assert time.monotonic() - t0 < 30, "the request was never released"
        time.sleep(0.01)
    assert seq.finish_reason == "abort" and len(seq.output_ids) < 230, (seq.finish_reason, len(seq.output_ids))
    t0 = time.monotonic()
    while alloc.num_free != alloc.usable:
        assert time.monotonic() - t0 < 5, "KV blocks not freed after disconnect"
        time.sleep(0.01)


def test_null_optional_fields_mean_their_defaults(server):
    """The openai client sends an explicit None as null, and OpenAI's API takes null for its optional fields
    as "not given": the same answer as leaving them out, not a 400."""
    c = client(server)
    nulls = dict(temperature=None, top_p=None, n=None, presence_penalty=None, frequency_penalty=None, stream=None,
                 seed=None, stop=None, user=None, logit_bias=None)
    plain = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6,
                             **{**nulls, "temperature": 0}, echo=None, logprobs=None, best_of=None, suffix=None)
    assert r.choices[0].text == plain.choices[0].text and len(r.choices) == 1 and r.choices[0].logprobs is None
    r = c.completions.create(model="tiny", prompt="Once", max_tokens=3, **nulls)
    assert len(r.choices) == 1 and r.usage.completion_tokens <= 3
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                     **nulls, logprobs=None, top_logprobs=None, max_completion_tokens=None,
                                     stream_options=None, response_format=None, tools=None, tool_choice=None)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].logprobs is None


def test_errors_in_openai_shape(server):
    with httpx.Client(base_url=server.url, timeout=30) as h:
        cases = [
            ({"model": "tiny", "prompt": "x", "temperature": 9}, 400, "invalid_request"),
            ({"model": "tiny", "prompt": "x", "max_tokens": 100000}, 400, "context_length_exceeded"),
            ({"model": "tiny", "prompt": "word " * 300}, 400, "context_length_exceeded"),
            ({"model": "tiny", "prompt": [1, 2, 99999]}, 400, "invalid_value"),
            ({"model": "tiny", "prompt": ""}, 400, "invalid_value"),
            ({"model": "ghost", "prompt": "x"}, 404, "model_not_found"),
            ({"prompt": "x"}, 400, "invalid_request"),
        ]
        for body, status, code in cases:
            r = h.post("/v1/completions", json=body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
            assert err["type"] == "invalid_request_error", err  # OpenAI's type for all of these, 404 included
        # OpenAI features this server does not implement: a 400 that names them, never silently ignored
        unsupported = [
            ("response_format", {"type": "json_object"}),
            ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
            ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}), ("best_of", 2)]
        for field, value in unsupported:
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", field: value})
            assert r.status_code == 400, (field, r.text)
            err = r.json()["error"]
            assert err["param"] == field and err["message"].startswith(f"{field}: ") and \
                "not supported by this server" in err["message"], err
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = h.post("/v1/chat/completions", json={**chat, "response_format": {"type": "json_schema"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        # ... while their no-op values are accepted, as clients send them
        for extra in ({"logit_bias": {}}, {"response_format": {"type": "text"}}, {"tools": []},
                      {"tool_choice": "none"}, {"tool_choice": "auto"}, {"best_of": 1}):
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, **extra})
            assert r.status_code == 200, (extra, r.text)
        r = h.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        err = r.json()["error"]  # (it said "1: JSON decode error", with the byte offset as its param)
        assert r.status_code == 400 and err["message"].startswith("the request body is not valid JSON") and \
            "position 1" in err["message"] and err["param"] is None, err
        # stream_options without stream: OpenAI refuses it rather than ignore it
        for path, body in (("/v1/completions", {"model": "tiny", "prompt": "x"}), ("/v1/chat/completions", chat)):
            r = h.post(path, json={**body, "max_tokens": 2, "stream_options": {"include_usage": True}})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "stream_options" and "stream" in err["message"], err
        assert h.get("/health").json() == {"status": "ok"}
        assert h.get("/ready").status_code == 200


def test_one_structured_log_line_per_request(server, caplog):
    """Each request that ran logs one JSON line (adapter, tokens, latency, status, stream) when it ends; each
    request answered with an error logs one too (path, status, error type), and counts in scaleserve_errors_total."""
    caplog.set_level(logging.INFO, logger="scaleserve.requests")

    def lines(event: str, want: int, pick=lambda d: True) -> list[dict]:
        deadline = time.monotonic() + 10  # (a stream's line comes when the server has released it)
        while True:
            got = [json.loads(r.getMessage()) for r in caplog.records if r.name == "scaleserve.requests"]
            got = [d for d in got if d["event"] == event and pick(d)]
            if len(got) >= want or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    c = client(server)
    r = c.completions.create(model="chan-a", prompt="the cat", max_tokens=5, temperature=0)
    (line,) = lines("request", 1, lambda d: r.id.endswith(d["id"]))
    assert line["adapter"] == "chan-a" and line["model"] == "chan-a" and line["status"] == 200
    assert (line["prompt_tokens"], line["completion_tokens"]) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    assert line["finish_reason"] == r.choices[0].finish_reason and line["stream"] is False
    assert 0 < line["ttft_s"] <= line["latency_s"]
    text, _ = stream_tokens(server, "tiny", "a dog", max_tokens=4)
    streamed = lines("request", 1, lambda d: d["stream"] and d["model"] == "tiny" and d["completion_tokens"] == 4)
    assert streamed and streamed[-1]["adapter"] == "base" and streamed[-1]["status"] == 200
    before = metric(server, "scaleserve_errors_total", '{type="model_not_found"}')
    with httpx.Client(base_url=server.url, timeout=30) as h:
        assert h.post("/v1/completions", json={"model": "ghost", "prompt": "x"}).status_code == 404
        assert h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": 9}).status_code == 400
    (missing,) = lines("rejected", 1, lambda d: d["error"] == "model_not_found")
    assert missing["status"] == 404 and missing["path"] == "/v1/completions" and "ghost" in missing["message"]
    (invalid,) = lines("rejected", 1, lambda d: d["error"] == "invalid_request")
    assert invalid["status"] == 400 and "temperature" in invalid["message"]
    assert metric(server, "scaleserve_errors_total", '{type="model_not_found"}') == before + 1


def test_not_ready_gives_503_with_retry_after(server, caplog):
    """Until the model is loaded and warmed up (app.state.ready), /ready is 503 and every /v1 request gets a 503
    in OpenAI's shape with Retry-After, counted and logged as rejected; /health stays 200."""
    caplog.set_level(logging.INFO, logger="scaleserve.requests")
    before = metric(server, "scaleserve_errors_total", '{type="unavailable"}')
    server.state.ready = False
    try:
        with httpx.Client(base_url=server.url, timeout=30) as h:
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "unavailable" and "starting up" in r.json()["error"]["message"]
            assert h.get("/v1/models").status_code == 503
            assert h.get("/ready").status_code == 503 and h.get("/health").status_code == 200
    finally:
        server.state.ready = True
    assert metric(server, "scaleserve_errors_total", '{type="unavailable"}') == before + 2
    rejected = [json.loads(r.getMessage()) for r in caplog.records if r.name == "scaleserve.requests"]
    assert [(d["path"], d["status"]) for d in rejected if d.get("error") == "unavailable"][-2:] == \
        [("/v1/completions", 503), ("/v1/models", 503)]
    again = client(server).completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"ignore_eos": True})
    assert again.usage.completion_tokens == 2


def test_logit_bias_steers_sampling(server, tiny_lm):
    """OpenAI's logit_bias: +100 on a token makes it every greedy and every sampled token; -100 on the greedy
    token makes the greedy choice another one; completions and chat, streamed or not. Bad maps are a 400 on the
    field."""
    c, tok = client(server), tiny_lm.tokenizer
    prompt = "Once upon a time"
    ids, _ = generate_ids(tiny_lm, [tok.encode(prompt)], [None], max_new_tokens=1)
    greedy = ids[0][0]
    forced = (greedy + 7) % server.state.engine.vocab
    want = tok.decode([forced] * 4, skip_special_tokens=True)
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3, "top_p": 0.9}):
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, logit_bias={str(forced): 100},
                                 extra_body={"ignore_eos": True}, **sampling)
        assert r.choices[0].text == want and r.usage.completion_tokens == 4, (sampling, r.choices[0].text)
    text, _ = stream_tokens(server, "tiny", prompt, 4, logit_bias={str(forced): 100}, ignore_eos=True)
    assert text == want
    chat = c.chat.completions.create(model="chan-a", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     temperature=0, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == want
    plain = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0)
    banned = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0,
                                  logit_bias={str(greedy): -100})
    assert plain.choices[0].text == tok.decode([greedy], skip_special_tokens=True)
    assert banned.choices[0].text != plain.choices[0].text
    lp = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                              logit_bias={str(forced): 100}).choices[0].logprobs
    assert lp.token_logprobs[0] > -1e-3  # the logprobs are the biased distribution's
    vocab = server.state.engine.vocab
    with httpx.Client(base_url=server.url, timeout=30) as h:
        for bias, says in (({"abc": 1}, "token ids"), ({"5": 101}, "[-100, 100]"), ({"-5": 1}, "token ids"),
                           ({str(vocab): 1}, f"[0, {vocab})"), ({str(i): 1 for i in range(301)}, "at most 300")):
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1, "logit_bias": bias})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "logit_bias" and says in err["message"], (bias, err)


def test_prefix_caching_over_http(server, start_server, adapter_files):
    """--prefix-caching: a conversation's second turn (its first turn's prompt and more) takes the first turn's
    blocks, streams what a server without the cache gives, and the metrics count the tokens it found."""
    cached = start_server(adapters=str(next(iter(adapter_files.values())).parent), prefix_caching=True)
    system = "You are a terse assistant. Answer in one line. " * 4
    turns = [[{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]]
    turns.append(turns[0] + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}])
    for model in ("tiny", "chan-a"):
        for messages in turns:
            want = client(server).chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
            got = client(cached).chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
            assert got.choices[0].message.content == want.choices[0].message.content, (model, messages)
            if messages is turns[0]:
                first = got.usage.prompt_tokens
    hits = metric(cached, "scaleserve_prefix_cache_hits_total")
    queries = metric(cached, "scaleserve_prefix_cache_queries_total")
    bs = cached.state.engine.block_size  # each second turn finds its first turn's whole blocks (less one, where
    assert queries > 4 * first and hits % bs == 0 and 2 * (first // bs - 1) * bs <= hits <= 2 * first, \
        (hits, queries, first)  # the template's tokens at the turn's end merge with what follows)
    assert metric(server, "scaleserve_prefix_cache_hits_total") == 0  # off by default


def test_metrics_move(server):
    before = {n: metric(server, n) for n in ("scaleserve_generation_tokens_total", "scaleserve_prompt_tokens_total",
                                             "scaleserve_time_to_first_token_seconds_count",
                                             "scaleserve_e2e_request_latency_seconds_count")}
    adapter_before = metric(server, "scaleserve_adapter_requests_total", '{adapter="chan-b"}')
    errors_before = metric(server, "scaleserve_errors_total", '{type="model_not_found"}')
    r = client(server).completions.create(model="chan-b", prompt="Bolt liked to count", max_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
    httpx.post(server.url + "/v1/completions", json={"model": "ghost", "prompt": "x"})
    assert metric(server, "scaleserve_generation_tokens_total") == before["scaleserve_generation_tokens_total"] + 5
    assert metric(server, "scaleserve_prompt_tokens_total") == \
        before["scaleserve_prompt_tokens_total"] + r.usage.prompt_tokens
    assert metric(server, "scaleserve_time_to_first_token_seconds_count") == \
        before["scaleserve_time_to_first_token_seconds_count"] + 1
    assert metric(server, "scaleserve_e2e_request_latency_seconds_count") == \
        before["scaleserve_e2e_request_latency_seconds_count"] + 1
    assert metric(server, "scaleserve_adapter_requests_total", '{adapter="chan-b"}') == adapter_before + 1
    assert metric(server, "scaleserve_errors_total", '{type="model_not_found"}') == errors_before + 1
    text = httpx.get(server.url + "/metrics").text
    for name in ("scaleserve_requests_waiting", "scaleserve_requests_running", "scaleserve_kv_cache_usage_ratio",
                 "scaleserve_inter_token_latency_seconds_bucket", "scaleserve_adapter_load_seconds_count"):
        assert name in text


def test_startup_heap_is_frozen(server):
    """Once ready, what startup left alive (imports, model, engine) is frozen out of the garbage collector: a full
    collection mid-stream then walks only what serving allocated since, instead of stalling every stream for the
    whole heap (~170 ms on a 2-core CPU: bench/host_path.py --collect-at-step)."""
    import gc

    deadline = time.monotonic() + 60
    while not server.state.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.state.ready and gc.get_freeze_count() > 0
    tracked = {id(o) for o in gc.get_objects()}  # the collector's generations: frozen objects are not in them
    engine = server.state.engine
    assert not {id(engine), id(engine.scheduler), id(server.app)} & tracked


BATCH = ["Once upon a time", "The capital of France", "Bolt"]


def test_batched_prompts(server):
    """A list of prompts: one choice per prompt (index = its position), each what the prompt gets alone,
    usage summed; streamed, each choice's chunks add up to the same text and finish once."""
    c = client(server)
    alone = [c.completions.create(model="chan-a", prompt=p, max_tokens=7, temperature=0) for p in BATCH]
    r = c.completions.create(model="chan-a", prompt=BATCH, max_tokens=7, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [a.choices[0].text for a in alone]
    assert [ch.finish_reason for ch in r.choices] == [a.choices[0].finish_reason for a in alone]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    texts, finishes, usages = ["", "", ""], [[], [], []], []
    for chunk in c.completions.create(model="chan-a", prompt=BATCH, max_tokens=7, temperature=0, stream=True,
                                      stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finishes[ch.index].append(ch.finish_reason)
    assert texts == [ch.text for ch in r.choices]
    assert finishes == [[ch.finish_reason] for ch in r.choices]
    assert len(usages) == 1 and usages[0].completion_tokens == r.usage.completion_tokens
    ids = [[5, 17, 42, 99], [7, 8]]  # a batch of token-id prompts
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert [ch.text for ch in r.choices] == [
        c.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0).choices[0].text for p in ids]
    with httpx.Client(base_url=server.url, timeout=30) as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": ["x"] * 65, "max_tokens": 1})
        assert r.status_code == 400 and "at most 64 prompts" in r.json()["error"]["message"]


def test_n_completions_per_prompt(server):
    """n samples per prompt: choice i * n + j is sample j of prompt i; with a seed, sample j is what seed + j
    gives alone; streamed (chat), every index gets its role chunk, its text and one finish."""
    c = client(server)
    kw = dict(model="chan-b", max_tokens=6, temperature=1.0, seed=7)
    r = c.completions.create(prompt=["Once upon a time", "Bolt"], n=3, **kw)
    assert [ch.index for ch in r.choices] == list(range(6))
    for i, p in enumerate(["Once upon a time", "Bolt"]):
        for j in range(3):
            alone = c.completions.create(prompt=p, **{**kw, "seed": 7 + j}).choices[0].text
            assert r.choices[i * 3 + j].text == alone
    assert len({ch.text for ch in r.choices[:3]}) > 1  # different seeds, different samples
    chat = dict(model="chan-b", messages=[{"role": "user", "content": "Hello robot"}], max_tokens=6,
                temperature=1.0, seed=11, n=2)
    full = c.chat.completions.create(**chat)
    assert [ch.index for ch in full.choices] == [0, 1]
    texts, roles, finishes = ["", ""], [0, 0], [0, 0]
    for chunk in c.chat.completions.create(**chat, stream=True):
        for ch in chunk.choices:
            roles[ch.index] += ch.delta.role == "assistant"
            texts[ch.index] += ch.delta.content or ""
            finishes[ch.index] += ch.finish_reason is not None
    assert texts == [ch.message.content for ch in full.choices] and roles == [1, 1] and finishes == [1, 1]
    # any int64 seed (OpenAI's range; 2^62 and up were a 400): the samples past 2^63 - 1 wrap, reproducibly
    top = dict(prompt="Bolt", model="chan-b", max_tokens=6, temperature=1.0, n=2)
    r = c.completions.create(**top, seed=2**63 - 1)
    assert [ch.text for ch in r.choices] == [ch.text for ch in c.completions.create(**top, seed=2**63 - 1).choices]
    assert r.choices[1].text == c.completions.create(**{**top, "n": 1}, seed=-(2**63)).choices[0].text
    with httpx.Client(base_url=server.url, timeout=30) as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": ["x"] * 9, "n": 8, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_echo_scores_the_prompt(server, tiny_lm):
    """echo + logprobs (how evaluation harnesses ask for loglikelihoods): the prompt's tokens with the
    model's logprob of each given the ones before (None for the first), then the completion; max_tokens
    0 only scores. Checked against the dense forward of the same model."""
    from scaleserve.kernels.linear import RowAdapters

    c = client(server)
    ids = [[5, 17, 42, 99, 7, 3, 250], [30, 31, 32]]
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == sum(map(len, ids))
    tok = tiny_lm.tokenizer
    for ch, p in zip(r.choices, ids):
        lp = ch.logprobs
        assert ch.text == tok.decode(p) and len(lp.tokens) == len(p) and lp.token_logprobs[0] is None
        with torch.no_grad():
            want = torch.log_softmax(tiny_lm.model.forward_dense(torch.tensor([p]), RowAdapters.base(len(p), "cpu"))
                                     [0].float(), -1)
        for t in range(1, len(p)):
            assert abs(lp.token_logprobs[t] - want[t - 1, p[t]].item()) < 1e-4
            assert len(lp.top_logprobs[t]) <= 2
        assert lp.text_offset == [sum(len(x) for x in lp.tokens[:j]) for j in range(len(p))]
    # with a completion: the prompt, then what the prompt alone generates
    plain = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=1)
    e = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=1,
                             echo=True)
    n_prompt = e.usage.prompt_tokens
    assert e.choices[0].text == "Once upon a time" + plain.choices[0].text
    assert e.choices[0].logprobs.tokens[n_prompt:] == plain.choices[0].logprobs.tokens
    # the scoring step computes logits for more rows: the same values up to float rounding
    assert e.choices[0].logprobs.token_logprobs[n_prompt:] == pytest.approx(plain.choices[0].logprobs.token_logprobs,
                                                                            abs=1e-4)
    assert e.usage.completion_tokens == plain.usage.completion_tokens
    # streamed: each choice's first chunk is its prompt (scored), then the completion as usual
    for max_tokens, ref in ((4, e), (0, None)):
        texts, tokens, lps, usages = [""], [[]], [[]], []
        for chunk in c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=max_tokens,
                                          temperature=0, logprobs=1, echo=True, stream=True,
                                          stream_options={"include_usage": True}):
            usages += [chunk.usage] if chunk.usage else []
            for ch in chunk.choices:
                texts[ch.index] += ch.text
                if ch.logprobs:
                    tokens[ch.index] += ch.logprobs.tokens
                    lps[ch.index] += ch.logprobs.token_logprobs
        if ref is None:  # only scored
            assert texts[0] == "Once upon a time" and len(tokens[0]) == n_prompt and usages[0].completion_tokens == 0
        else:
            assert texts[0] == ref.choices[0].text and tokens[0] == ref.choices[0].logprobs.tokens
            assert lps[0][0] is None and lps[0][1:] == pytest.approx(ref.choices[0].logprobs.token_logprobs[1:],
                                                                     abs=1e-4)
    with httpx.Client(base_url=server.url, timeout=30) as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_batched_prompts_are_admitted_together_or_not_at_all(start_server):
    s = start_server(tenant_max_concurrent=2)
    with httpx.Client(base_url=s.url, timeout=30) as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": BATCH, "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "tenant_concurrency_limit"
        assert s.state.inflight == 0 and s.state.engine.num_waiting == 0 and not s.state.tenant_inflight
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": BATCH[:2], "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert s.state.inflight == 0 and not s.state.tenant_inflight


def test_queue_full_gives_429(start_server, adapter_files):
    s = start_server(max_num_seqs=1, max_waiting=1)
    engine = s.state.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())  # slow steps: the queue stays put while we look
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    try:
        with httpx.Client(base_url=s.url, timeout=30) as h, h.stream("POST", "/v1/completions", json=body) as first, \
                cf.ThreadPoolExecutor(1) as pool:
            lines = first.iter_lines()  # (keep it: a collected iterator closes the stream)
            next(lines)  # the first request is running
            second = pool.submit(httpx.post, s.url + "/v1/completions", timeout=30,
                                 json={**body, "stream": False, "max_tokens": 2})
            t0 = time.monotonic()
            while engine.num_waiting < 1:
                assert time.monotonic() - t0 < 5
                time.sleep(0.005)
            r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False})
            assert r.status_code == 429 and r.headers["retry-after"]
            assert r.json()["error"]["code"] == "queue_full"
            assert metric(s, "scaleserve_requests_waiting") == 1
            assert metric(s, "scaleserve_requests_running") == 1
            assert metric(s, "scaleserve_errors_total", '{type="queue_full"}') == 1
            with pytest.raises(openai.RateLimitError):
                client(s).completions.create(model="tiny", prompt="x", max_tokens=2)
            first.close()  # disconnect: the waiting request gets the slot
            assert second.result().status_code == 200
    finally:
        engine.step = step


@pytest.mark.slow
def test_smollm2_chat_through_the_server(start_server, smollm2_dir):
    s = start_server(model=str(smollm2_dir), served_model_name="smollm2", kv_cache_max_blocks=64)
    r = client(s).chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content


def test_sse_template_equals_sse():
    from scaleserve.server.api.common import SSETemplate, sse

    def chunk(text):
        return {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": 'm"ü',
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}], "usage": None}

    tpl = SSETemplate(chunk(SSETemplate.SPLICE))
    for text in ["", "a", 'ü"\\\n\t\u2028 ✓', "\ufffd", "\x00", "</s>"]:
        assert tpl(text) == sse(chunk(text))
