"""Serving benchmark.

  load   an async load generator (httpx) against a running server: N concurrent streams over T
         adapters with Zipf popularity, random prompt / output lengths; reports throughput (generated
         tokens/s), TTFT and inter-token latency p50/p99 and errors; --json, and --plot a PNG of
         throughput vs T when several T are given.

           python bench/serve.py load --url http://127.0.0.1:8000 --concurrency 32 --requests 256 \\
               --adapters 1,4,16,64 --json load.json --plot load.png

  gpu    on the GPU, side by side (the server is a `scaleserve serve` subprocess, the load generator this
         process; --in-process puts both in one process as before), for a random-init Llama-2-7B-shaped int4 model (group 128)
         and a SmolLM2-135M-shaped one: batch-1 decode tokens/s, 64 streams on one adapter vs 64 streams
         over 64 adapters (through the real HTTP server), HF transformers generate on the same weights
         dequantized to bf16, and the bandwidth floor of batch-1 decode (weight bytes / copy bandwidth).

           python bench/serve.py gpu --out OUT_DIR

Prompts are token ids (exact lengths); every request sets ignore_eos so outputs have the asked length.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import httpx

# --- load generator ---------------------------------------------------------------------------------


def parse_range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def zipf_choice(rng: random.Random, names: list[str], s: float) -> str:
    weights = [1.0 / (r + 1) ** s for r in range(len(names))]
    return rng.choices(names, weights)[0]


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage, status, err = [], None, None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                err = (await r.aread()).decode(errors="replace")[:200]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        err = ev["error"].get("message")
                        continue
                    if ev.get("choices"):
                        times.append(time.perf_counter())
                    if ev.get("usage"):
                        usage = ev["usage"]
    except httpx.HTTPError as e:
        err = repr(e)
    t1 = time.perf_counter()
    return {"model": model, "status": status, "error": err, "start": t0, "end": t1, "times": times,
            "completion_tokens": (usage or {}).get("completion_tokens", 0),
            "prompt_tokens": (usage or {}).get("prompt_tokens", len(prompt))}


async def run_load(url: str, models: list[str], n_requests: int, concurrency: int, prompt_len=(64, 64),
                   output_len=(128, 128), zipf_s: float = 1.0, seed: int = 0, assign: str = "zipf",
                   vocab: int = 1000) -> dict:
    """models: the adapter (or base) names to draw from; assign 'zipf' or 'round_robin'."""
    rng = random.Random(seed)
    plan = []
    for i in range(n_requests):
        m = models[i % len(models)] if assign == "round_robin" else zipf_choice(rng, models, zipf_s)
        plen, olen = rng.randint(*prompt_len), rng.randint(*output_len)
        plan.append((m, [rng.randrange(3, vocab) for _ in range(plen)], olen))
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def go(job):
            async with sem:
                return await one_request(client, *job)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(go(j) for j in plan))
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200 and not r["error"]]
    ttft = [r["times"][0] - r["start"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    decode_rates = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in ok
                    if len(r["times"]) > 2 and r["times"][-1] > r["times"][0]]
    gen = sum(r["completion_tokens"] for r in ok)
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}  # the first failed request's message per status: what went wrong
    for r in results:
        if r not in ok:
            k = str(r["status"] or "transport")
            errors[k] = errors.get(k, 0) + 1
            examples.setdefault(k, r["error"] or "")
    return {
        "requests": len(results), "ok": len(ok), "errors": errors, "error_examples": examples,
        "wall_s": round(wall, 3),
        "generated_tokens": gen, "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "throughput_tok_s": round(gen / wall, 1) if wall > 0 else None,
        "per_stream_decode_tok_s_p50": _r(pct(decode_rates, 50)),
        "ttft_s_p50": _r(pct(ttft, 50)), "ttft_s_p99": _r(pct(ttft, 99)),
        "itl_ms_p50": _r(pct(itl, 50), 1000), "itl_ms_p99": _r(pct(itl, 99), 1000),
        # the whole distribution: a mean above the p50 says slow intervals in the tail, p10 / p90 where they start
        "itl_ms_p10": _r(pct(itl, 10), 1000), "itl_ms_p90": _r(pct(itl, 90), 1000),
        "itl_ms_mean": _r(sum(itl) / len(itl) if itl else None, 1000),
        "e2e_s_p50": _r(pct([r["end"] - r["start"] for r in ok], 50)),
    }


def mean_of(passes: list[dict]) -> dict:
    """One scenario's passes: the mean of every numeric field (counts summed), each pass kept as is."""
    out = {}
    for k in passes[0]:
        vals = [p[k] for p in passes]
        if k in ("requests", "ok", "generated_tokens", "prompt_tokens"):
            out[k] = sum(vals)
        elif all(isinstance(x, (int, float)) for x in vals):
            out[k] = round(sum(vals) / len(vals), 4)
    out["errors"] = dict(sum((Counter(p["errors"]) for p in passes), Counter()))
    out["error_examples"] = {k: v for p in reversed(passes) for k, v in p.get("error_examples", {}).items()}
    out["passes"] = passes
    return out


