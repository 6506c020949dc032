"""The model against Hugging Face transformers, the paged path against the dense path, and mixed
adapter batches against dense merged references."""

import pytest
import torch
from hf_reference import hf_model_with, random_adapter

from scaleserve.adapters.format import identity_adapter, validate
from scaleserve.adapters.slab import BASE, AdapterSlab
from scaleserve.kernels.linear import RowAdapters
from scaleserve.kernels.quant import QuantConfig, dequantize_rtn, quantize_rtn
from scaleserve.server.batch import Batch
from scaleserve.server.kv_cache import KVCache
from scaleserve.server.loader import load_model, quantize_checkpoint

ARCH_CASES = {
    "llama": {},
    "llama3-rope-tied": dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": {},
    "qwen3": {},
    "mistral": {},
}


def _arch(case):
    return case.split("-")[0].replace("llama3", "llama")


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_unquantized_path_matches_hf(case, tmp_path, make_hf_checkpoint):
    """Weights already on the int4 grid quantize losslessly, so our model must equal HF's on them."""
    from transformers import AutoModelForCausalLM

    src = make_hf_checkpoint(tmp_path / "hf", _arch(case), **ARCH_CASES[case])
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "proj" in name:
                p.copy_(dequantize_rtn(*quantize_rtn(p, 4, 32), 32))  # on the grid
            else:
                p.copy_(p.bfloat16().float())  # embeddings, norms, biases are stored in bf16
    hf.save_pretrained(src)
    quantize_checkpoint(src, tmp_path / "q", QuantConfig("rtn", 4, 32), progress=False)
    lm = load_model(tmp_path / "q")
    ids = torch.randint(0, lm.model.args.vocab_size, (2, 13))
    ours = lm.model.forward_dense(ids, RowAdapters.base(26, "cpu"))
    ref = hf(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,method,group_size", [
    ("llama", "rtn", 32), ("llama", "rtn", -1), ("qwen2", "rtn", 128), ("qwen3", "bcq", 64), ("llama", "bcq", 32),
])
def test_quantized_matches_hf_with_dequantized_weights(make_tiny_model, arch, method, group_size):
    lm = load_model(make_tiny_model(arch, method, group_size))
    ids = torch.randint(0, lm.model.args.vocab_size, (3, 9))
    rows = RowAdapters.base(27, "cpu", bcq_base=method == "bcq")
    torch.testing.assert_close(lm.model.forward_dense(ids, rows), hf_model_with(lm)(ids).logits,
                               rtol=1e-4, atol=1e-4)


def _run_paged(lm, prompts, refs, slab, block_size=4, chunks=(5,)):
    """Prefill `prompts` in chunks of the given sizes (then the rest), all sequences in one batch
    per step, with shuffled KV blocks. Returns each sequence's logits at its last prompt token."""
    a = lm.model.args
    kv = KVCache(a.n_layers, 64, block_size, a.n_kv_heads, a.head_dim, torch.float32, "cpu")
    perm = torch.randperm(63).add(1).tolist()
    need = [-(-len(p) // block_size) for p in prompts]
    tables, off = [], 0
    for n in need:
        tables.append(perm[off : off + n])
        off += n
    done = [0] * len(prompts)
    last = [None] * len(prompts)
    sizes = list(chunks)
    while any(d < len(p) for d, p in zip(done, prompts)):
        size = sizes.pop(0) if sizes else 10**9
        live = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        seqs, counts = [], []
        for i in live:
            new = prompts[i][done[i] : done[i] + size]
            seqs.append((new, done[i], tables[i]))
            counts.append(len(new))
        rows = slab.rows([refs[i] for i in live], counts)
        logits = lm.model(Batch.build(seqs, block_size, rows, "cpu"), kv.k, kv.v)
        for j, i in enumerate(live):
            done[i] += counts[j]
            last[i] = logits[j]
    return torch.stack(last)


def test_paged_chunked_prefill_matches_dense(tiny_lm):
    lm = tiny_lm
    slab = AdapterSlab(lm.model, 2, 2, 2)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (1, 7, 12, 4)]
    got = _run_paged(lm, prompts, [BASE] * 4, slab, chunks=(3, 2))
    for i, p in enumerate(prompts):
        ref = lm.model.forward_dense(torch.tensor([p]), RowAdapters.base(len(p), "cpu"))[0, -1]
        torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-4)


def test_one_token_steps_match_dense(tiny_lm):
    """Steps of one new token per sequence (how decode runs: the logits take every row, with the last
    sublayer's output added inside the final norm, no gathers) give the dense forward's logits, for
    prompts of different lengths that drop out of the batch as they finish."""
    lm = tiny_lm
    slab = AdapterSlab(lm.model, 2, 2, 2)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (1, 6, 3, 9)]
    got = _run_paged(lm, prompts, [BASE] * 4, slab, chunks=(1,) * 9)
    for i, p in enumerate(prompts):
        ref = lm.model.forward_dense(torch.tensor([p]), RowAdapters.base(len(p), "cpu"))[0, -1]
        torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "bcq"])
