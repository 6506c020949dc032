"""bench/serve.py load, the async load generator, against a live server (a real uvicorn over the tiny model, in a
thread): N concurrent streams over T adapters with Zipf popularity, the JSON it writes and its PNG of throughput
against T."""

import importlib.util
import json
import re
from pathlib import Path

import httpx

from scaleserve.adapters.format import identity_adapter
from scaleserve.server.main import ThreadedServer, create_app
from scaleserve.server.settings import Settings

_spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).resolve().parents[2] / "bench" / "serve.py")
bench_serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_serve)


def adapter_requests(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r'^scaleserve_adapter_requests_total\{adapter="([^"]+)"\} (\S+)$',
                                                   text, re.M)}


def test_load_over_t_adapters_writes_json_and_plot(tiny_model_dir, tiny_lm, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name in ("task-a", "task-b"):
        identity_adapter(tiny_lm, "peqa", per_channel=True, name=name).save(adapters / f"{name}.safetensors")
    app = create_app(Settings(model=str(tiny_model_dir), device="cpu", kv_cache_max_blocks=256, served_model_name="tiny",
                              data_dir=tmp_path / "data", adapters=str(adapters), log_level="warning"))
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    with ThreadedServer(app) as srv:
        # prompt ids beyond the tiny model's vocabulary: every request fails, and the run says why
        assert bench_serve.main(["load", "--url", srv.url, "--adapters", "0", "--requests", "3", "--output-len",
                                 "2:2", "--prompt-len", "40:40", "--vocab", "100000"]) == 1
        err = capsys.readouterr().err
        assert "T=0: 3 requests failed with 400, e.g.: " in err and "token ids must be in [0, 320)" in err, err
        served_before = adapter_requests(srv.url)
        rc = bench_serve.main(["load", "--url", srv.url, "--adapters", "0,1,2,3", "--requests", "8", "--concurrency",
                               "4", "--prompt-len", "3:9", "--output-len", "2:6", "--seed", "1", "--vocab", "300",
                               "--json", str(out), "--plot", str(png)])
        served = {k: v - served_before.get(k, 0) for k, v in adapter_requests(srv.url).items()}
    assert rc == 0
    assert "T=3: the server has only 2 adapters; skipped" in capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["base"] == "tiny" and [r["adapters"] for r in res["results"]] == [0, 1, 2]
    for r in res["results"]:
        assert r["ok"] == 8 and not r["errors"] and r["concurrency"] == 4, r
        assert r["throughput_tok_s"] > 0 and 0 < r["ttft_s_p50"] <= r["ttft_s_p99"] and 0 < r["itl_ms_p50"], r
    # T = 0: the base model; T = 1: task-a alone; T = 2: the eight drawn over task-a and task-b
    assert served.get("base") == 8 and served["task-a"] + served.get("task-b", 0) == 16 and served["task-a"] >= 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
