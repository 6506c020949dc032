"""Random models of a preset's shapes (server/random_model.py), as the GPU benches build them."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from scaleserve.kernels.linear import QuantLinear, RowAdapters
from scaleserve.kernels.quant import dequantize_rtn, unpack_int4
from scaleserve.server.loader import load_model
from scaleserve.server.random_model import random_model, write_random_model


@pytest.mark.parametrize("quantize_lm_head", [False, True])
def test_tiny_random_model_runs(quantize_lm_head):
    lm = random_model("tiny", quantize_lm_head=quantize_lm_head)
    m = lm.model
    assert lm.meta["quantize_lm_head"] is quantize_lm_head
    assert ("lm_head" in lm.meta["quantized_modules"]) is quantize_lm_head
    assert isinstance(m.lm_head, QuantLinear if quantize_lm_head else nn.Linear)
    ids = torch.randint(0, m.args.vocab_size, (2, 7))
    with torch.inference_mode():
        h = m.hidden_dense(ids, RowAdapters.base(14, "cpu"))
        logits = m.logits(h, RowAdapters.base(14, "cpu"))
        assert logits.shape == (2, 7, m.args.vocab_size) and logits.isfinite().all()
        # the outputs stay ~unit scale (what the random scales are drawn for), not exploding or vanishing
        assert 0.05 < float(logits.std()) < 20
        if quantize_lm_head:
            head = m.lm_head
            w = dequantize_rtn(unpack_int4(head.packed, head.in_features), head.zeros, head.scales, head.group_size)
            want = nn.functional.linear(m.norm(h), w.to(h.dtype))
            torch.testing.assert_close(logits, want.float(), rtol=1e-4, atol=1e-4)


def _bench_serve_module():
    """bench/serve.py (not a package) as a module: its HF baseline is what the GPU bench compares against."""
    path = Path(__file__).resolve().parents[2] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_written_model_with_an_int4_head_loads_and_matches_the_benchs_bf16_copy(tmp_path):
    out = write_random_model(tmp_path / "model", "tiny", seed=3, quantize_lm_head=True)
    lm = load_model(out)
    m = lm.model
    assert lm.meta["quantize_lm_head"] is True and isinstance(m.lm_head, QuantLinear)
    # the bench's transformers copy dequantizes every int4 weight, the head included, to bf16
    hf = _bench_serve_module().hf_bf16_from(lm)
    ids = torch.randint(0, m.args.vocab_size, (2, 9))
    with torch.inference_mode():
        ours = m.forward_dense(ids, RowAdapters.base(ids.numel(), "cpu"))
        theirs = hf(ids).logits.float()
    assert (ours - theirs).norm() / ours.norm() < 0.03  # bf16 against our float32 CPU path
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9
