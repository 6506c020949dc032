"""`scaleserve train` on tiny random models (CPU): gradients, loss, exactness, frozen base, data errors, CLI."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from scaleserve.adapters.format import AdapterError, BaseSpec, identity_adapter, load_adapter, parse_adapter, validate
from scaleserve.adapters.slab import AdapterSlab
from scaleserve.adapters.train import (
    AdaptedLinearFn,
    TrainConfig,
    collate,
    loss_sum,
    lr_factor,
    train,
    trainable,
)
from scaleserve.adapters.train_data import DataError, load_jsonl, tokenize_dataset
from scaleserve.kernels.linear import RowAdapters
from scaleserve.kernels.quant import dequantize_bcq, dequantize_rtn
from scaleserve.server.cli import main as cli_main
from scaleserve.server.loader import load_model

CONFIGS = [("peqa", "channel"), ("peqa", "group"), ("alphatuning", "channel"), ("alphatuning", "group")]
WORDS = ["red", "green", "blue", "robot", "Bolt", "Paris", "count", "numbers", "colours", "task"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a busy 2-core CI box makes them thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir)  # our own copy: the slab tests attach tables to it


@pytest.fixture(scope="module")
def bcq_lm(make_tiny_model):
    return load_model(make_tiny_model(method="bcq", group_size=64))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def completion_data(tmp_path_factory):
    """A learnable task: the completion is a fixed function of the prompt."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(48):
        i = torch.randint(len(WORDS), (3,), generator=g).tolist()
        rows.append({"prompt": "count " + " ".join(WORDS[j] for j in i) + ":",
                     "completion": " " + " ".join(WORDS[(j + 1) % len(WORDS)] for j in reversed(i))})
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- the autograd Function against autograd through a plain dense weight ------------------------


def _dense_grads(layer, mode, p, q, x, gy):
    p = p.detach().clone().requires_grad_(True)
    q = None if q is None else q.detach().clone().requires_grad_(True)
    codes = layer.codes()
    if mode == "group":
        w = dequantize_rtn(codes, layer.zeros, p, layer.group_size)
    elif mode == "chan":
        w = dequantize_rtn(codes, layer.zeros, layer.scales, layer.group_size) * p[:, None]
    else:
        w = dequantize_bcq(codes, p, q, layer.group_size)
    xr = x.detach().clone().requires_grad_(True)
    (xr @ w.T * gy).sum().backward()
    return xr.grad, p.grad, None if q is None else q.grad


@pytest.mark.parametrize("mode", ["chan", "group", "alpha", "alpha-bcq"])
def test_function_gradients_match_dense_autograd(lm, bcq_lm, mode):
    base = bcq_lm if mode == "alpha-bcq" else lm
    mode = mode.split("-")[0]
    layer = base.model.quant_linears()["layers.0.mlp.down"]  # K = 172: a ragged last group
    N, G, b = layer.out_features, layer.num_groups, layer.bits
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, layer.in_features, generator=g, requires_grad=True)
    gy = torch.randn(7, N, generator=g)
    if mode == "chan":
        p, q = 1 + 0.1 * torch.randn(N, generator=g), None
    elif mode == "group":
        p, q = layer.scales * (1 + 0.1 * torch.randn(N, G, generator=g)), None
    else:
        a0, b0 = layer.base_alphas()
        p = a0 * (1 + 0.1 * torch.randn(b, N, G, generator=g))
        q = b0 + 0.01 * torch.randn(N, G, generator=g)
    pp = p.clone().requires_grad_(True)
    qq = None if q is None else q.clone().requires_grad_(True)
    y = AdaptedLinearFn.apply(x, layer, mode, pp, qq)
    (y * gy).sum().backward()
    gx, gp, gq = _dense_grads(layer, mode, p, q, x, gy)
    torch.testing.assert_close(x.grad, gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pp.grad, gp, rtol=1e-4, atol=1e-4)
    if q is not None:
        torch.testing.assert_close(qq.grad, gq, rtol=1e-4, atol=1e-4)


