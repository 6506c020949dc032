"""Engine without HTTP: continuous batching gives each request exactly what it gets alone (greedy and
seeded), equal to the offline generate_ids; chunked prefill, preemption, stop handling."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from scaleserve.adapters.format import load_adapter
from scaleserve.adapters.registry import AdapterRegistry
from scaleserve.adapters.format import BaseSpec
from scaleserve.adapters.slab import AdapterSlab
from scaleserve.server.detokenizer import cut_stop, tail
from scaleserve.server.engine import Engine
from scaleserve.server.generate import generate_ids
from scaleserve.server.loader import load_model
from scaleserve.server.metrics import Metrics
from scaleserve.server.scheduler import SamplingParams, Sequence, Status
from scaleserve.server.settings import Settings


@pytest.fixture(params=[False, True], ids=["serial", "overlap"])
def overlap(request):
    """Engine.overlap: the next decode step dispatched before the host processed the last one's tokens."""
    return request.param


@pytest.fixture(scope="module")
def engine_lm(tiny_model_dir):
    return load_model(tiny_model_dir)  # its own copy: the engine's slab attaches tables to the model


def make_engine(lm, tmp_path, adapter_files=None, **settings):
    kw = dict(model="unused", device="cpu", kv_cache_max_blocks=128, data_dir=tmp_path)
    kw.update(settings)
    s = Settings(**kw)
    slab = AdapterSlab(lm.model, chan_slots=4, group_slots=2, alpha_slots=2)
    reg = AdapterRegistry(BaseSpec.from_model(lm), slab)
    versions = {}
    for name, path in (adapter_files or {}).items():
        versions[name] = reg.put("t", name, load_adapter(path))
    return Engine(lm, slab, reg, s, Metrics()), versions


def new_seq(prompt, av=None, **params):
    outs = []
    p = dict(max_tokens=12, temperature=0.0)
    p.update(params)
    seq = Sequence(f"r{len(prompt)}", list(prompt), SamplingParams(**p), adapter=av, sink=outs.append)
    seq.outs = outs
    return seq


def run(engine, seqs, arrivals=None):
    """Step the engine inline until every sequence finished; arrivals[i] = the step seqs[i] joins."""
    arrivals = arrivals or [0] * len(seqs)
    step = 0
    while True:
        for s, a in zip(seqs, arrivals):
            if a == step:
                engine.scheduler.add(s)
        if not engine.scheduler.has_work() and step > max(arrivals):
            break
        engine.step()
        step += 1
        assert step < 10_000
    for s in seqs:
        assert s.status == Status.FINISHED and s.outs[-1].finished
    return [list(s.output_ids) for s in seqs]


PROMPTS = [[5, 17, 42, 99, 7], list(range(30, 67)), [200, 3], list(range(100, 121)), [11] * 9, [250, 251, 252]]


def test_batched_equals_alone_and_generate_ids(engine_lm, tiny_lm, adapter_files, tmp_path, overlap):
    names = [None, "chan-a", "group-a", "alpha-a", "chan-b", "chan-a"]
    engine, avs = make_engine(engine_lm, tmp_path, adapter_files, overlap_steps=overlap)
    alone = [run(engine, [new_seq(p, avs.get(n))])[0] for p, n in zip(PROMPTS, names)]
    together = run(engine, [new_seq(p, avs.get(n)) for p, n in zip(PROMPTS, names)])
    staggered = run(engine, [new_seq(p, avs.get(n)) for p, n in zip(PROMPTS, names)], arrivals=[0, 3, 0, 5, 1, 8])
    assert together == alone
    assert staggered == alone
    assert (engine.overlapped_steps > 0) == overlap
    assert engine.metrics.registry.get_sample_value("scaleserve_engine_overlapped_steps_total") == engine.overlapped_steps
    assert engine.kv.allocator.num_free == engine.kv.allocator.usable
    assert any(len(set(map(tuple, alone[i:i + 1] + alone[5:6]))) for i in range(5))
    for p, n, got in zip(PROMPTS, names, alone):
        adapter = None if n is None else load_adapter(adapter_files[n])
        ref, _ = generate_ids(tiny_lm, [p], [adapter], max_new_tokens=12)
        assert got == ref[0], n
    assert engine.kv.allocator.num_free == engine.kv.allocator.usable  # every block came back
    # adapters really change the output (else the test above proves little)
    assert alone[1] != run(engine, [new_seq(PROMPTS[1])])[0]


def test_seeded_sampling_is_batch_invariant(engine_lm, adapter_files, tmp_path, overlap):
    engine, avs = make_engine(engine_lm, tmp_path, adapter_files, overlap_steps=overlap)
    kw = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=10)
    alone = [run(engine, [new_seq(p, avs["chan-b"], **kw)])[0] for p in PROMPTS[:4]]
    together = run(engine, [new_seq(p, avs["chan-b"], **kw) for p in PROMPTS[:4]])
    assert together == alone
    serial, avs_s = make_engine(engine_lm, tmp_path, adapter_files, overlap_steps=False)
    assert run(serial, [new_seq(p, avs_s["chan-b"], **kw) for p in PROMPTS[:4]]) == alone  # same noise counter
    other_seed = run(engine, [new_seq(PROMPTS[0], avs["chan-b"], **{**kw, "seed": 99})])[0]
    assert other_seed != alone[0]


