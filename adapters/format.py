"""The adapter file: safetensors tensors + string metadata, and its validation against a base.

Metadata (safetensors header `__metadata__`, all strings):
  format = "scaleserve-adapter", format_version = "1", kind = "peqa" | "alphatuning",
  base_fingerprint = the base model's sha256 (scaleserve.json), name = a human label,
  plus free-form keys (training arguments, eval figures...) stored as JSON strings.
Tensors, for every quantized module NAME of the base (all of them, none extra):
  peqa:        NAME.scales  [N] (multiplies every group scale of row n) or [N, G] (replaces s0)
  alphatuning: NAME.alphas  [bits, N, G] and optionally NAME.betas [N, G]
Values must be finite; dtypes float16, bfloat16 or float32. docs/adapters.md states the semantics.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from scaleserve.kernels.quant import num_groups

FORMAT = "scaleserve-adapter"
FORMAT_VERSION = "1"
KINDS = ("peqa", "alphatuning")
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
MAX_HEADER_BYTES = 16 << 20


class AdapterError(ValueError):
    """A bad adapter; the message names the first offending tensor or field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class BaseSpec:
    """What an adapter must match: taken from a loaded base model."""

    fingerprint: str
    method: str  # rtn | bcq
    bits: int
    group_size: int
    modules: dict[str, tuple[int, int]]  # name -> (N, K)

    @classmethod
    def from_model(cls, lm) -> "BaseSpec":
        mods = {n: (m.out_features, m.in_features) for n, m in lm.model.quant_linears().items()}
        meta = lm.meta
        return cls(meta["base_fingerprint"], meta["method"], meta["bits"], meta["group_size"], mods)

    def groups(self, name: str) -> int:
        return num_groups(self.modules[name][1], self.group_size)


@dataclass
class Adapter:
    kind: str
    name: str
    base_fingerprint: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def granularity(self) -> str:
        """'channel' for [N] PEQA scales, 'group' for [N, G] PEQA scales, 'alpha' for AlphaTuning."""
        if self.kind == "alphatuning":
            return "alpha"
        t = next(iter(self.tensors.values()))
        return "channel" if t.dim() == 1 else "group"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        meta = dict(self.metadata)
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, kind=self.kind, name=self.name,
                    base_fingerprint=self.base_fingerprint)
        return st_save({k: v.contiguous() for k, v in self.tensors.items()}, metadata=meta)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)


def read_header(data: bytes, max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """Parse and bound-check a safetensors header without touching the tensor bytes."""
    if len(data) < 8:
        raise AdapterError("not a safetensors file: shorter than its 8-byte header length", "file")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):  # (first: any other file, text for one, reads as an absurd header length)
        raise AdapterError(f"not a safetensors file (or truncated): its first 8 bytes give a {n}-byte header, "
                           f"the file has {len(data) - 8} bytes after them", "file")
    if n > max_header_bytes:
        raise AdapterError(f"safetensors header of {n} bytes exceeds the {max_header_bytes}-byte limit", "file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"not a safetensors file: header is not JSON ({e})", "file") from None
    if not isinstance(header, dict):
        raise AdapterError("not a safetensors file: header is not a JSON object", "file")
    body = len(data) - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or "dtype" not in info or "data_offsets" not in info:
            raise AdapterError(f"tensor {name}: malformed header entry", name)
        if info["dtype"] not in DTYPES:
            raise AdapterError(f"tensor {name}: dtype {info['dtype']} not allowed (float16, bfloat16, float32)", name)
        start, end = info["data_offsets"]
        if end > body or start > end:
            raise AdapterError(f"tensor {name}: data runs past the end of the file (truncated?)", name)
    return header


def parse_adapter(data: bytes, max_header_bytes: int = MAX_HEADER_BYTES) -> Adapter:
    """bytes -> Adapter. Checks the container and metadata, not the fit to a base (see validate)."""
    header = read_header(data, max_header_bytes)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise AdapterError(f"metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}", "format")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"metadata 'format_version' {meta.get('format_version')!r} is not supported "
                           f"(this server reads {FORMAT_VERSION!r})", "format_version")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise AdapterError(f"metadata 'kind' is {kind!r}; expected one of {', '.join(KINDS)}", "kind")
    if not meta.get("base_fingerprint"):
        raise AdapterError("metadata 'base_fingerprint' is missing", "base_fingerprint")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type
        raise AdapterError(f"not a readable safetensors file: {e}", "file") from None
    extra = {k: v for k, v in meta.items()
             if k not in ("format", "format_version", "kind", "name", "base_fingerprint")}
    return Adapter(kind, meta.get("name", ""), meta["base_fingerprint"], tensors, extra)