def test_hidden_dense_is_forward_dense(lm):
    ids = torch.randint(len(lm.tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    rows = RowAdapters.base(ids.numel(), "cpu")
    with torch.no_grad():
        want = lm.model.forward_dense(ids, rows)
        got = lm.model.logits(lm.model.hidden_dense(ids, rows), rows)
    assert torch.equal(got, want)


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,granularity", CONFIGS)
def test_loss_falls(lm, completion_data, kind, granularity):
    cfg = TrainConfig(kind=kind, granularity=granularity, max_steps=30, lr=3e-2, batch_size=8, eval_split=0.25,
                      schedule="constant", warmup_steps=2)
    res = train(lm, completion_data, cfg, progress=False)
    first, last = res.losses[0], sum(res.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last, res.losses)
    assert res.eval_after["loss"] < res.eval_before["loss"]
    assert res.steps == 30 and len(res.losses) == 30


@pytest.mark.parametrize("kind,granularity", CONFIGS)
def test_identity_start_is_the_base_loss(lm, completion_data, kind, granularity):
    """Step 0 of training (the identity adapter) gives the base model's loss: exactly, through the
    served identity adapter; and exactly the base rows' loss for PEQA (same float operations)."""
    ex, _ = tokenize_dataset(lm.tokenizer, load_jsonl(completion_data), 64)
    ids, mask = collate(ex[:6], lm.tokenizer.pad_token_id, "cpu")
    model = lm.model

    def served_loss(rows):
        with torch.no_grad():
            logits = model.forward_dense(ids, rows)[:, :-1][mask[:, 1:]]
            return torch.nn.functional.cross_entropy(logits, ids[:, 1:][mask[:, 1:]], reduction="sum")

    base = served_loss(RowAdapters.base(ids.numel(), "cpu"))
    ident = identity_adapter(lm, kind, per_channel=granularity == "channel")
    slab = AdapterSlab(model, 1, 1, 1)
    ref = slab.write(validate(ident, BaseSpec.from_model(lm)))
    served_ident = served_loss(slab.rows([ref], [ids.numel()]))
    with trainable(model, kind, granularity) as _, torch.no_grad():
        start, _n = loss_sum(model, ids, mask)
    assert torch.equal(start, served_ident)
    if kind == "peqa":
        assert torch.equal(start, base)
    else:  # the rtn base rewritten as alphas: equal up to float rounding
        torch.testing.assert_close(start, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,granularity", CONFIGS)
def test_trained_adapter_served_gives_training_logits(lm, completion_data, kind, granularity):
    """Train a few steps by hand; the exported adapter, through the file format, the slab and the
    engine's forward, gives the training-time logits; greedy generation follows their argmax."""
    model, tok = lm.model, lm.tokenizer
    ex, _ = tokenize_dataset(tok, load_jsonl(completion_data), 64)
    ids, mask = collate(ex[:8], tok.pad_token_id, "cpu")
    with trainable(model, kind, granularity) as wrappers:
        params = [p for w in wrappers.values() for p in w.parameters()]
        opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.0)
        for _ in range(4):
            s, n = loss_sum(model, ids, mask)
            (s / n).backward()
            opt.step()
            opt.zero_grad()
        rows = RowAdapters.base(ids.numel(), "cpu")
        with torch.no_grad():
            train_logits = model.logits(model.hidden_dense(ids, rows), rows)
        tensors = {f"{name}.{suf}": t for name, w in wrappers.items() for suf, t in w.export().items()}
    from scaleserve.adapters.format import Adapter

    adapter = parse_adapter(Adapter(kind, "t", lm.fingerprint, tensors).to_bytes())
    assert adapter.granularity == ("alpha" if kind == "alphatuning" else granularity)
    slab = AdapterSlab(model, 2, 2, 2)
    ref = slab.write(validate(adapter, BaseSpec.from_model(lm)))
    with torch.no_grad():
        served = model.forward_dense(ids, slab.rows([ref], [ids.numel()]))
        base = model.forward_dense(ids, RowAdapters.base(ids.numel(), "cpu"))
    assert not torch.allclose(served, base, atol=1e-3)  # the adapter did change the model
    assert torch.equal(served, train_logits)

    from scaleserve.server.generate import generate_ids

    prompt = ex[0].ids[:10]
    (gen,), _ = generate_ids(lm, [prompt], [adapter], max_new_tokens=6, stop_ids=set())
    seq = torch.tensor([prompt + gen])
    with trainable(model, kind, granularity, adapter):  # anchors = the trained tensors, multipliers 1
        with torch.no_grad():
            r = RowAdapters.base(seq.numel(), "cpu")
            logits = model.logits(model.hidden_dense(seq, r), r)
    assert logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == gen


def test_frozen_tensors_bit_identical(lm, bcq_lm, completion_data):
    for m, kind in ((lm, "peqa"), (lm, "alphatuning"), (bcq_lm, "alphatuning")):
        before = snapshot(m.model)
        layers = m.model.quant_linears()
        train(m, completion_data, TrainConfig(kind=kind, granularity="group", max_steps=3, lr=5e-2), progress=False)
        after = m.model.state_dict()
        assert before.keys() == after.keys()
        for k, v in before.items():
            assert torch.equal(v, after[k]), k
        assert m.model.quant_linears() == layers  # the swap was undone: the same module objects
        assert not any(p.requires_grad for p in m.model.parameters())


def test_init_continues_exactly(lm, completion_data, tmp_path):
    cfg = TrainConfig(kind="peqa", granularity="channel", max_steps=5, lr=3e-2, eval_split=0.25)
    first = train(lm, completion_data, cfg, progress=False)
    path = tmp_path / "a.safetensors"
    first.adapter.save(path)
    second = train(lm, completion_data, cfg, init=load_adapter(path), progress=False)
    assert second.eval_before["loss"] == pytest.approx(first.eval_after["loss"], rel=1e-6)
    # a per-channel adapter continues as group scales s0 * c: the same model, so the same loss
    grp = train(lm, completion_data, TrainConfig(kind="peqa", granularity="group", max_steps=1, lr=1e-9,
                                                 eval_split=0.25), init=load_adapter(path), progress=False)
    assert grp.eval_before["loss"] == pytest.approx(first.eval_after["loss"], rel=1e-5)


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(6, 10, 2, "linear") == 0.5
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "cosine") > 0


# --- data ----------------------------------------------------------------------------------------


def test_masks_completion_and_assistant_turns(lm, tmp_path):
    tok = lm.tokenizer
    p = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "count red:", "completion": " green blue"}])
    (ex,), _ = tokenize_dataset(tok, load_jsonl(p), 256)
    assert tok.decode([t for t, m in zip(ex.ids, ex.mask) if m]) == " green blue" + tok.eos_token
    msgs = [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": "France"},
            {"role": "user", "content": "Bolt?"}, {"role": "assistant", "content": "robot"}]
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    (ex,), _ = tokenize_dataset(tok, load_jsonl(p), 256)
    targets = tok.decode([t for t, m in zip(ex.ids, ex.mask) if m])
    assert targets == "France<|im_end|>\nrobot<|im_end|>\n"
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "red green blue"}])
    (ex,), _ = tokenize_dataset(tok, load_jsonl(p), 2)  # truncated to 2 tokens, first is no target
    assert len(ex.ids) == 2 and ex.mask == [False, True]