def _r(x, scale=1.0):
    return None if x is None else round(x * scale, 4)


def engine_steps(url: str) -> dict[str, float]:
    """The server's engine step counters from /metrics: steps by kind, and overlapped steps."""
    return engine_steps_of(httpx.get(url + "/metrics", timeout=30).text)


def engine_steps_of(text: str) -> dict[str, float]:
    """engine_steps from a /metrics exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "scaleserve_engine_steps_total":
                out[smp.labels["kind"]] = smp.value
            elif smp.name == "scaleserve_engine_overlapped_steps_total":
                out["overlapped"] = smp.value
            elif smp.name in ("scaleserve_engine_gpu_step_seconds_sum", "scaleserve_engine_gpu_step_seconds_count"):
                # (the server's --gpu-step-timing) "gpu_s decode_graph", "gpu_n decode_graph"
                out[f"gpu_{'s' if smp.name.endswith('_sum') else 'n'} {smp.labels['kind']}"] = smp.value
    return out


def step_counts(before: dict[str, float], after: dict[str, float]) -> dict:
    """engine_steps' counters over a pass; with GPU step timing, each kind's mean GPU ms a step ("gpu_ms ...")."""
    d = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    out = {k: int(v) for k, v in d.items() if not k.startswith("gpu_")}
    for k, n in d.items():
        if k.startswith("gpu_n ") and n:
            out["gpu_ms " + k[6:]] = round(d.get("gpu_s " + k[6:], 0.0) / n * 1e3, 4)
    return out


def list_adapters(url: str) -> tuple[str, list[str]]:
    data = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    base = next(m["id"] for m in data if not m.get("parent"))
    return base, [m["id"] for m in data if m.get("parent")]


def cmd_load(a) -> int:
    base, adapters = list_adapters(a.url)
    rows = []
    for T in [int(x) for x in a.adapters.split(",")]:
        if T > len(adapters):
            print(f"T={T}: the server has only {len(adapters)} adapters; skipped", file=sys.stderr)
            continue
        models = [base] if T == 0 else adapters[:T]
        res = asyncio.run(run_load(a.url, models, a.requests, a.concurrency, parse_range(a.prompt_len),
                                   parse_range(a.output_len), a.zipf, a.seed, vocab=a.vocab))
        res.update(adapters=T, concurrency=a.concurrency)
        rows.append(res)
        print_table([res], ["adapters", "concurrency"])
        for status, message in res["error_examples"].items():
            print(f"T={T}: {res['errors'][status]} requests failed with {status}, e.g.: {message}", file=sys.stderr)
    out = {"url": a.url, "base": base, "zipf_s": a.zipf, "prompt_len": a.prompt_len, "output_len": a.output_len,
           "results": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    if a.plot and len(rows) > 1:
        plot_throughput(rows, a.plot)
    return 0 if all(not r["errors"] for r in rows) else 1


def plot_throughput(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["adapters"] for r in rows], [r["throughput_tok_s"] for r in rows], marker="o")
    ax.set_xscale("symlog", base=2)
    ax.set_xlabel("distinct adapters (T)")
    ax.set_ylabel("generated tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"throughput vs adapters ({rows[0].get('concurrency')} streams)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


COLUMNS = ["throughput_tok_s", "per_stream_decode_tok_s_p50", "ttft_s_p50", "ttft_s_p99", "itl_ms_p50",
           "itl_ms_p99", "ok", "errors"]


def print_table(rows: list[dict], keys: list[str]) -> None:
    cols = keys + COLUMNS
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{str(r.get(c)):>14}" for c in cols), flush=True)


# --- in-process server ------------------------------------------------------------------------------


def summarize_stacks(raw: str, top: int = 25) -> dict:
    """py-spy's raw output (`thread;frame;...;frame count` lines) as samples per thread and, per thread, the
    frames with the most samples on top of the stack (self) and anywhere in it (inclusive)."""
    threads: dict[str, dict] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        thread, *frames = stack.split(";")
        name = re.sub(r"^thread \(\d+\): ", "", thread)
        t = threads.setdefault(name, {"samples": 0, "self": Counter(), "inclusive": Counter()})
        t["samples"] += int(n)
        if frames:
            t["self"][frames[-1]] += int(n)
        for f in set(frames):
            t["inclusive"][f] += int(n)
    return {name: {"samples": t["samples"], "self": t["self"].most_common(top),
                   "inclusive": t["inclusive"].most_common(top)} for name, t in threads.items()}


def print_samples(name: str, prof: dict) -> None:
    """One line per py-spy pass: samples per thread, and the engine thread's three top frames."""
    threads = {t: v for t, v in prof.items() if isinstance(v, dict) and "samples" in v}
    line = f"py-spy, {name}: " + ", ".join(f"{t} {v['samples']} samples" for t, v in threads.items())
    for t, v in threads.items():
        if "engine" in t.lower():
            line += f"; {t} on top: " + ", ".join(f"{f} {n}" for f, n in v["self"][:3])
    print(line + (f"; {prof['error']}" if "error" in prof else ""), flush=True)