def test_chunked_prefill_and_preemption(engine_lm, adapter_files, tmp_path, overlap):
    long_prompts = [list(range(1, 90)), list(range(40, 140)), list(range(7, 60))]
    engine, avs = make_engine(engine_lm, tmp_path, adapter_files)
    ref = [run(engine, [new_seq(p, avs["chan-a"], max_tokens=20)])[0] for p in long_prompts]
    # token budget 16: every prompt is prefilled in chunks, mixed with the others' decodes
    chunked, avs = make_engine(engine_lm, tmp_path, adapter_files, max_num_batched_tokens=16, overlap_steps=overlap)
    assert run(chunked, [new_seq(p, avs["chan-a"], max_tokens=20) for p in long_prompts]) == ref
    # 3 x (20 + 60) tokens need 15 blocks; with 10, all three start and the newest get preempted and recomputed
    prompts = [list(range(1, 21)), list(range(50, 70)), list(range(90, 110))]
    ref = [run(engine, [new_seq(p, avs["chan-a"], max_tokens=60, ignore_eos=True)])[0] for p in prompts]
    small, avs = make_engine(engine_lm, tmp_path, adapter_files, kv_cache_max_blocks=10, overlap_steps=overlap)
    seqs = [new_seq(p, avs["chan-a"], max_tokens=60, ignore_eos=True) for p in prompts]
    assert run(small, seqs) == ref
    assert small.scheduler.num_preemptions > 0
    assert small.kv.allocator.num_free == small.kv.allocator.usable
    # the same with prefix caching: cached blocks are evicted when the running ones need them
    small, avs = make_engine(engine_lm, tmp_path, adapter_files, kv_cache_max_blocks=10, overlap_steps=overlap,
                             prefix_caching=True)
    seqs = [new_seq(p, avs["chan-a"], max_tokens=60, ignore_eos=True) for p in prompts]
    assert run(small, seqs) == ref
    assert run(small, [new_seq(prompts[0], avs["chan-a"], max_tokens=60, ignore_eos=True)]) == ref[:1]
    assert small.scheduler.num_preemptions > 0 and small.scheduler.prefix_hit_tokens > 0
    assert small.kv.allocator.num_free == small.kv.allocator.usable


def test_prefix_caching_takes_computed_prompt_blocks(engine_lm, adapter_files, tmp_path, overlap):
    """With prefix caching a prompt starts after the whole blocks an earlier prompt of the same tenant and adapter
    computed, never the block of its own last token, and gives what it gives without the cache; another adapter,
    another tenant or a scoring request takes nothing. Blocks come back as free (cached ones evictable)."""
    shared = list(range(1, 50))  # 49 tokens: blocks 0-2 full, the last token alone in block 3
    prompts = [shared + [7, 8], shared + [9], shared, shared[:48], shared[:40] + [3] * 9]
    plain, avs = make_engine(engine_lm, tmp_path, adapter_files)
    ref = {(i, n): run(plain, [new_seq(p, avs.get(n))])[0] for i, p in enumerate(prompts) for n in (None, "chan-a")}
    engine, avs = make_engine(engine_lm, tmp_path, adapter_files, prefix_caching=True, overlap_steps=overlap)
    sch, alloc = engine.scheduler, engine.kv.allocator

    def hit(seq) -> int:  # the prompt tokens seq found cached
        before = sch.prefix_hit_tokens
        assert run(engine, [seq])[0] == ref[(prompts.index(seq.prompt_ids), "chan-a" if seq.adapter else None)]
        return sch.prefix_hit_tokens - before

    assert hit(new_seq(prompts[0])) == 0
    assert hit(new_seq(prompts[1])) == 48  # blocks 0-2
    assert hit(new_seq(prompts[2])) == 48  # its last token (49th) is computed: block 3 is its own
    assert hit(new_seq(prompts[3])) == 32  # 48 tokens: block 2 holds its last one
    assert hit(new_seq(prompts[4])) == 32  # diverges inside block 2
    assert hit(new_seq(prompts[1], avs["chan-a"])) == 0  # another adapter's K/V
    assert hit(new_seq(prompts[0], avs["chan-a"])) == 48
    other_tenant = new_seq(prompts[1])
    other_tenant.tenant = "other"
    assert hit(other_tenant) == 0
    scoring = new_seq(prompts[1], max_tokens=1, prompt_logprobs=0)
    run(engine, [scoring])
    assert scoring.num_registered == 0 and len(scoring.prompt_logprobs) == len(prompts[1]) - 1
    assert alloc.num_free == alloc.usable and alloc.num_cached >= 8
    # a batch of sequences sharing a prefix, admitted together and one by one, against the plain engine
    seqs = [new_seq(p) for p in prompts]
    assert run(engine, seqs, arrivals=[0, 0, 2, 3, 3]) == [ref[(i, None)] for i in range(len(prompts))]
    assert engine.metrics.registry.get_sample_value("scaleserve_prefix_cache_hits_total") == sch.prefix_hit_tokens


def test_logit_bias_rows_in_a_mixed_batch(engine_lm, tmp_path, overlap):
    """A row's logit_bias moves only that row: +100 makes its token every one it samples (greedy or not) while
    the rows beside it give what they give alone; overlapped steps too."""
    engine, _ = make_engine(engine_lm, tmp_path, overlap_steps=overlap)
    plain = [run(engine, [new_seq(p, max_tokens=8, ignore_eos=True)])[0] for p in PROMPTS[:3]]
    forced = (plain[1][0] + 5) % engine.vocab
    seqs = [new_seq(PROMPTS[0], max_tokens=8, ignore_eos=True),
            new_seq(PROMPTS[1], max_tokens=8, ignore_eos=True, logit_bias=((forced, 100.0),)),
            new_seq(PROMPTS[2], max_tokens=8, ignore_eos=True, logit_bias=((forced, 100.0),), temperature=1.0,
                    seed=5),
            new_seq(PROMPTS[2], max_tokens=8, ignore_eos=True)]
    got = run(engine, seqs)
    assert got[0] == plain[0] and got[3] == plain[2] and got[1] == got[2] == [forced] * 8
    assert (engine.overlapped_steps > 0) == overlap


