"""GPU slots for resident adapters: preallocated tables on every QuantLinear, slot 0 = base.

Three tables per linear, each with its own capacity, because the adapters differ ~100x in size:
  chan   [Sc, N]        per-channel PEQA multipliers (slot 0 = ones)
  scales [Sg, N, G]     group-wise PEQA scales (slot 0 = the base scales s0)
  alphas [Sa, b, N, G]  AlphaTuning alphas, betas [Sa, N, G] (slot 0 = the base in alpha form)
An adapter lives in one slot of one table (SlotRef). A sequence's rows carry the three indices
(kernels.linear.RowAdapters); every layer reads the same indices, so one load serves all layers.

Two tiers, both least-recently-used, keyed by an opaque hashable key (the registry uses
(tenant, name, version)):
  GPU tier   the slots above; acquire(key, adapter) pins a slot, unpin(key) releases the pin.
             A pinned slot (a running request reads it) is never evicted or overwritten.
  host tier  up to `host_slots` adapters pre-flattened into one (pinned, on CUDA) staging buffer
             each, so a GPU load is exactly one host->device copy. Host buffers are never read by
             a running step (the copy finishes before the step that uses the slot), so evicting
             them needs no pins.
Device writes happen only in acquire/write/copy_into: call them from the engine thread, between
steps. retire/unpin only move slot indices between lists (no device work), so they are safe from
any thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from scaleserve.kernels.linear import MODE_ALPHA, MODE_CHANNEL, MODE_GROUP, QuantLinear, RowAdapters

from .format import Adapter

TABLES = ("chan", "group", "alpha")
_TABLE_OF = {"channel": "chan", "group": "group", "alpha": "alpha"}


@dataclass(frozen=True)
class SlotRef:
    table: str  # "base" | "chan" | "group" | "alpha"
    index: int

    @property
    def is_base(self) -> bool:
        return self.table == "base"


BASE = SlotRef("base", 0)


class SlabFull(RuntimeError):
    pass


@dataclass
class _Slot:
    ref: SlotRef
    pins: int = 0
    retired: bool = False  # a newer version replaced it / it was deleted: free at the last unpin


def _n_major(S: int, N: int, G: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An [S, N, G] table stored with N contiguous: a kernel tile of [rows, BLOCK_N] gathers one group's
    values for BLOCK_N outputs in one coalesced read, and needs no copy."""
    return torch.empty(S, G, N, dtype=dtype, device=device).transpose(1, 2)


