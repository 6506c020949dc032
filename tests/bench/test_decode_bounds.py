"""bench/decode_bounds.py's variants: the attention launch configs it times are set while a graph is captured and put
back after (CPU: no graph is captured here)."""

import importlib.util
import os
from pathlib import Path

import torch

# decode_bounds imports triton, which reads TRITON_INTERPRET once, at its first import: this folder is collected before
# tests/kernels (whose conftest sets it), so set here as there, or the kernel tests would find no driver
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from scaleserve.kernels import attention  # noqa: E402

# loaded from its file: bench/ on sys.path would shadow Hugging Face's `kernels` with bench/kernels.py
_spec = importlib.util.spec_from_file_location("decode_bounds", Path(__file__).resolve().parents[2] / "bench" /
                                               "decode_bounds.py")
decode_bounds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode_bounds)
CPU = torch.device("cpu")


@pytest.mark.parametrize("variant,bad", [("attn-n32-w2-s4", []), ("attn-m1", []), ("attn-m1-n32", ["attn-m1-n32"]), ("silu+attn-s16", []),
                                         ("attn-n32-e1", []), ("attn-e0", []), ("attn-e2", ["attn-e2"]), ("attention", []),
                                         ("attn", ["attn"]), ("attn-x", ["attn-x"]), ("merge+nope", ["nope"]),
                                         ("embed-scaled+argmax-kernel", []), ("bf16-logits-off", []),
                                         ("argmax", ["argmax"]), ("embed-scaled-on", ["embed-scaled-on"])])
def test_variant_names(variant, bad):
    assert decode_bounds.unknown_parts(variant) == bad


def test_an_attention_config_holds_while_captured_and_is_put_back():
    before = (attention.DECODE_BLOCK_N, attention.DECODE_NUM_WARPS, attention.decode_num_splits,
              attention.DECODE_MERGE_WARPS, attention.DECODE_EARLY_KV)
    want = attention.decode_num_splits(1, 32, 4096, CPU)
    with decode_bounds.leaving_out({"attn-n16-w2-s5-m1-e0"}):
        assert (attention.DECODE_BLOCK_N, attention.DECODE_NUM_WARPS, attention.DECODE_MERGE_WARPS) == (16, 2, 1)
        assert attention.DECODE_EARLY_KV is False  # (on by default)
        assert attention.decode_num_splits(1, 32, 4096, CPU) == 5
    assert (attention.DECODE_BLOCK_N, attention.DECODE_NUM_WARPS, attention.decode_num_splits,
            attention.DECODE_MERGE_WARPS, attention.DECODE_EARLY_KV) == before
    assert attention.decode_num_splits(1, 32, 4096, CPU) == want
    with decode_bounds.leaving_out({"attn-s3"}):  # the others as they were
        assert (attention.DECODE_BLOCK_N, attention.DECODE_NUM_WARPS) == before[:2]
        assert attention.DECODE_MERGE_WARPS == before[3]
        assert attention.decode_num_splits(1, 32, 4096, CPU) == 3


def test_a_switch_holds_while_captured_and_is_put_back():
    """embed-scaled / bf16-logits / argmax-kernel turn their module switch on for the capture, NAME-off turns it
    off; each goes back to what it was after, also when the capture fails."""
    from scaleserve.server import graphs, model

    before = (model.EMBED_SCALED, graphs.DECODE_LOGITS_IN_MODEL_DTYPE, graphs.DECODE_ARGMAX_KERNEL)
    with decode_bounds.leaving_out({"embed-scaled", "argmax-kernel"}):
        assert model.EMBED_SCALED is True and graphs.DECODE_ARGMAX_KERNEL is True
        assert graphs.DECODE_LOGITS_IN_MODEL_DTYPE == before[1]
    assert (model.EMBED_SCALED, graphs.DECODE_LOGITS_IN_MODEL_DTYPE, graphs.DECODE_ARGMAX_KERNEL) == before
    with pytest.raises(RuntimeError, match="capture failed"):
        with decode_bounds.leaving_out({"bf16-logits", "embed-scaled-off"}):
            assert graphs.DECODE_LOGITS_IN_MODEL_DTYPE is True and model.EMBED_SCALED is False
            raise RuntimeError("capture failed")
    assert (model.EMBED_SCALED, graphs.DECODE_LOGITS_IN_MODEL_DTYPE, graphs.DECODE_ARGMAX_KERNEL) == before


def test_twice_captures_two_steps_the_second_on_the_firsts_argmax():
    """`twice`: DecodeGraphs.forward runs the model twice while the variant holds, the second step embedding the
    argmax the first left in the tokens input; put back after."""
    from types import SimpleNamespace

    from scaleserve.server.graphs import DecodeGraphs

    seen = []

    def model(batch, k, v, float_logits=True):  # logits whose argmax is each row's token + 1
        seen.append(batch.tokens.clone())
        return torch.nn.functional.one_hot(batch.tokens + 1, 16).float()

    fake = SimpleNamespace(model=model, kv=SimpleNamespace(k=None, v=None))
    batch = SimpleNamespace(tokens=torch.tensor([3, 7]))
    forward = DecodeGraphs.forward
    with decode_bounds.leaving_out({"twice"}):
        logits, tokens = DecodeGraphs.forward(fake, batch)
    assert [t.tolist() for t in seen] == [[3, 7], [4, 8]]
    assert tokens.tolist() == [5, 9] and batch.tokens.tolist() == [5, 9] and logits.shape == (2, 16)
    assert DecodeGraphs.forward is forward
    seen.clear()
    DecodeGraphs.forward(fake, SimpleNamespace(tokens=torch.tensor([1])))
    assert len(seen) == 1