def test_stop_conditions(engine_lm, tmp_path, overlap):
    engine, _ = make_engine(engine_lm, tmp_path, overlap_steps=overlap)
    (full,) = run(engine, [new_seq(PROMPTS[0], max_tokens=12)])
    # stop token id: ends before it, reason stop
    s = new_seq(PROMPTS[0], max_tokens=12, stop_token_ids=frozenset({full[4]}))
    run(engine, [s])
    first = full.index(full[4])
    assert s.output_ids == full[:first] and s.finish_reason == "stop"
    # stop string: the text ends right before it
    s0 = new_seq(PROMPTS[0], max_tokens=12)
    run(engine, [s0])
    text = "".join(o.text for o in s0.outs)
    assert text == s0.text
    if len(text) >= 6:
        stop = text[3:6]
        s1 = new_seq(PROMPTS[0], max_tokens=12, stop=[stop])
        run(engine, [s1])
        got = "".join(o.text for o in s1.outs)
        assert got == text[: text.index(stop)] and s1.finish_reason == "stop"
    # max_tokens
    s2 = new_seq(PROMPTS[0], max_tokens=3)
    run(engine, [s2])
    assert s2.output_ids == full[:3] and s2.finish_reason == "length"


def test_penalties_and_logprobs(engine_lm, tmp_path, overlap):
    engine, _ = make_engine(engine_lm, tmp_path, overlap_steps=overlap)
    (plain,) = run(engine, [new_seq(PROMPTS[2], max_tokens=16)])
    s = new_seq(PROMPTS[2], max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0, logprobs=3)
    run(engine, [s])
    assert len(set(s.output_ids)) >= len(set(plain))
    lps = [lp for o in s.outs for lp in (o.logprobs or [])]
    assert [lp.token_id for lp in lps] == s.output_ids
    for lp in lps:
        assert len(lp.top) == 3 and lp.logprob <= 0 and lp.top[0][1] >= lp.top[-1][1]


def test_abort_frees_blocks_next_step(engine_lm, tmp_path):
    engine, _ = make_engine(engine_lm, tmp_path)
    a, b = new_seq(PROMPTS[1], max_tokens=100), new_seq(PROMPTS[3], max_tokens=100)
    engine.scheduler.add(a)
    engine.scheduler.add(b)
    for _ in range(3):
        engine.step()
    used = engine.kv.allocator.usable - engine.kv.allocator.num_free
    engine.scheduler.finish(a, "abort")
    assert engine.kv.allocator.usable - engine.kv.allocator.num_free == used - 3  # 37+3 tokens -> 3 blocks
    engine.scheduler.finish(b, "abort")
    assert engine.kv.allocator.num_free == engine.kv.allocator.usable


@pytest.mark.parametrize("text,stops,expect", [
    (["he", "llo wor", "ld"], ["wor"], "hello "),
    (["ab", "c"], ["bcd"], "abc"),
    (["x", "ST", "OP", "y"], ["STOP"], "x"),
    (["a\n", "\nb"], ["\n\n"], "a"),
    (["ab", "c", "d;e"], [";", "!"], "abcd"),
])
def test_cut_stop(text, stops, expect):
    seq = Sequence("x", [1], SamplingParams(max_tokens=10, stop=stops))
    emitted = ""
    for i, d in enumerate(text):
        out, hit = cut_stop(seq, d, stops, final=i == len(text) - 1)
        emitted += out
        seq.text += out
        if hit:
            break
    assert emitted == expect


def test_stop_window_is_the_tail_a_stop_string_can_start_in():
    """Only the last len(longest stop) - 1 characters are searched again: with one-character stops none (the
    window was text[-0:], all of the text, every step: quadratic in the output's length)."""
    assert tail("hello", 0) == "" and tail("hello", 2) == "lo" and tail("hi", 5) == "hi" and tail("", 3) == ""


def test_fast_detokenizer_equals_tokenizer_decode(engine_lm):
    from scaleserve.server.detokenizer import Detokenizer

    tok = engine_lm.tokenizer
    det = Detokenizer(tok, engine_lm.model.args.vocab_size)
    assert det.backend is not None  # the tiny model's tokenizer takes the fast path
    g = torch.Generator().manual_seed(1)
    n = min(len(tok), engine_lm.model.args.vocab_size)
    windows = [torch.randint(0, n, (int(k),), generator=g).tolist() for k in torch.randint(0, 7, (200,), generator=g)]
    assert det.decode_many(windows) == [tok.decode(w, skip_special_tokens=True) for w in windows]


def test_observe_many_equals_observe():
    from prometheus_client import generate_latest

    a, b = Metrics(), Metrics()
    g = torch.Generator().manual_seed(2)
    values = (torch.rand(500, generator=g) ** 4 * 0.3).tolist() + [0.001, 0.0025, 1.0, 5.0]  # bucket edges too
    for v in values:
        a.itl.observe(v)
    for i in range(0, len(values), 37):
        b.observe_many(b.itl, values[i:i + 37])

    def itl_lines(m):
        return [ln for ln in generate_latest(m.registry).decode().splitlines()
                if ln.startswith("scaleserve_inter_token_latency_seconds") and "_created" not in ln]

    la, lb = itl_lines(a), itl_lines(b)
    assert [ln for ln in la if "_sum" not in ln] == [ln for ln in lb if "_sum" not in ln]
    sa, sb = (float(next(ln for ln in x if "_sum" in ln).split()[-1]) for x in (la, lb))
    assert sa == pytest.approx(sb, rel=1e-12)


def test_loop_sinks_batched_per_step_in_order(engine_lm, tmp_path, overlap):
    """LoopSink outputs of one step reach their asyncio queues with one thread hop per step, in order,
    and the tokens are the same as with plain sinks."""
    import asyncio
    import threading

    from scaleserve.server.engine import LoopSink

    engine, _ = make_engine(engine_lm, tmp_path, overlap_steps=overlap)
    expected = run(engine, [new_seq(p) for p in PROMPTS[:3]])
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    hops = [0]
    real = loop.call_soon_threadsafe

    def counting(*a, **kw):
        hops[0] += 1
        return real(*a, **kw)

    loop.call_soon_threadsafe = counting
    got = [[] for _ in PROMPTS[:3]]
    seqs = []
    for i, p in enumerate(PROMPTS[:3]):
        seq = new_seq(p)
        seq.sink = LoopSink(loop, got[i].append)
        seqs.append(seq)
        engine.scheduler.add(seq)
    steps = 0
    while engine.scheduler.has_work():
        engine.step()
        steps += 1
    done = threading.Event()
    real(done.set)
    assert done.wait(10)
    loop.call_soon_threadsafe = real
    real(loop.stop)
    th.join(5)
    assert [[t for o in outs for t in o.token_ids] for outs in got] == expected
    assert all(outs[-1].finished and not any(o.finished for o in outs[:-1]) for outs in got)
    assert hops[0] <= steps < sum(len(outs) for outs in got)