class SubprocessServer:
    """`scaleserve serve` in a child process on a free loopback port, so the load generator in this process
    does not share a GIL with the engine thread and uvicorn (the figures are the server's alone). Its log
    goes to `log_path`; engine_info() reads the KV size and the captured CUDA graphs back from it."""

    def __init__(self, model_dir: Path, flags: dict, env: dict, log_path: Path):
        import socket
        import subprocess

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "scaleserve.server.cli", "serve", "--model", str(model_dir),
                    "--host", "127.0.0.1", "--port", str(port)]
        for k, v in flags.items():
            flag = k.replace("_", "-")
            self.cmd += [f"--{flag}" if v is True else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
        # PYTHONSAFEPATH (3.11+): `python -m` run from the checkout would put its top-level kernels/ folder
        # ahead of Hugging Face's `kernels` package, which transformers >= 5.25 imports
        self.env = {**__import__("os").environ, "PYTHONSAFEPATH": "1", **env}
        self.log_path = log_path
        self.subprocess = subprocess
        self.proc = None

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.proc = self.subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=self.subprocess.STDOUT)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.log_path}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 900:
                raise RuntimeError(f"server not ready after 900 s; log: {self.log_path}")
            time.sleep(0.25)

    def engine_info(self) -> dict:
        """The KV size, the warm-up (graphs captured, seconds) and the stalls logged while serving, from the
        server's log."""
        text = self.log_path.read_text(errors="replace")
        kv = re.findall(r"KV cache: (\d+) blocks", text)
        warm = re.findall(r"warm-up: (\d+) prefill sizes, (\d+) graphs, modes \[([\d, ]*)\], in ([\d.]+) s", text)
        # what stalled every stream while serving (server/compile_watch.py, the engine's slow_step_warn_ms)
        stalls = re.findall(r"^(\S+ \S+) WARNING \S+: ((?:kernel \S+ compiled while serving|slow engine step).*)$",
                            text, re.M)
        out = {"kv_blocks": int(kv[-1]) if kv else None, "stalls": [f"{t} {m}" for t, m in stalls]}
        if warm:
            sizes, graphs, modes, secs = warm[-1]
            out["warmup"] = {"prefill_sizes": int(sizes), "graphs": int(graphs),
                             "modes": [int(m) for m in modes.split(",") if m.strip()], "seconds": float(secs)}
        return out

    @contextlib.contextmanager
    def sampled(self, out: Path, idle: bool = False):
        """py-spy samples the server's threads while the block runs (raw folded stacks into `out`); yields
        a dict that gets the summary (samples per thread, top frames). No py-spy, or no ptrace: an error entry.
        idle: sample threads that wait too (py-spy leaves them out by default), so each thread's samples cover
        the whole pass and its top frames say where it waits."""
        import shutil

        summary: dict = {}
        # a venv's bin/ need not be on PATH; pip install --target DIR (the GPU session's wheels) puts it in
        # DIR/bin, with DIR on sys.path
        exe = shutil.which("py-spy") or next((str(b) for b in (Path(d) / "bin/py-spy" for d in (sys.prefix, *sys.path))
                                               if b.is_file()), None)
        if exe is None:
            summary["error"] = "py-spy not found"
            yield summary
            return
        spy = self.subprocess.Popen([exe, "record", "-p", str(self.proc.pid), "-f", "raw", "-o", str(out), "-t",
                                     "--nonblocking", "-r", "200", *(["--idle"] if idle else [])], stdout=self.subprocess.PIPE,
                                    stderr=self.subprocess.STDOUT, text=True)
        time.sleep(1.0)  # attached before the load starts
        try:
            yield summary
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on ^C
            try:
                log = spy.communicate(timeout=60)[0]
            except self.subprocess.TimeoutExpired:
                spy.kill()
                log = spy.communicate()[0]
            if out.is_file() and out.stat().st_size:
                summary.update(summarize_stacks(out.read_text()))
            else:
                summary["error"] = log.strip()[-400:]

    def __exit__(self, *exc):
        self.proc.terminate()  # SIGTERM: drains (nothing in flight) and exits
        try:
            self.proc.wait(60)
        except self.subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