class AdapterSlab:
    def __init__(self, model, chan_slots: int = 64, group_slots: int = 4, alpha_slots: int = 16,
                 host_slots: int = 0):
        self.model = model
        self.layers: dict[str, QuantLinear] = model.quant_linears()
        first = next(iter(self.layers.values()))
        self.device = first.packed.device
        self.bcq_base = first.method == "bcq"
        # fp16 tables on the GPU (the kernels read any float dtype and compute in fp32): a 7B per-channel
        # adapter stays under 3 MB, and the fixed group / alpha tables take half the memory of fp32
        # (Llama-2-7B g128: 101 MB per group slot, 506 MB per alpha slot). fp32 elsewhere.
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.capacity = {"chan": chan_slots + 1, "group": 0 if self.bcq_base else group_slots + 1,
                         "alpha": alpha_slots + 1}
        # Every layer's per-channel table is a column range of one [Sc, sum N] table, in the order a staged
        # adapter lists its tensors (sorted names): a per-channel adapter then loads as one host->device
        # copy straight into its row. The kernels read the ranges through their row stride.
        self._chan_keys = sorted(f"{name}.scales" for name in self.layers)
        total = sum(m.out_features for m in self.layers.values())
        self.chan_table = torch.ones(self.capacity["chan"], total, dtype=dtype, device=self.device)
        off = 0
        for key in self._chan_keys:
            m = self.layers[key.rpartition(".")[0]]
            m.slab_chan = self.chan_table[:, off : off + m.out_features]
            off += m.out_features
        for m in self.layers.values():
            N, G, b = m.out_features, m.num_groups, m.bits
            if self.bcq_base:
                m.slab_scales = None
            else:
                m.slab_scales = _n_major(self.capacity["group"], N, G, dtype, self.device)
                m.slab_scales[0] = m.scales
            a, beta = m.base_alphas()
            m.slab_alphas = _n_major(self.capacity["alpha"] * b, N, G, dtype, self.device).unflatten(0, (-1, b))
            m.slab_betas = _n_major(self.capacity["alpha"], N, G, dtype, self.device)
            m.slab_alphas[0], m.slab_betas[0] = a, beta
            m.invalidate_caches()
        self._free = {t: list(range(self.capacity[t] - 1, 0, -1)) for t in TABLES}
        self.table_dtype = dtype
        self.host_slots = host_slots
        self._lock = threading.RLock()
        self._slots: OrderedDict = OrderedDict()  # key -> _Slot, least recently used first
        self._host: OrderedDict = OrderedDict()  # key -> flat staging buffer, least recently used first
        self.loads = 0  # host->device adapter copies so far
        self.host_hits = 0

    def table_for(self, adapter: Adapter) -> str:
        return _TABLE_OF[adapter.granularity]

    def table_bytes(self) -> dict[str, int]:
        """Device bytes of each table, all slots (base slot included)."""
        out = {"chan": self.chan_table.numel() * self.chan_table.element_size(), "group": 0, "alpha": 0}
        for m in self.layers.values():
            if m.slab_scales is not None:
                out["group"] += m.slab_scales.numel() * m.slab_scales.element_size()
            out["alpha"] += (m.slab_alphas.numel() + m.slab_betas.numel()) * m.slab_alphas.element_size()
        return out

    def free_slots(self, table: str) -> int:
        return len(self._free[table])

    def write(self, adapter: Adapter) -> SlotRef:
        """Copy a validated adapter into a free slot of its table. Call between engine steps."""
        table = self.table_for(adapter)
        with self._lock:
            if not self._free[table]:
                raise SlabFull(f"no free {table} slot ({self.capacity[table] - 1} in all)")
            ref = SlotRef(table, self._free[table].pop())
        self.copy_into(ref, adapter)
        return ref

    def stage(self, adapter: Adapter, key=None) -> torch.Tensor:
        """The adapter's tensors flattened (sorted by name) into one host buffer, pinned on CUDA.
        With a key, the buffer is cached in the host tier (LRU, `host_slots` entries)."""
        if key is not None:
            with self._lock:
                buf = self._host.get(key)
                if buf is not None:
                    self._host.move_to_end(key)
                    self.host_hits += 1
                    return buf
        # the tensors travel in the tables' dtype (fp16 on CUDA): half the bytes
        buf = torch.cat([t.reshape(-1).to(self.table_dtype) for _, t in sorted(adapter.tensors.items())])
        if self.device.type == "cuda":
            buf = buf.pin_memory()
        if key is not None and self.host_slots > 0:
            with self._lock:
                self._host[key] = buf
                while len(self._host) > self.host_slots:
                    self._host.popitem(last=False)
        return buf

    def copy_into(self, ref: SlotRef, adapter: Adapter, key=None) -> None:
        # One staged host->device transfer: every layer's tensors in one (pinned) buffer.
        host = self.stage(adapter, key)
        self.loads += 1
        if ref.table == "chan" and sorted(adapter.tensors) == self._chan_keys:
            self.chan_table[ref.index].copy_(host, non_blocking=True)
            return
        dev = host.to(self.device, non_blocking=True)
        off = 0
        for key, t in sorted(adapter.tensors.items()):
            mod, _, suf = key.rpartition(".")
            m = self.layers[mod]
            chunk = dev[off : off + t.numel()].view(t.shape)  # copy_ below casts to the table dtype
            off += t.numel()
            if suf == "scales" and ref.table == "chan":
                m.slab_chan[ref.index] = chunk
            elif suf == "scales":
                m.slab_scales[ref.index] = chunk
            elif suf == "alphas":
                m.slab_alphas[ref.index] = chunk
            else:
                m.slab_betas[ref.index] = chunk
        if adapter.kind == "alphatuning" and not any(k.endswith(".betas") for k in adapter.tensors):
            for m in self.layers.values():
                m.slab_betas[ref.index].zero_()

    def release(self, ref: SlotRef) -> None:
        if ref.is_base:
            return
        with self._lock:
            if ref.index in self._free[ref.table]:
                raise ValueError(f"slot {ref} released twice")
            self._free[ref.table].append(ref.index)

    # --- keyed residency: LRU over both tiers, pins ------------------------------------------

    def acquire(self, key, adapter: Adapter) -> SlotRef:
        """Make `adapter` (identified by `key`) resident and pin it. Engine thread, between steps.
        Evicts the least recently used unpinned slot of its table if none is free; SlabFull if
        every slot of the table is pinned."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:  # a retired slot still holds valid data for requests admitted before
                self._slots.move_to_end(key)
                slot.pins += 1
                return slot.ref
            table = self.table_for(adapter)
            if not self._free[table]:
                victim = next((k for k, s in self._slots.items()
                               if s.pins == 0 and s.ref.table == table), None)
                if victim is None:
                    raise SlabFull(f"every {table} slot ({self.capacity[table] - 1}) is in use by a running request")
                self._free[table].append(self._slots.pop(victim).ref.index)
            ref = SlotRef(table, self._free[table].pop())
        try:
            self.copy_into(ref, adapter, key)
        except BaseException:
            self.release(ref)
            raise
        with self._lock:
            self._slots[key] = _Slot(ref, pins=1)
        return ref

    def unpin(self, key) -> None:
        """Drop one pin; a retired slot is freed when its last pin goes."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return
            slot.pins = max(0, slot.pins - 1)
            if slot.pins == 0 and slot.retired:
                del self._slots[key]
                self._free[slot.ref.table].append(slot.ref.index)

    def retire(self, key) -> None:
        """The key will not be acquired again (new version, deleted): free its slot now if unpinned,
        else at the last unpin; drop its host buffer."""
        with self._lock:
            self._host.pop(key, None)
            slot = self._slots.get(key)
            if slot is None:
                return
            slot.retired = True
            if slot.pins == 0:
                del self._slots[key]
                self._free[slot.ref.table].append(slot.ref.index)

    def is_resident(self, key) -> bool:
        with self._lock:
            s = self._slots.get(key)
            return s is not None and not s.retired

    def pins(self, key) -> int:
        with self._lock:
            s = self._slots.get(key)
            return 0 if s is None else s.pins

    def in_host_cache(self, key) -> bool:
        with self._lock:
            return key in self._host

    def resident_keys(self) -> list:
        with self._lock:
            return [k for k, s in self._slots.items() if not s.retired]

    def row_indices(self, ref: SlotRef) -> tuple[int, int, int]:
        """(chan_idx, scale_idx, alpha_idx) of one sequence's rows."""
        if ref.table == "chan":
            return ref.index, 0, -1
        if ref.table == "group":
            return 0, ref.index, -1
        if ref.table == "alpha":
            return 0, 0, ref.index
        return 0, 0, 0 if self.bcq_base else -1

    def mode_for(self, refs) -> int:
        tables = {r.table for r in refs}
        if self.bcq_base or "alpha" in tables:
            return MODE_ALPHA
        if "group" in tables:
            return MODE_GROUP
        return MODE_CHANNEL

    def rows(self, refs: list[SlotRef], counts: list[int], pad_to: int | None = None) -> RowAdapters:
        """Per-token indices for sequences with `counts` tokens each (padded rows use the base)."""
        idx = []
        for ref, n in zip(refs, counts):
            idx.extend([self.row_indices(ref)] * n)
        if pad_to is not None:
            idx.extend([self.row_indices(BASE)] * (pad_to - len(idx)))
        # [3, M] so each index vector is contiguous (the kernels read them with unit stride)
        t = torch.tensor(idx, dtype=torch.int32).reshape(-1, 3).T.contiguous().to(self.device)
        return RowAdapters(t[0], t[1], t[2], self.mode_for(refs))