def test_warm_up_touches_no_state(engine_lm, adapter_files, tmp_path):
    """warm_up runs every prefill size and adapter mode through the model (on CPU too; on CUDA it also
    captures the decode graphs) without writing the KV cache or changing any output."""
    engine, avs = make_engine(engine_lm, tmp_path, adapter_files, max_num_batched_tokens=64)
    seqs = [new_seq(p, avs[n]) for p, n in zip(PROMPTS[:3], sorted(avs))]
    before = run(engine, seqs)
    kv_before = [t.clone() for t in engine.kv.k + engine.kv.v]
    free_before = engine.kv.allocator.num_free
    calls = []
    forward = engine.lm.model.forward
    engine.lm.model.forward = lambda batch, *a: calls.append(
        (batch.tokens.numel(), batch.rows.mode, batch.rows.scale_slots)) or forward(batch, *a)
    try:
        engine.warm_up()
    finally:
        del engine.lm.model.forward
    # mode 2 twice: one scale slot (the fold GEMM on CUDA) and several (the per-row tile)
    sizes = (1, 2, 4, 8, 16, 32, 64)
    assert set(calls) == {(t, m, 1) for m in (1, 2, 3) for t in sizes} | {(t, 2, 2) for t in sizes}
    assert all(torch.equal(a, b) for a, b in zip(engine.kv.k + engine.kv.v, kv_before))
    assert engine.kv.allocator.num_free == free_before
    again = [new_seq(p, avs[n]) for p, n in zip(PROMPTS[:3], sorted(avs))]
    assert run(engine, again) == before