def test_mixed_adapter_batch_matches_dense_merged(make_tiny_model, method):
    """Rows with PEQA [N,G], PEQA [N], AlphaTuning and the base in one batch, each equal to an HF
    model with that row's adapter merged."""
    lm = load_model(make_tiny_model("llama", method, 32))
    if method == "rtn":
        adapters = [None, random_adapter(lm, "peqa", "group", 1), random_adapter(lm, "peqa", "channel", 2),
                    random_adapter(lm, "alphatuning", seed=3), random_adapter(lm, "peqa", "channel", 4), None]
    else:
        adapters = [None, random_adapter(lm, "alphatuning", seed=5), random_adapter(lm, "alphatuning", seed=6)]
    from scaleserve.adapters.format import BaseSpec

    spec = BaseSpec.from_model(lm)
    slab = AdapterSlab(lm.model, 4, 4, 4)
    refs = [BASE if x is None else slab.write(validate(x, spec)) for x in adapters]
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (6, 9, 3, 11, 5, 8)][: len(adapters)]
    got = _run_paged(lm, prompts, refs, slab, chunks=(4,))
    for i, (p, x) in enumerate(zip(prompts, adapters)):
        ref = hf_model_with(lm, x)(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-4, msg=f"row {i} ({x and x.kind})")


def test_identity_adapters_reproduce_the_base(tiny_lm):
    lm = tiny_lm
    from scaleserve.adapters.format import BaseSpec

    spec = BaseSpec.from_model(lm)
    slab = AdapterSlab(lm.model, 2, 2, 2)
    idents = [identity_adapter(lm, "peqa"), identity_adapter(lm, "peqa", per_channel=True),
              identity_adapter(lm, "alphatuning")]
    refs = [BASE] + [slab.write(validate(x, spec)) for x in idents]
    p = torch.randint(0, 300, (10,)).tolist()
    got = _run_paged(lm, [p] * 4, refs, slab)
    assert torch.equal(got[1], got[0]) and torch.equal(got[2], got[0])  # PEQA identities: bit-exact
    torch.testing.assert_close(got[3], got[0], rtol=1e-5, atol=1e-5)  # alpha form: other rounding


