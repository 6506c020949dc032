"""`scaleserve serve` as a real process: SIGTERM drains (ready false, new requests 503, in-flight
streams complete) and the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_all(url: str, body: dict, out: dict, key) -> None:
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            out[(key, "status")] = r.status_code
            for line in r.iter_lines():
                if line:
                    events.append(line)
    except Exception as e:  # recorded, asserted on below
        out[(key, "error")] = repr(e)
    out[key] = events


def test_sigterm_drains_then_exits_zero(make_tiny_model, tmp_path):
    model_dir = make_tiny_model(max_position_embeddings=1024)  # long streams: the drain takes a while
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SCALESERVE_DATA_DIR=str(tmp_path), SCALESERVE_KV_CACHE_MAX_BLOCKS="512",
               SCALESERVE_DRAIN_GRACE_S="60", SCALESERVE_DEVICE="cpu")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("scaleserve")), "serve", "--model", str(model_dir),
                             "--port", str(port), "--served-model-name", "tiny"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < 90, "server did not become ready"
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 900, "stream": True, "ignore_eos": True}
        results: dict = {}
        threads = [threading.Thread(target=stream_all, args=(url, body, results, i)) for i in range(4)]
        for t in threads:
            t.start()
        while httpx.get(url + "/metrics").text.find("scaleserve_requests_running 4.0") < 0:
            assert time.monotonic() - t0 < 120
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t1 = time.monotonic()
        while httpx.get(url + "/ready", timeout=5).status_code != 503:
            assert time.monotonic() - t1 < 5, "ready did not go false"
            time.sleep(0.01)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # alive while draining
        assert all(t.is_alive() for t in threads), "the streams ended before the drain was observed"
        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for i in range(4):
        events = results[i]
        assert results[(i, "status")] == 200 and (i, "error") not in results, (results.get((i, "error")), log[-2000:])
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"
    assert "draining" in log