SAMPLED = dict(temperature=0.8, top_p=0.95, top_k=40, seed=7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_steps_equal_eager(tiny_model_dir, adapter_files, tmp_path, monkeypatch):
    """On CUDA, decode steps replay graphs and a lone sequence's prefill chunk replays a padded prefill
    graph; in float32 both give the eager steps' tokens (lone prompts, chunked prefill, mixed batches),
    also with overlapped steps (tokens handed to the next graph on the device, pinned copies home, on the
    compute stream or a stream of their own; a greedy step's argmax left where the next replay reads it), with
    batch-1 steps of short contexts on graphs of their own (the attention's splits forced to 4), and with prefix
    caching (a second pass over the lone prompts starts after their cached blocks); and with the batch-1 graphs
    taking their inputs from pinned memory and leaving their tokens there themselves (zero copy) or not; and with
    the decode graphs' argmax as one kernel and their logits in the model's dtype (argmax)."""
    from scaleserve.server import engine as engine_module
    from scaleserve.server import graphs as graphs_module

    outs = {}
    for graphs, overlap, prefix, home, short, zc, argmax in (
            (False, False, False, False, 0, (), False), (True, False, False, False, 0, (), False),
            (True, True, False, False, 0, (), False), (True, True, False, True, 0, (), False),
            (True, False, False, False, 0, (1,), False), (True, True, False, False, 0, (1,), False),
            (True, True, False, False, 4, (1,), False), (True, True, True, False, 0, (1,), False),
            (True, True, False, False, 4, (1,), True), (True, False, False, False, 0, (), True)):
        monkeypatch.setattr(engine_module, "TOKENS_HOME_STREAM", home)
        monkeypatch.setattr(engine_module, "SHORT_DECODE_SPLITS", short)
        monkeypatch.setattr(engine_module, "ZERO_COPY_BUCKETS", zc)
        monkeypatch.setattr(graphs_module, "DECODE_ARGMAX_KERNEL", argmax)
        monkeypatch.setattr(graphs_module, "DECODE_LOGITS_IN_MODEL_DTYPE", argmax)
        lm = load_model(tiny_model_dir, device="cuda", dtype=torch.float32)
        name = f"{graphs}-{overlap}-{prefix}-{home}-{short}-{zc}-{argmax}"
        engine, avs = make_engine(lm, tmp_path / name, adapter_files,
                                  device="cuda", cuda_graphs=graphs, max_num_batched_tokens=32,
                                  overlap_steps=overlap, prefix_caching=prefix)
        names = sorted(avs)
        lone = [run(engine, [new_seq(p, avs[names[i % len(names)]])]) for i, p in enumerate(PROMPTS)]
        if prefix:
            assert [run(engine, [new_seq(p, avs[names[i % len(names)]])]) for i, p in enumerate(PROMPTS)] == lone
            assert engine.scheduler.prefix_hit_tokens > 0
        # one seeded sampling row: its parameters go to the device through the staging ring every step
        together = run(engine, [new_seq(p, avs[n] if i % 3 else None, **(SAMPLED if i == 1 else {})) for i, (p, n) in
                                enumerate(zip(PROMPTS, names * 3))], arrivals=[0, 0, 2, 3, 5, 5])
        outs[graphs, overlap, prefix, home, short, zc, argmax] = (lone, together)
        if graphs:  # every graph path ran: lone prefills, decodes, and a prefill joining running decodes
            assert {"prefill_graph", "decode_graph", "split_graphs"} <= set(engine.step_kinds), engine.step_kinds
        else:
            assert set(engine.step_kinds) == {"eager"}
        assert (engine.overlapped_steps > 0) == overlap
        assert (engine.tokens_in_place > 0) == overlap  # greedy steps' tokens left in the graph's input
        assert (engine.short_steps > 0) == bool(short)  # (the lone prompts: contexts under 4 x 64 tokens)
        assert (engine.tokens_sent_home > 0) == bool(graphs and zc)  # (the lone prompts' greedy batch-1 steps)
        assert engine.kv.allocator.num_free == engine.kv.allocator.usable
    assert all(out == outs[False, False, False, False, 0, (), False] for out in outs.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_step_timing_observes_each_sampled_step(tiny_model_dir, tmp_path):
    """With gpu_step_timing every step that samples observes its forward's GPU time once, under its kind, and
    the times are real: above zero and below the wall time of the whole run; the tokens are the untimed run's."""
    lm = load_model(tiny_model_dir, device="cuda", dtype=torch.float32)
    outs, samples = [], {}
    for timing in (False, True):
        engine, _ = make_engine(lm, tmp_path / str(timing), device="cuda", gpu_step_timing=timing)
        t0 = time.perf_counter()
        outs.append(run(engine, [new_seq(p) for p in PROMPTS[:2]], arrivals=[0, 3]))
        wall, steps = time.perf_counter() - t0, engine.steps
        samples[timing] = {(m.name, m.labels.get("kind")): m.value
                           for fam in engine.metrics.registry.collect() if fam.name == "scaleserve_engine_gpu_step_seconds"
                           for m in fam.samples if m.name.endswith(("_sum", "_count"))}
    assert outs[0] == outs[1]
    assert samples[False] == {}  # timing off: the histogram has no kind at all
    counts = {k: v for (n, k), v in samples[True].items() if n.endswith("_count")}
    sums = {k: v for (n, k), v in samples[True].items() if n.endswith("_sum")}
    assert set(counts) >= {"decode_graph", "prefill_graph"}, counts
    # a step that samples nothing (a prompt chunk's interior) is not timed; 12 tokens took at least 12 that did
    assert 12 <= sum(counts.values()) <= steps, (counts, steps)
    assert all(0 < sums[k] < wall for k in counts), (sums, wall)


def test_decode_graph_argmax_stays_in_its_tokens_input(engine_lm, tmp_path):
    """A decode graph's argmax lands in its bucket's tokens input, and a load that keeps the tokens fills
    every other input: what an overlapped greedy step relies on to hand its tokens to the next replay with
    no copy between them. Checked eagerly on CPU (the graph runs DecodeGraphs.forward)."""
    import numpy as np

    from scaleserve.server.graphs import DecodeGraphs, decode_nbytes, decode_views

    engine, _ = make_engine(engine_lm, tmp_path)
    seqs = [new_seq(p) for p in PROMPTS[:3]]
    for s in seqs:
        engine.scheduler.add(s)
    while any(not s.output_ids for s in seqs):
        engine.step()  # the prompts
    graphs = DecodeGraphs(engine.lm.model, engine.kv, 8, engine.width, engine.device, pool=None)
    sched = engine.scheduler.schedule()
    assert len(sched) == 3 and all(n == 1 for _, n in sched)
    b = graphs.bucket(3)
    mode = engine.slab.mode_for([s.slot for s, _ in sched])
    host = np.zeros(decode_nbytes(b, engine.width), dtype=np.uint8)
    engine._pack_decode(sched, b, host)
    graphs.load(b, torch.from_numpy(host))
    logits, greedy = graphs.forward(graphs.batch(b, mode))
    assert greedy.data_ptr() == graphs.tokens(b).data_ptr()
    eager = engine.lm.model(engine._build_batch(sched, mode), engine.kv.k, engine.kv.v)
    assert torch.equal(graphs.tokens(b)[:3], eager.argmax(-1)) and torch.equal(greedy, logits.argmax(-1))
    # the next step's inputs: every field different from the last ones, tokens included
    nxt = np.zeros_like(host)
    rng = np.random.default_rng(1)
    for v in decode_views(nxt, b, engine.width, np.int64, np.int32):
        v[...] = rng.integers(1, 2 ** 30, size=v.shape)
    kept = graphs.tokens(b).clone()
    graphs.load(b, torch.from_numpy(nxt), keep_tokens=True)
    got = graphs.views[b]
    assert torch.equal(got[0], kept)
    for g, w in zip(got[1:], decode_views(nxt, b, engine.width, np.int64, np.int32)[1:]):
        assert torch.equal(g, torch.from_numpy(np.ascontiguousarray(w)))
    graphs.load(b, torch.from_numpy(nxt))
    assert torch.equal(got[0], torch.from_numpy(decode_views(nxt, b, engine.width, np.int64, np.int32)[0]))
    for s in seqs:
        engine.scheduler.finish(s, "abort")


def test_padded_prefill_batch_equals_eager(engine_lm, adapter_files, tmp_path):
    """The prefill graphs' batch (the chunk, then a padding sequence up to the bucket) gives the chunk's
    logits of the plain batch: checked eagerly on CPU, where the graphs themselves do not run."""
    from scaleserve.server.graphs import PrefillGraphs

    engine, avs = make_engine(engine_lm, tmp_path, adapter_files, max_num_batched_tokens=24)
    for prompt, name in ((PROMPTS[1], sorted(avs)[0]), (PROMPTS[0], None)):
        seq = new_seq(prompt, avs[name] if name else None)
        engine.scheduler.add(seq)
        for _chunk in range(2):  # 37 tokens: chunks of 24 and 13 (the second with a cached context)
            sched = engine.scheduler.schedule()
            (s, n), = sched
            mode = engine.slab.mode_for([s.slot])
            graphs = engine.prefill_graphs = PrefillGraphs(engine.lm.model, engine.kv, 24, engine.width,
                                                           engine.device, pool=None)
            Tb = graphs.bucket(n)
            assert Tb > n
            graphs.load(Tb, engine.staging.upload(engine._pack_prefill([(s, n)], Tb)))
            padded = engine.lm.model(graphs.batch(Tb, mode), engine.kv.k, engine.kv.v)[0]
            eager = engine.lm.model(engine._build_batch(sched, mode), engine.kv.k, engine.kv.v)[0]
            torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
            s.num_computed += n
            if s.num_computed == s.num_tokens:
                break
        engine.scheduler.finish(seq, "abort")


def test_padded_prefill_batch_of_several_chunks_equals_eager(engine_lm, adapter_files, tmp_path):
    """Several requests joining in one step: their chunks (different adapters; one with a cached context,
    one cut by the token budget) in one prefill-graph batch, the empty sequence slots and the padding
    sequence after them, give the chunks' logits of the plain batch."""
    from scaleserve.server.graphs import PrefillGraphs

    engine, avs = make_engine(engine_lm, tmp_path, adapter_files, max_num_batched_tokens=32)
    names = sorted(avs)
    seqs = [new_seq(p, avs[n]) for p, n in zip([PROMPTS[1], PROMPTS[3], PROMPTS[4]], names)]
    engine.scheduler.add(seqs[0])
    first = engine.scheduler.schedule()  # 32 of its 37 tokens, into the KV cache
    engine.lm.model(engine._build_batch(first, engine.slab.mode_for([seqs[0].slot])), engine.kv.k, engine.kv.v)
    seqs[0].num_computed += 32
    for q in seqs[1:]:
        engine.scheduler.add(q)
    sched = engine.scheduler.schedule()
    assert [q for q, _ in sched] == seqs and [k for _, k in sched] == [5, 21, 6]
    graphs = engine.prefill_graphs = PrefillGraphs(engine.lm.model, engine.kv, 32, engine.width, engine.device,
                                                   pool=None, max_seqs=4)
    mode = engine.slab.mode_for([q.slot for q, _ in sched])
    Tb = graphs.bucket(32)
    graphs.load(Tb, engine.staging.upload(engine._pack_prefill(sched, Tb)))
    padded = engine.lm.model(graphs.batch(Tb, mode), engine.kv.k, engine.kv.v)
    batch = engine._build_batch(sched, mode)
    # the host's count of distinct scale slots (1 would let mode 2 take the fold GEMM on CUDA)
    assert batch.rows.scale_slots == len({engine._row_indices(q)[1] for q, _ in sched})
    assert batch.rows.scale_slots == len(set(batch.rows.scale_idx.tolist()))
    eager = engine.lm.model(batch, engine.kv.k, engine.kv.v)
    assert padded.shape[0] == 5  # 4 sequence slots (3 used) + the padding sequence
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)


def test_padded_decode_batch_equals_eager(engine_lm, adapter_files, tmp_path):
    """The decode graphs' batch (rows padded up to the bucket with KV-less base rows) gives the decode
    rows' logits of the plain batch: checked eagerly on CPU, where the graphs themselves do not run."""
    from scaleserve.server.graphs import DecodeGraphs, decode_nbytes

    engine, avs = make_engine(engine_lm, tmp_path, adapter_files)
    seqs = [new_seq(p, avs[n]) for p, n in zip(PROMPTS[:3], sorted(avs))]
    for s in seqs:
        engine.scheduler.add(s)
    while any(s.num_computed < s.num_tokens - 1 for s in seqs):
        engine.step()
    sched = engine.scheduler.schedule()
    assert len(sched) == 3 and all(n == 1 for _, n in sched)
    mode = engine.slab.mode_for([s.slot for s, _ in sched])
    graphs = DecodeGraphs(engine.lm.model, engine.kv, 8, engine.width, engine.device, pool=None)
    b = graphs.bucket(len(sched))
    assert b == 4
    host = torch.randint(0, 256, (decode_nbytes(b, engine.width),), dtype=torch.uint8)  # a reused buffer's bytes
    engine._pack_decode(sched, b, host.numpy())
    graphs.load(b, host)
    padded = engine.lm.model(graphs.batch(b, mode), engine.kv.k, engine.kv.v)[:3]
    eager = engine.lm.model(engine._build_batch(sched, mode), engine.kv.k, engine.kv.v)
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)