# --- GPU side-by-side ---------------------------------------------------------------------------------


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    import torch

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * n * reps / (start.elapsed_time(end) / 1e3)


def decode_weight_bytes(lm) -> int:
    """Bytes one batch-1 decode step must read: every quantized linear (codes, zeros, scales, bias),
    the lm_head (or tied embedding) and the norms; one embedding row is negligible."""
    m = lm.model
    total = 0
    for q in m.quant_linears().values():
        for t in (q.packed, q.zeros, q.scales, getattr(q, "alphas", None), getattr(q, "betas", None), q.bias):
            if t is not None:
                total += t.numel() * t.element_size()
    head = m.embed.weight if m.lm_head is None else getattr(m.lm_head, "weight", None)
    if head is not None and not m.quantize_lm_head:
        total += head.numel() * head.element_size()
    for name, p in m.named_parameters():
        if "norm" in name:
            total += p.numel() * p.element_size()
    return total


def hf_bf16_from(lm):
    """transformers LlamaForCausalLM with our int4 weights dequantized to bf16 (same function)."""
    import torch
    from transformers import LlamaForCausalLM

    from scaleserve.kernels.quant import dequantize_rtn, unpack_int4

    a = lm.model.args
    cfg = lm.hf_config
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    dev = lm.device
    hf = hf.to_empty(device=dev).to(torch.bfloat16)
    sd = {}
    m = lm.model
    hd = a.head_dim
    for i, layer in enumerate(m.layers):
        def deq(q):
            return dequantize_rtn(unpack_int4(q.packed, q.in_features), q.zeros, q.scales, q.group_size).to(
                torch.bfloat16)

        qkv = deq(layer.attn.qkv)
        qw, kw, vw = qkv.split([a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd])
        gate, up = deq(layer.mlp.gate_up).chunk(2)
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": qw, p + "self_attn.k_proj.weight": kw,
                   p + "self_attn.v_proj.weight": vw, p + "self_attn.o_proj.weight": deq(layer.attn.o),
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": deq(layer.mlp.down),
                   p + "input_layernorm.weight": layer.input_norm.weight,
                   p + "post_attention_layernorm.weight": layer.post_attn_norm.weight})
    sd["model.embed_tokens.weight"] = m.embed.weight
    sd["model.norm.weight"] = m.norm.weight
    if m.quantize_lm_head:
        sd["lm_head.weight"] = deq(m.lm_head)
    else:
        sd["lm_head.weight"] = m.embed.weight if m.lm_head is None else m.lm_head.weight
    hf.load_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()}, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb.to(dev)
    for buf_name, buf in hf.named_buffers():  # rebuild rotary inv_freq off the meta device
        if "inv_freq" in buf_name:
            mod = hf.get_submodule(buf_name.rsplit(".", 1)[0])
            inv, _ = __import__("scaleserve.server.model", fromlist=["rope_inv_freq"]).rope_inv_freq(cfg, hd)
            mod.inv_freq = inv.to(dev)
            if hasattr(mod, "original_inv_freq"):
                mod.original_inv_freq = mod.inv_freq
    return hf.eval()