def load_adapter(path: str | Path) -> Adapter:
    path = Path(path)
    if path.is_dir():
        raise AdapterError(f"{path} is a directory, not an adapter file", "file")
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    return parse_adapter(path.read_bytes())


def validate(adapter: Adapter, base: BaseSpec) -> Adapter:
    """Check the adapter fits `base` exactly; returns it with float32 tensors. Raises AdapterError."""
    if adapter.base_fingerprint != base.fingerprint:
        raise AdapterError(
            f"adapter was made for base {adapter.base_fingerprint[:12]}..., this server's base is "
            f"{base.fingerprint[:12]}...", "base_fingerprint")
    if adapter.kind == "peqa" and base.method != "rtn":
        raise AdapterError("PEQA adapters need an rtn base (this base is bcq: use an AlphaTuning adapter)", "kind")
    suffixes = ("scales",) if adapter.kind == "peqa" else ("alphas", "betas")
    for key in sorted(adapter.tensors):
        mod, _, suf = key.rpartition(".")
        if mod not in base.modules or suf not in suffixes:
            raise AdapterError(f"tensor {key}: not a {adapter.kind} tensor of any quantized module of this base", key)
    granularity = None
    out = {}
    for mod in sorted(base.modules):
        N, K = base.modules[mod]
        G = base.groups(mod)
        if adapter.kind == "peqa":
            t = _need(adapter, f"{mod}.scales")
            g = "channel" if t.dim() == 1 else "group"
            if granularity is None:
                granularity = g
            want = (N,) if g == "channel" else (N, G)
            _check_shape(f"{mod}.scales", t, want, granularity, g)
            out[f"{mod}.scales"] = _finite(f"{mod}.scales", t)
        else:
            a = _need(adapter, f"{mod}.alphas")
            _check_shape(f"{mod}.alphas", a, (base.bits, N, G))
            out[f"{mod}.alphas"] = _finite(f"{mod}.alphas", a)
            b = adapter.tensors.get(f"{mod}.betas")
            if b is not None:
                _check_shape(f"{mod}.betas", b, (N, G))
                out[f"{mod}.betas"] = _finite(f"{mod}.betas", b)
    return Adapter(adapter.kind, adapter.name, adapter.base_fingerprint, out, adapter.metadata)


def _need(adapter: Adapter, key: str) -> torch.Tensor:
    t = adapter.tensors.get(key)
    if t is None:
        raise AdapterError(f"tensor {key} is missing", key)
    return t


def _check_shape(key, t, want, granularity=None, g=None):
    if granularity is not None and g != granularity:
        raise AdapterError(f"tensor {key}: {g} scales in an adapter whose other scales are {granularity}-wise", key)
    if tuple(t.shape) != tuple(want):
        raise AdapterError(f"tensor {key}: shape {list(t.shape)}, expected {list(want)}", key)


def _finite(key, t):
    t = t.float()
    if not torch.isfinite(t).all():
        raise AdapterError(f"tensor {key}: contains NaN or Inf", key)
    return t


def identity_adapter(lm, kind: str, per_channel: bool = False, name: str = "identity") -> Adapter:
    """The adapter that reproduces the base exactly (PEQA: s0 or ones; AlphaTuning: the base's alphas)."""
    if kind not in KINDS:
        raise AdapterError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}", "kind")
    if kind == "peqa" and lm.meta["method"] != "rtn":
        raise AdapterError("PEQA adapters need an rtn base (this base is bcq)", "kind")
    tensors = {}
    for mod, m in lm.model.quant_linears().items():
        if kind == "peqa":
            tensors[f"{mod}.scales"] = torch.ones(m.out_features) if per_channel else m.scales.float().cpu().clone()
        else:
            a, b = m.base_alphas()
            tensors[f"{mod}.alphas"] = a.cpu().clone()
            tensors[f"{mod}.betas"] = b.cpu().clone()
    return Adapter(kind, name, lm.fingerprint, tensors)


def describe(adapter: Adapter) -> dict:
    mods = sorted({k.rsplit(".", 1)[0] for k in adapter.tensors})
    return {
        "name": adapter.name, "kind": adapter.kind, "granularity": adapter.granularity,
        "base_fingerprint": adapter.base_fingerprint, "modules": len(mods),
        "tensors": len(adapter.tensors), "size_bytes": adapter.nbytes,
        "parameters": sum(t.numel() for t in adapter.tensors.values()),
        "metadata": adapter.metadata,
    }