def test_overlap_drops_the_row_of_a_sequence_that_stopped_in_flight(engine_lm, tmp_path):
    """With overlap, a sequence that ends on a stop token is only known to have ended after the next
    step was dispatched: that row's output is dropped, the next overlapped step takes the remaining
    rows' tokens by a gather, and everything equals the serial engine."""
    serial, _ = make_engine(engine_lm, tmp_path)
    full = run(serial, [new_seq(PROMPTS[0], max_tokens=12)])[0]
    at = next(i for i in range(2, len(full)) if full.index(full[i]) == i)  # its first time, mid-stream
    seqs_kw = [dict(stop_token_ids=frozenset({full[at]})), {}, dict(max_tokens=9)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    want = run(serial, [new_seq(p, **kw) for p, kw in zip(prompts, seqs_kw)])
    engine, _ = make_engine(engine_lm, tmp_path, overlap_steps=True)
    gathers = []
    tokens_from = engine._tokens_from
    engine._tokens_from = lambda prev, sched: gathers.append((len(prev.seqs), len(sched))) or tokens_from(prev, sched)
    seqs = [new_seq(p, **kw) for p, kw in zip(prompts, seqs_kw)]
    assert run(engine, seqs) == want
    assert want[0] == full[:at] and seqs[0].finish_reason == "stop"
    assert (3, 2) in gathers  # the stopped row was dropped from the step after the one in flight
    assert [o.completion_tokens for o in (s.outs[-1] for s in seqs)] == [len(w) for w in want]
    assert engine.kv.allocator.num_free == engine.kv.allocator.usable


def test_overlap_abort_in_flight_through_the_engine_thread(engine_lm, tmp_path):
    """Engine.abort of a sequence whose token is in flight (engine thread running, overlap on): it ends
    with 'abort', the other sequence's tokens are unchanged, and every KV block comes back."""
    import threading

    serial, _ = make_engine(engine_lm, tmp_path)
    want = run(serial, [new_seq(PROMPTS[3], max_tokens=40, ignore_eos=True)])[0]
    engine, _ = make_engine(engine_lm, tmp_path, overlap_steps=True)
    done = {0: threading.Event(), 1: threading.Event()}
    outs = {0: [], 1: []}

    def sink(i):
        def put(out):
            outs[i].append(out)
            if i == 0 and len(outs[0]) == 5:
                engine.abort(victim)  # from the engine thread, mid-stream, like a disconnect
            if out.finished:
                done[i].set()
        return put

    victim = Sequence("victim", list(PROMPTS[1]), SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                      sink=sink(0))
    other = Sequence("other", list(PROMPTS[3]), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                     sink=sink(1))
    engine.start()
    try:
        engine.add(victim)
        engine.add(other)
        assert done[0].wait(60) and done[1].wait(60)
    finally:
        engine.stop()
    assert outs[0][-1].finish_reason == "abort" and len(victim.output_ids) < 200
    assert [t for o in outs[1] for t in o.token_ids] == want and outs[1][-1].finish_reason == "length"
    assert engine.overlapped_steps > 0
    assert engine.kv.allocator.num_free == engine.kv.allocator.usable


def with_eager_graphs(engine, short_context: int = 0):
    """Give a CPU engine the graph paths of a CUDA one: DecodeGraphs / PrefillGraphs objects (their static
    buffers, packing and padding) whose run() executes the padded batch eagerly instead of a captured
    graph. The engine's graph logic (which rows go to which graph, logits merging, overlapped tokens
    handed to the decode graph's inputs) then runs in CI. short_context: batch-1 decode steps up to this
    context replay short-context graphs (Engine.short_graphs; the CPU attention takes no splits)."""
    from scaleserve.server.graphs import PREFILL_GRAPH_SEQS, DecodeGraphs, PrefillGraphs

    s = engine.settings
    # every "graph" returns its logits in this one buffer, as the captured graphs do from their shared
    # memory pool: a replay overwrites the logits of the replay before
    pool = torch.empty(max(s.max_num_seqs, PREFILL_GRAPH_SEQS + 1), engine.lm.model.embed.num_embeddings)

    def eager_run(graphs):
        def run(b, mode):
            logits, graphs.greedy = graphs.forward(graphs.batch(b, mode))
            return pool[: len(logits)].copy_(logits)
        return run

    engine.graphs = DecodeGraphs(engine.lm.model, engine.kv, s.max_num_seqs, engine.width, engine.device, None)
    engine.prefill_graphs = PrefillGraphs(engine.lm.model, engine.kv, min(s.max_num_batched_tokens, 511),
                                          engine.width, engine.device, None)
    if short_context:
        engine.short_graphs = DecodeGraphs(engine.lm.model, engine.kv, 1, engine.width, engine.device, None,
                                           decode_splits=4)
        engine.short_context = short_context
    for g in filter(None, (engine.graphs, engine.short_graphs, engine.prefill_graphs)):
        g.run = eager_run(g)
    return engine


def test_graph_paths_equal_eager_on_cpu(engine_lm, adapter_files, tmp_path, overlap):
    names = [None, "chan-a", "group-a", "alpha-a", "chan-b", "chan-a"]
    plain, avs = make_engine(engine_lm, tmp_path, adapter_files, max_num_batched_tokens=32)
    want = run(plain, [new_seq(p, avs.get(n)) for p, n in zip(PROMPTS, names)], arrivals=[0, 3, 0, 5, 1, 8])
    alone = [run(plain, [new_seq(p, avs.get(n))])[0] for p, n in zip(PROMPTS, names)]
    engine, avs = make_engine(engine_lm, tmp_path, adapter_files, max_num_batched_tokens=32, overlap_steps=overlap)
    # lone prompts of 2-9 tokens start on the short graphs (the 5- and 9-token ones cross into the full ones within
    # their 12 tokens); the longer prompts and the batches never use them
    with_eager_graphs(engine, short_context=16)
    chunks_per_prefill_graph = []
    prefill_graph = engine._prefill_graph
    engine._prefill_graph = lambda chunks: chunks_per_prefill_graph.append(len(chunks)) or prefill_graph(chunks)
    got = run(engine, [new_seq(p, avs.get(n)) for p, n in zip(PROMPTS, names)], arrivals=[0, 3, 0, 5, 1, 8])
    assert got == want == alone
    assert [run(engine, [new_seq(p, avs.get(n))])[0] for p, n in zip(PROMPTS, names)] == alone
    assert {"prefill_graph", "decode_graph", "split_graphs"} <= set(engine.step_kinds), engine.step_kinds
    assert max(chunks_per_prefill_graph) >= 2  # requests that joined together shared one prefill graph
    assert (engine.overlapped_steps > 0) == overlap
    assert (engine.tokens_in_place > 0) == overlap  # greedy steps' tokens left in the decode graph's input
    assert engine.short_steps > 0 and engine.step_kinds["decode_graph"] > engine.short_steps
    assert engine.kv.allocator.num_free == engine.kv.allocator.usable


@pytest.mark.parametrize("budget", [2048, 16])  # the prompt in one chunk, and in chunks of 16
def test_prompt_logprobs_equal_the_dense_forward(engine_lm, adapter_files, tmp_path, budget):
    """prompt_logprobs (echo): each prompt token after the first gets its logprob given the tokens before
    it and the top alternatives, once, whatever the chunking, next to a normal request in the batch; the
    generated tokens are the same as without scoring."""

    engine, avs = make_engine(engine_lm, tmp_path, adapter_files, max_num_batched_tokens=budget)
    prompt = PROMPTS[1]  # 37 tokens
    plain = run(engine, [new_seq(prompt, avs["chan-a"], max_tokens=4)])[0]
    scored = new_seq(prompt, avs["chan-a"], max_tokens=4, prompt_logprobs=3)
    other = new_seq(PROMPTS[3], avs["group-a"], max_tokens=6)
    got = run(engine, [scored, other])
    assert got[0] == plain and got[1] == run(engine, [new_seq(PROMPTS[3], avs["group-a"], max_tokens=6)])[0]
    assert [lp.token_id for lp in scored.prompt_logprobs] == prompt[1:]
    # the dense forward with the same adapter: row t predicts token t + 1
    slot = engine.registry.acquire(avs["chan-a"])
    try:
        rows = engine.slab.rows([slot], [len(prompt)])
        with torch.no_grad():
            logits = engine.lm.model.forward_dense(torch.tensor([prompt]), rows)[0]
    finally:
        engine.registry.release(avs["chan-a"])
    want = torch.log_softmax(logits.float(), -1)
    for t, lp in enumerate(scored.prompt_logprobs):
        assert abs(lp.logprob - want[t, prompt[t + 1]].item()) < 1e-4
        top = want[t].topk(3)
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert all(abs(v - w) < 1e-4 for (_, v), w in zip(lp.top, top.values.tolist()))


@pytest.mark.parametrize("overlap_on", [False, True])
def test_context_end_stops_at_the_same_token(engine_lm, tmp_path, overlap_on):
    """A sequence that runs into max_model_len ends with its last token at the context's end, overlapped
    or not (a token still in flight must not count as generated)."""
    engine, _ = make_engine(engine_lm, tmp_path, max_model_len=24, overlap_steps=overlap_on)
    seq = new_seq(PROMPTS[0], max_tokens=1000, ignore_eos=True)
    run(engine, [seq])
    assert seq.finish_reason == "length"
    assert len(seq.prompt_ids) + len(seq.output_ids) == 24


def test_slow_steps_are_logged_with_what_they_ran(engine_lm, tmp_path, caplog, monkeypatch):
    """A step past settings.slow_step_warn_ms logs its kind and composition (what every stream waited for);
    off on CPU by default, where the reference path's prefill is slow by nature."""
    engine, _ = make_engine(engine_lm, tmp_path)
    assert engine.slow_step_s == float("inf")
    engine, _ = make_engine(engine_lm, tmp_path, slow_step_warn_ms=50)
    forward = engine._forward

    def stalled(sched, *args, **kwargs):  # a stall inside the step's prefill, as a mid-serving compile would be
        if any(n > 1 for _, n in sched):
            time.sleep(0.08)
        return forward(sched, *args, **kwargs)

    monkeypatch.setattr(engine, "_forward", stalled)
    with caplog.at_level(logging.WARNING, logger="scaleserve.server.engine"):
        run(engine, [new_seq(PROMPTS[1], max_tokens=3), new_seq(PROMPTS[0], max_tokens=3)])
    slow = [r.getMessage() for r in caplog.records if "slow engine step" in r.getMessage()]
    assert len(slow) == 1, slow  # the prefill step only: decode steps ran at full speed
    assert "(eager; 2 sequences, 0 decoding, 2 prefilling 42 tokens;" in slow[0]


def test_eager_steps_key_the_attention_compiles_of_warm_up(engine_lm, tmp_path):
    """Triton keys the attention kernels' compiles by the block table's row stride (== 1, a multiple of 16, or
    else). An eager step's table as wide as its longest sequence would be new to the kernels at each step kind
    warm-up never made (a 1-block prompt, a 9-block one): a compile mid-serving that stalls every stream. Every
    eager step's table is as wide as warm-up's and the graphs'."""
    engine, _ = make_engine(engine_lm, tmp_path, max_num_batched_tokens=32)
    seqs = [new_seq(PROMPTS[2]), new_seq(PROMPTS[1])]  # a 2-token prompt (one block) and a 37-token one
    widths = []
    build = engine._build_batch

    def recording(*args, **kwargs):
        batch = build(*args, **kwargs)
        widths.append(batch.block_tables.stride(0))
        return batch

    engine._build_batch = recording
    run(engine, seqs)
    warm = engine._warm_batch(4, 1).block_tables.stride(0)
    assert widths and set(widths) == {warm} == {engine.width}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_graph_tuning_pins_saves_and_reuses_its_picks(make_tiny_model, tmp_path, monkeypatch):
    """Settings.tune_decode_graph on CUDA: after warm-up the batch-1 GEMV configs are picked in the decode graph,
    pinned, saved under data_dir/kernel-pins/, and read back by the next start. Two candidate configs and at most 4
    sequences (fewer graphs to warm up): session 22's first run with all twelve and 64 passed 7 minutes."""
    from scaleserve.kernels import int4_mma_gemv as mg

    monkeypatch.setattr(mg, "PINNED", {})
    monkeypatch.setattr(mg, "USE_DEVICE_PINS", False)
    monkeypatch.setattr(mg, "LOOKED_UP", set())
    monkeypatch.setattr(mg, "PIN_CONFIGS", mg.PIN_CONFIGS[:2])  # (the autotuners too: the descent starts from theirs)
    for tuner in (mg._tuned, mg._tuned_accum):
        monkeypatch.setattr(tuner, "configs", tuner.configs[:2])
        monkeypatch.setattr(tuner, "cache", {})
    lm = load_model(make_tiny_model(group_size=128), device="cuda", dtype=torch.bfloat16)
    engine, _ = make_engine(lm, tmp_path / "t", device="cuda", cuda_warmup=True, tune_decode_graph=True,
                            max_num_seqs=4)
    engine.warm_up()
    assert mg.LOOKED_UP, "the tiny model's batch-1 step never reached the one-row MMA GEMV"
    engine.tune_decode_graph()
    path = mg.pins_file(tmp_path / "t" / "kernel-pins", torch.cuda.get_device_name())
    pins = mg.read_pins(path)
    assert pins and all(cfg in mg.PIN_CONFIGS for cfg in pins.values())
    assert {k: mg.PINNED[k] for k in pins} == pins
    assert len(run(engine, [new_seq([5, 9, 13, 2, 7], max_tokens=8)])[0]) == 8  # (the graphs captured again run)
    mg.PINNED.clear()
    mg.write_pins(path, {k: mg.PIN_CONFIGS[0] for k in pins})  # (what a later start must take as it is)
    again, _ = make_engine(lm, tmp_path / "t", device="cuda", cuda_warmup=True, tune_decode_graph=True,
                           max_num_seqs=4)
    again.warm_up()
    again.tune_decode_graph()
    assert {k: mg.PINNED[k] for k in pins} == {k: mg.PIN_CONFIGS[0] for k in pins}
