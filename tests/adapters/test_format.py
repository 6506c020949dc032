"""Adapter files: round trip, and validation errors that name the first offending tensor."""

import math
import struct

import pytest
import torch

from scaleserve.adapters.format import (
    Adapter,
    AdapterError,
    BaseSpec,
    describe,
    identity_adapter,
    load_adapter,
    parse_adapter,
    validate,
)


@pytest.fixture(scope="module")
def spec(tiny_lm):
    return BaseSpec.from_model(tiny_lm)


@pytest.mark.parametrize("kind,per_channel", [("peqa", False), ("peqa", True), ("alphatuning", False)])
def test_round_trip(tiny_lm, spec, tmp_path, kind, per_channel):
    a = identity_adapter(tiny_lm, kind, per_channel=per_channel, name="t")
    a.save(tmp_path / "a.safetensors")
    b = load_adapter(tmp_path / "a.safetensors")
    assert (b.kind, b.name, b.base_fingerprint) == (kind, "t", tiny_lm.fingerprint)
    assert b.granularity == ("alpha" if kind == "alphatuning" else "channel" if per_channel else "group")
    assert set(b.tensors) == set(a.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k])
    validate(b, spec)
    d = describe(b)
    assert d["modules"] == 8 and d["size_bytes"] == b.nbytes


def _mutate(a, key, value):
    t = dict(a.tensors)
    if value is None:
        del t[key]
    else:
        t[key] = value
    return Adapter(a.kind, a.name, a.base_fingerprint, t)


def test_validation_errors_name_the_tensor(tiny_lm, spec):
    peqa = identity_adapter(tiny_lm, "peqa")
    alpha = identity_adapter(tiny_lm, "alphatuning")
    key = "layers.1.mlp.down.scales"
    cases = [
        (_mutate(peqa, key, torch.ones(64, 5)), rf"{key}: shape \[64, 5\], expected \[64, 6\]"),
        (_mutate(peqa, key, None), rf"tensor {key} is missing"),
        (_mutate(peqa, key, peqa.tensors[key].clone().fill_(math.nan)), rf"{key}: contains NaN or Inf"),
        (_mutate(peqa, key, peqa.tensors[key].clone().fill_(math.inf)), rf"{key}: contains NaN or Inf"),
        (_mutate(peqa, "layers.0.attn.extra.scales", torch.ones(3)), r"layers.0.attn.extra.scales: not a peqa"),
        (_mutate(peqa, key, torch.ones(64)), rf"{key}: channel scales in an adapter whose other scales are group"),
        (_mutate(alpha, "layers.0.attn.o.alphas", torch.ones(3, 64, 2)),
         r"layers.0.attn.o.alphas: shape \[3, 64, 2\], expected \[4, 64, 2\]"),
        (Adapter("peqa", "x", "0" * 64, peqa.tensors), "made for base 000000000000"),
    ]
    for adapter, msg in cases:
        with pytest.raises(AdapterError, match=msg):
            validate(adapter, spec)


def test_peqa_needs_rtn_base(make_tiny_model, tiny_lm):
    from scaleserve.server.loader import load_model

    bcq = load_model(make_tiny_model("llama", "bcq", 32))
    with pytest.raises(AdapterError, match="PEQA adapters need an rtn base"):
        identity_adapter(bcq, "peqa")
    peqa = identity_adapter(tiny_lm, "peqa")
    with pytest.raises(AdapterError, match="PEQA adapters need an rtn base|made for base"):
        validate(Adapter("peqa", "x", bcq.fingerprint, peqa.tensors), BaseSpec.from_model(bcq))


def test_container_errors(tiny_lm):
    good = identity_adapter(tiny_lm, "peqa").to_bytes()
    cases = [
        (b"PK\x03\x04 this is a zip", "header"),
        (good[:-10], "truncated"),
        (struct.pack("<Q", 1 << 40) + b"{}", "not a safetensors file .or truncated.: its first 8 bytes give a "
                                               "1099511627776-byte header, the file has 2 bytes"),
        (b"a text file, not an adapter\n", "not a safetensors file"),  # (it said: a header exceeding the limit)
        (b"abc", "shorter than"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ]
    for data, msg in cases:
        with pytest.raises(AdapterError, match=msg):
            parse_adapter(data)
    with pytest.raises(AdapterError, match="header of [0-9]+ bytes exceeds the 64-byte limit"):
        parse_adapter(good, max_header_bytes=64)
    import json

    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + n])
    header["__metadata__"]["kind"] = "lora"
    raw = json.dumps(header).encode()
    with pytest.raises(AdapterError, match="'kind' is 'lora'"):
        parse_adapter(struct.pack("<Q", len(raw)) + raw + good[8 + n :])
    header["__metadata__"]["kind"] = "peqa"
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = "I64"
    raw = json.dumps(header).encode()
    with pytest.raises(AdapterError, match=f"tensor {key}: dtype I64 not allowed"):
        parse_adapter(struct.pack("<Q", len(raw)) + raw + good[8 + n :])