def hf_decode_tok_s(lm, new_tokens: int = 128) -> float:
    import torch

    hf = hf_bf16_from(lm)
    ids = torch.randint(3, 1000, (1, 16), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf.generate(ids, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return n / dt


def make_adapters(lm, out_dir: Path, n: int, seed: int = 0) -> list[str]:
    """n per-channel PEQA adapters (identity x random factors in [0.9, 1.1])."""
    import torch

    from scaleserve.adapters.format import identity_adapter

    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = []
    base = identity_adapter(lm, "peqa", per_channel=True)
    for i in range(n):
        name = f"a{i:03d}"
        path = out_dir / f"{name}.safetensors"
        if not path.exists():
            t = {k: v * (0.9 + 0.2 * torch.rand(v.shape, generator=g)) for k, v in base.tensors.items()}
            type(base)(base.kind, name, base.base_fingerprint, t).save(path)
        names.append(name)
    return names


def bench_model(label: str, model_dir: Path, work: Path, args) -> dict:
    import torch

    from scaleserve.server.loader import load_model
    from scaleserve.server.settings import Settings

    print(f"\n=== {label}: {model_dir}", flush=True)
    lm = load_model(model_dir, device="cuda")
    res: dict = {"model": label, "dir": str(model_dir)}
    wbytes = decode_weight_bytes(lm)
    bw = copy_bandwidth(lm.device)
    res.update(weight_bytes=wbytes, copy_bandwidth_GBs=round(bw / 1e9, 1),
               floor_batch1_tok_s=round(bw / wbytes, 1))
    print(f"weights read per decode step {wbytes / 2**30:.2f} GiB; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"batch-1 floor {bw / wbytes:.0f} tok/s", flush=True)
    if not args.skip_hf:
        try:
            res["hf_bf16_batch1_tok_s"] = round(hf_decode_tok_s(lm), 1)
            print(f"HF transformers bf16 generate, batch 1: {res['hf_bf16_batch1_tok_s']} tok/s", flush=True)
        except Exception as e:  # the comparison must not sink the run
            res["hf_error"] = repr(e)
            print(f"HF baseline failed: {e!r}", flush=True)
    names = make_adapters(lm, work / f"{label}-adapters", args.streams)
    vocab = lm.model.args.vocab_size
    flags = dict(device="cuda", served_model_name=label, adapters=work / f"{label}-adapters",
                 max_num_seqs=max(64, args.streams), gpu_adapter_slots=max(64, args.streams) + 8,
                 kv_cache_memory_fraction=args.kv_fraction, max_num_batched_tokens=args.max_num_batched_tokens)
    if args.gpu_step_timing:
        flags["gpu_step_timing"] = True
    if args.in_process:  # the old way: client and server share this process (and its GIL)
        from scaleserve.server.main import ThreadedServer, create_app

        srv_cm = ThreadedServer(create_app(Settings(model=str(model_dir), data_dir=work / "data", log_level="warning",
                                                    **flags), lm=lm))
    else:
        del lm  # the server loads its own copy
        gc.collect()
        torch.cuda.empty_cache()
        lm = None
        srv_cm = SubprocessServer(model_dir, flags, {"SCALESERVE_DATA_DIR": str(work / "data"),
                                                     "SCALESERVE_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"},
                                  work / f"{label}-server.log")
    res["server"] = "in-process" if args.in_process else "subprocess"
    scen = []
    with srv_cm as srv:
        def load(models, n, conc, plen, olen, assign="round_robin"):
            before = engine_steps(srv.url)
            r = asyncio.run(run_load(srv.url, models, n, conc, (plen, plen), (olen, olen), assign=assign,
                                     vocab=vocab))
            after = engine_steps(srv.url)  # how the engine ran these requests: steps by kind, overlapped
            r["engine_steps"] = step_counts(before, after)
            return r

        # batch-1 decode
        load([label], 1, 1, 16, 32)  # warm-up: compiles, captures the batch-1 graph
        # one request after another: the figures are medians over --batch1-requests streams, not one stream's
        r = load([label], args.batch1_requests, 1, 16, args.batch1_tokens)
        r["scenario"] = "batch-1 decode (base)"
        scen.append(r)
        print_table([r], ["scenario"])
        print("batch-1 ITL ms: " + ", ".join(f"{k} {r[f'itl_ms_{k}']}" for k in ("p10", "p50", "p90", "p99", "mean"))
              + f"; engine steps {r['engine_steps']}", flush=True)
        if args.py_spy and not args.in_process:
            # one more batch-1 request, sampled with idle frames: whether the engine thread waits on the GPU (its
            # event's synchronize), on the GIL (a frame right after a call that released it) or works
            res["py_spy"] = {}
            with srv.sampled(work / f"{label}-batch1-pyspy.txt", idle=True) as prof:
                prof["pass"] = load([label], 1, 1, 16, args.batch1_tokens)
            res["py_spy"]["batch-1 decode (base)"] = prof
            print_samples("batch-1", prof)
        if args.batch1_only:
            res.update(scenarios=scen, multi_adapter_ratio=None, batch1_tok_s=r["per_stream_decode_tok_s_p50"],
                       engine=srv.engine_info() if not args.in_process else {})
            return res
        pair = ((f"{args.streams} streams, 1 adapter", names[:1]),
                (f"{args.streams} streams, {args.streams} adapters", names[: args.streams]))
        for _, models in pair:  # warm-up: graphs, autotune, slab
            load(models, args.streams, args.streams, args.prompt_len, 32)
        # measured A B B A (--ab-rounds times), each scenario the mean of its passes: whichever ran first or while
        # the host was busier (a first run after warm-up had TTFT outliers of seconds) counts for both. On a small
        # model a pass lasts ~2 s and one pass of two could be 13 % off the other (session 22): more rounds
        passes: dict[str, list[dict]] = {name: [] for name, _ in pair}
        for name, models in (*pair, *pair[::-1]) * args.ab_rounds:
            passes[name].append(load(models, args.streams, args.streams, args.prompt_len, args.output_len))
        if args.py_spy and not args.in_process:  # one more pass of each, sampled: where the server's host time goes
            res.setdefault("py_spy", {})
            for name, models in pair:
                with srv.sampled(work / f"{label}-{len(models)}-adapters-pyspy.txt") as prof:
                    prof["pass"] = load(models, args.streams, args.streams, args.prompt_len, args.output_len)
                res["py_spy"][name] = prof
                print_samples(name, prof)
        for name, _ in pair:
            r = mean_of(passes[name])
            r["scenario"] = name
            scen.append(r)
            print_table([r], ["scenario"])
        if args.in_process:
            eng = srv.app.state.engine
            res["engine"] = {"kv_blocks": eng.kv.num_blocks, "graphs": len(eng.graphs.graphs) if eng.graphs else 0}
        else:
            res["engine"] = srv.engine_info()
            for line in res["engine"]["stalls"]:
                print("server stall:", line, flush=True)
    res["scenarios"] = scen
    one, many = scen[1]["throughput_tok_s"], scen[2]["throughput_tok_s"]
    res["multi_adapter_ratio"] = round(many / one, 3) if one else None
    res["batch1_tok_s"] = scen[0]["per_stream_decode_tok_s_p50"]
    del lm, srv
    gc.collect()
    torch.cuda.empty_cache()
    return res


def cmd_gpu(a) -> int:
    import torch

    from make_random_model import make_random_model  # (bench/ is on sys.path: this file runs as a script)

    if not torch.cuda.is_available():
        print("gpu mode needs CUDA", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(a), "models": []}
    models = []
    for preset in a.models.split(","):
        if preset == "smollm2-135m" and a.smollm2_dir:
            models.append(("smollm2-135m", Path(a.smollm2_dir)))
        else:
            head = "-int4-head" if a.quantize_lm_head else ""
            models.append((preset + head, make_random_model(work / f"random-{preset}{head}", preset, device="cuda",
                                                            quantize_lm_head=a.quantize_lm_head)))
    for label, d in models:
        try:
            results["models"].append(bench_model(label, d, work, a))
        except Exception as e:
            import traceback

            traceback.print_exc()
            results["models"].append({"model": label, "error": repr(e)})
        (out / "serve_gpu.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n=== summary (" + results["device"] + ")")
    print(f"{'model':>14} | {'batch-1 tok/s':>13} | {'floor tok/s':>11} | {'HF bf16 tok/s':>13} | "
          f"{'64x1 tok/s':>10} | {'64x64 tok/s':>11} | {'ratio':>6}")
    for r in results["models"]:
        if "error" in r:
            print(f"{r['model']:>14} | error: {r['error']}")
            continue
        s = [x["throughput_tok_s"] for x in r["scenarios"][1:3]] + [None, None]
        print(f"{r['model']:>14} | {str(r['batch1_tok_s']):>13} | {r['floor_batch1_tok_s']:>11} | "
              f"{str(r.get('hf_bf16_batch1_tok_s')):>13} | {str(s[0]):>10} | {str(s[1]):>11} | "
              f"{str(r['multi_adapter_ratio']):>6}")
    print(f"wrote {out / 'serve_gpu.json'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("load", help="load generator against a running server")
    lo.add_argument("--url", default="http://127.0.0.1:8000")
    lo.add_argument("--concurrency", type=int, default=32)
    lo.add_argument("--requests", type=int, default=128)
    lo.add_argument("--adapters", default="1", help="comma list of T (0 = the base model)")
    lo.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    lo.add_argument("--prompt-len", default="32:256", help="uniform range LO:HI of prompt tokens")
    lo.add_argument("--output-len", default="32:256", help="uniform range LO:HI of generated tokens")
    lo.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--json")
    lo.add_argument("--plot", help="PNG of throughput vs T")
    lo.set_defaults(func=cmd_load)
    g = sub.add_parser("gpu", help="side-by-side GPU benchmark in one process")
    g.add_argument("--out", default="out/bench-serve")
    g.add_argument("--work", default="/tmp/scaleserve-bench", help="random models, adapters, store")
    g.add_argument("--models", default="llama2-7b,smollm2-135m")
    g.add_argument("--smollm2-dir", help="a converted SmolLM2 model dir (default: a random one of its shape)")
    g.add_argument("--streams", type=int, default=64)
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=256)
    g.add_argument("--batch1-tokens", type=int, default=256)
    g.add_argument("--batch1-requests", type=lambda v: max(1, int(v)), default=5,
                   help="batch-1 requests, one after another (its tok/s and TTFT are medians over them)")
    g.add_argument("--ab-rounds", type=lambda v: max(1, int(v)), default=3,
                   help="the 1-adapter / all-adapters scenarios run A B B A this many times (means over the passes)")
    g.add_argument("--kv-fraction", type=float, default=0.5)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--quantize-lm-head", action="store_true",
                   help="random models with the output projection in int4 too (`scaleserve quantize "
                        "--quantize-lm-head`); default bf16")
    g.add_argument("--skip-hf", action="store_true")
    g.add_argument("--batch1-only", action="store_true",
                   help="only the batch-1 scenario (no 64-stream passes): a short run for the batch-1 figure")
    g.add_argument("--gpu-step-timing", action="store_true",
                   help="the server times each step's forward on the GPU (CUDA events): each pass's engine_steps "
                        "then has the mean GPU ms a step by kind, to hold against its inter-token latency")
    g.add_argument("--py-spy", action="store_true",
                   help="after the A/B passes, one more of each under py-spy (the server's threads, raw stacks in "
                        "--work, a summary in the JSON): where the host time of a decode step goes")
    g.add_argument("--in-process", action="store_true",
                   help="run the server in a thread of this process (shares the GIL with the load generator)")
    g.set_defaults(func=cmd_gpu)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