def test_rope_table_rows_are_the_direct_formula(tiny_lm):
    """rope() gathers rows of a per-device table: the same float32 values the formula gives at each
    position (first, last, random), and a longer table when a caller needs positions past the model's."""
    m = tiny_lm.model
    n = m.args.max_position_embeddings
    pos = torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (13,))])

    def direct(p):
        freqs = p.float()[..., None] * m.inv_freq
        emb = torch.cat((freqs, freqs), -1)
        return (emb.cos() * m.rope_scaling)[..., None, :], (emb.sin() * m.rope_scaling)[..., None, :]

    for got, want in zip(m.rope(pos), direct(pos)):
        assert got.shape == (15, 1, m.args.head_dim)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    far = torch.tensor([n + 5])
    for got, want in zip(m.rope(far, n + 6), direct(far)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("int4_head", [False, True])
@pytest.mark.parametrize("embed_scaled", [False, True])
def test_decode_with_the_norms_in_the_projections_matches_the_norm_kernels(int4_head, embed_scaled, tmp_path,
                                                                           make_hf_checkpoint, monkeypatch):
    """A one-token step with every RMSNorm inside the projections around it (Transformer.decode_fused_norms: the
    o / down projections add into the residual stream and write x * weight, qkv / gate-up / an int4 head scale by
    the norm's rsqrt) gives the logits and K/V cache writes of the step with the norm kernels, with its embedding,
    first scaled input and rope rows from torch ops or from one kernel (EMBED_SCALED). The MMA GEMV runs natively
    on CUDA (bf16) or under the interpreter on the CPU (float32, the step forced onto that path)."""
    from triton.runtime.interpreter import InterpretedFunction

    from scaleserve.kernels import int4_matmul, int4_mma_gemv
    from scaleserve.server import model as model_module
    from scaleserve.server.model import Transformer

    monkeypatch.setattr(model_module, "EMBED_SCALED", embed_scaled)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not isinstance(int4_mma_gemv._mma_gemv_kernel, InterpretedFunction):
        pytest.skip("the kernels were imported without TRITON_INTERPRET=1 (run with tests/kernels, or set it)")
    # widths the MMA GEMV takes on the GPU: K a multiple of 8, group size 128 (one ragged group at K = 64)
    src = make_hf_checkpoint(tmp_path / "hf", "llama", intermediate_size=176)
    qdir = tmp_path / "q"
    quantize_checkpoint(src, qdir, QuantConfig("rtn", 4, 128), quantize_lm_head=int4_head, progress=False)
    m = load_model(qdir, device=dev).model
    with torch.no_grad():  # (HF starts every norm weight at 1, which would hide a norm weight left out)
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    a, bs = m.args, 4
    slab = AdapterSlab(m, 2, 2, 2)
    kv = [KVCache(a.n_layers, 16, bs, a.n_kv_heads, a.head_dim, m.embed.weight.dtype, dev) for _ in range(2)]
    for layer in range(a.n_layers):
        for c0, c1 in ((kv[0].k[layer], kv[1].k[layer]), (kv[0].v[layer], kv[1].v[layer])):
            c0.copy_(torch.randn(c0.shape))
            c1.copy_(c0)
    batch = Batch.build([([11], 6, [2, 5])], bs, slab.rows([BASE], [1]), dev)  # 6 cached, a 7th token
    fused = []
    real = Transformer.fuses_norms
    monkeypatch.setattr(int4_matmul, "FUSE_NORMS", True)
    if dev == "cpu":  # fused_ok keeps CPU tensors on the reference ops: force the step through the kernels
        monkeypatch.setattr(Transformer, "fuses_norms", lambda self, x, rows: bool(fused.append(1)) or True)
    else:
        monkeypatch.setattr(Transformer, "fuses_norms",
                            lambda self, x, rows: bool(fused.append(1)) or real(self, x, rows))
    with torch.inference_mode():
        got = m(batch, kv[1].k, kv[1].v)
        assert fused and m.fuses_norms(m.embed(batch.tokens), batch.rows), "the step did not take the fused norms"
        monkeypatch.setattr(int4_matmul, "FUSE_NORMS", False)
        monkeypatch.setattr(Transformer, "fuses_norms", real)
        want = m(batch, kv[0].k, kv[0].v)
    assert not m.fuses_norms(m.embed(batch.tokens), batch.rows)
    tol = 3e-2 if dev == "cuda" else 1e-4  # bf16 on CUDA: the roundings of x * weight and of the stream differ
    scale = want.abs().max()
    assert (got - want).abs().max() <= tol * scale, float((got - want).abs().max() / scale)
    for c_got, c_want in zip(kv[1].k + kv[1].v, kv[0].k + kv[0].v):
        torch.testing.assert_close(c_got, c_want, rtol=tol, atol=tol)


def test_decode_fused_rope_matches_the_unfused_layer(tiny_lm, monkeypatch):
    """Attention.decode_fused_rope (the decode kernel rotates q / k and writes the new K/V row) gives the layer's
    output and caches of the path that rotates first, for a decode batch of different contexts with a graph's
    padding row (context 0, slot -1). Runs the Triton kernel: on CUDA, or on the CPU under its interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    from scaleserve.kernels import attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not isinstance(attention._decode_kernel, InterpretedFunction):
        pytest.skip("the kernels were imported without TRITON_INTERPRET=1 (run with tests/kernels, or set it)")
    m = tiny_lm.model.to(dev)
    a, bs = m.args, 4
    layer = m.layers[1].attn
    kv = [KVCache(1, 16, bs, a.n_kv_heads, a.head_dim, m.embed.weight.dtype, dev) for _ in range(2)]
    for c in (kv[0].k[0], kv[0].v[0]):
        c.copy_(torch.randn(c.shape))
    kv[1].k[0].copy_(kv[0].k[0])
    kv[1].v[0].copy_(kv[0].v[0])
    # contexts 1, 6 and 9 after this step (so 0, 5 and 8 cached), then a padding row
    seqs = [([7], 0, [3]), ([8], 5, [5, 2]), ([9], 8, [9, 1, 12])]
    slab = AdapterSlab(m, 2, 2, 2)
    batch = Batch.build(seqs + [([0], 0, [0])], bs, slab.rows([BASE] * 4, [1] * 4), dev)
    batch.slot_mapping[3], batch.seq_lens[3] = -1, 0
    x = torch.randn(4, a.dim, device=dev, dtype=m.embed.weight.dtype)
    cos, sin = m.rope(batch.positions)
    monkeypatch.setattr(attention, "DECODE_FUSED_ROPE", False)  # the layer's own path: RoPE launch, then attention
    with torch.inference_mode():
        want = layer(x, batch.rows, cos, sin, batch, kv[0].k[0], kv[0].v[0])  # CPU: the reference ops
        got = layer.o(layer.decode_fused_rope(layer.qkv(x, batch.rows), cos, sin, batch, kv[1].k[0], kv[1].v[0]).flatten(-2),
                      batch.rows)
    # on CUDA the float32 model's attention dots run in TF32 (tl.dot's default), and the fused path takes the
    # new key's score outside them: the two paths part at TF32's rounding there
    tol = 5e-3 if dev == "cuda" else 1e-4
    torch.testing.assert_close(got[:3], want[:3], rtol=tol, atol=tol)
    torch.testing.assert_close(kv[1].k[0], kv[0].k[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(kv[1].v[0], kv[0].v[0])