@pytest.mark.parametrize("rows,line,needle", [
    ([{"text": "a"}, "{not json", {"text": "b"}], 2, "not valid JSON"),
    ([{"text": "a"}, {"text": "b"}, {"question": "q", "answer": "a"}], 3, "unknown format (keys: answer, question)"),
    ([{"prompt": "a", "completion": "b"}, {"text": "c"}], 2, "a {text} line in a {prompt, completion} file"),
    ([{"text": "a"}, "", "[1, 2]"], 3, "expected a JSON object"),
    ([{"prompt": "a", "completion": 3}], 1, "field 'completion' must be a string"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], 1, "no assistant turn"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}], 1, "messages[0].content"),
    ([{"text": "a", "prompt": "b", "completion": "c"}], 1, "unknown format"),
])
def test_bad_lines_name_their_line(tmp_path, rows, line, needle):
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert e.value.line == line
    assert f"line {line}:" in str(e.value) and needle in str(e.value)


# --- the command line ----------------------------------------------------------------------------


def test_cli_end_to_end(tiny_model_dir, completion_data, tmp_path, monkeypatch, capsys):
    pushed = []
    fake = types.ModuleType("scaleserve.adapters.client")
    fake.push = lambda file, name, url, key: pushed.append((file, name, url, key)) or {"name": name}
    monkeypatch.setitem(sys.modules, "scaleserve.adapters.client", fake)
    out = tmp_path / "task.safetensors"
    rc = cli_main(["train", str(tiny_model_dir), "--data", str(completion_data), "--kind", "alphatuning",
                   "--granularity", "group", "--out", str(out), "--max-steps", "6", "--lr", "3e-2",
                   "--schedule", "linear", "--warmup-steps", "2", "--batch-size", "4", "--grad-accum", "2",
                   "--max-seq-len", "32", "--eval-split", "0.2", "--seed", "7", "--device", "cpu",
                   "--push", "http://srv:8000", "--name", "task-x", "--api-key", "k1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "eval before: loss" in text and "eval after:  loss" in text and "wrote" in text
    a = load_adapter(out)
    assert a.kind == "alphatuning" and a.name == "task-x"
    args = json.loads(a.metadata["training_args"])
    assert args["grad_accum"] == 2 and args["seed"] == 7 and args["schedule"] == "linear"
    assert len(a.metadata["data_sha256"]) == 64
    assert float(a.metadata["eval_loss_after"]) < float(a.metadata["eval_loss_before"])
    assert pushed == [(str(out), "task-x", "http://srv:8000", "k1")]

    # continue from it; then --epochs instead of --max-steps
    out2 = tmp_path / "task2.safetensors"
    assert cli_main(["train", str(tiny_model_dir), "--data", str(completion_data), "--kind", "alphatuning",
                     "--out", str(out2), "--epochs", "0.5", "--init", str(out), "--eval-data",
                     str(completion_data)]) == 0
    a2 = load_adapter(out2)
    assert a2.metadata["train_steps"] == "3"  # ceil(0.5 * 48 / 8)
    assert a2.metadata["init_adapter"] == "task-x"


def test_cli_errors(tiny_model_dir, make_tiny_model, completion_data, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"}])
    out = str(tmp_path / "x.safetensors")
    assert cli_main(["train", str(tiny_model_dir), "--data", str(bad), "--kind", "peqa", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "bad.jsonl" in err

    other = load_model(make_tiny_model(intermediate_size=160))  # another base: other codes, other fingerprint
    foreign = tmp_path / "foreign.safetensors"
    identity_adapter(other, "peqa").save(foreign)
    rc = cli_main(["train", str(tiny_model_dir), "--data", str(completion_data), "--kind", "peqa",
                   "--granularity", "group", "--out", out, "--init", str(foreign)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--init" in err and "made for base" in err

    own = tmp_path / "own.safetensors"
    lm = load_model(tiny_model_dir)
    identity_adapter(lm, "peqa").save(own)  # group-wise
    with pytest.raises(AdapterError, match="--kind is alphatuning"):
        train(lm, completion_data, TrainConfig(kind="alphatuning", max_steps=1), init=load_adapter(own),
              progress=False)
    with pytest.raises(AdapterError, match="--granularity group"):
        train(lm, completion_data, TrainConfig(kind="peqa", granularity="channel", max_steps=1),
              init=load_adapter(own), progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_peqa_on_bcq_base_is_refused(bcq_lm, completion_data):
    with pytest.raises(AdapterError, match="rtn base"):
        train(bcq_lm, completion_data, TrainConfig(kind="peqa", max_steps=1), progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_loss_falls(tiny_model_dir, completion_data):
    lm = load_model(tiny_model_dir, device="cuda")
    for kind in ("peqa", "alphatuning"):
        res = train(lm, completion_data, TrainConfig(kind=kind, granularity="group", max_steps=30, lr=3e-2,
                                                     schedule="constant"), progress=False)
        assert sum(res.losses[-5:]) / 5 < 0.8 * res.losses[0]
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in res.adapter.tensors.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_memory_is_int4_plus_activations(tmp_path):
    """A SmolLM2-shaped int4 model trains on the GPU without a dense copy of its weights: the peak
    memory above the loaded model stays below the bf16 size of its linear weights."""
    from scaleserve.server.random_model import random_model

    lm = random_model("smollm2-135m", device="cuda")
    rows = [{"text": " ".join(f"w{3 + (13 * i + 7 * j) % 4000}" for j in range(48))} for i in range(24)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    dense_bf16 = sum(m.in_features * m.out_features * 2 for m in lm.model.quant_linears().values())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = train(lm, tmp_path / "d.jsonl", TrainConfig(kind="peqa", granularity="group", max_steps=3, batch_size=2,
                                                       max_seq_len=64, eval_split=0.0), progress=False)
    peak = torch.cuda.max_memory_allocated() - before
    assert len(res.losses) == 3 and all(math.isfinite(x) for x in res.losses)
    assert peak < dense_bf16, f"training peaked {peak / 2**20:.0f} MiB above the model; dense bf16 is " \
                              f"{dense_bf16 / 2**20:.0f} MiB"


@pytest.mark.parametrize("K,group_size", [(172, 32), (65, 32), (65, -1), (64, 64)])
def test_code_index_unpacks_like_the_reference(K, group_size):
    from scaleserve.adapters.train import code_index
    from scaleserve.kernels.linear import QuantLinear
    from scaleserve.kernels.quant import pack_int4

    layer = QuantLinear(K, 5, 4, group_size, "rtn")
    codes = torch.randint(0, 16, (5, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(K))
    layer.packed = pack_int4(codes)
    idx = code_index(layer).long()  # [N, G, gl] flat indices into levels [N, G, 16]
    G = layer.num_groups
    assert idx.shape[:2] == (5, G)
    row_group = torch.arange(5 * G).view(5, G, 1) * 16
    flat = (idx - row_group).view(5, -1)
    assert torch.equal(flat[:, :K], codes.long()) and not flat[:, K:].any()
