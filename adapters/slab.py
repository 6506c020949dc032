"""GPU slots for resident adapters: preallocated tables on every QuantLinear, slot 0 = base.

Three tables per linear, each with its own capacity, because the adapters differ ~100x in size:
  chan   [Sc, N]        per-channel PEQA multipliers (slot 0 = ones)
  scales [Sg, N, G]     group-wise PEQA scales (slot 0 = the base scales s0)
  alphas [Sa, b, N, G]  AlphaTuning alphas, betas [Sa, N, G] (slot 0 = the base in alpha form)
An adapter lives in one slot of one table (SlotRef). A sequence's rows carry the three indices
(kernels.linear.RowAdapters); every layer reads the same indices, so one load serves all layers.
"""

from __future__ import annotations

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


class AdapterSlab:
    def __init__(self, model, chan_slots: int = 64, group_slots: int = 4, alpha_slots: int = 16):
        self.model = model
        self.layers: dict[str, QuantLinear] = model.quant_linears()
        first = next(iter(self.layers.values()))
        self.device = first.packed.device
        self.bcq_base = first.method == "bcq"
        # fp16 multipliers on the GPU keep a 7B per-channel adapter under 3 MB; fp32 elsewhere
        chan_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.capacity = {"chan": chan_slots + 1, "group": 0 if self.bcq_base else group_slots + 1,
                         "alpha": alpha_slots + 1}
        for m in self.layers.values():
            N, G, b = m.out_features, m.num_groups, m.bits
            m.slab_chan = torch.ones(self.capacity["chan"], N, dtype=chan_dtype, device=self.device)
            if self.bcq_base:
                m.slab_scales = None
            else:
                m.slab_scales = torch.empty(self.capacity["group"], N, G, device=self.device)
                m.slab_scales[0] = m.scales.float()
            a, beta = m.base_alphas()
            m.slab_alphas = torch.empty(self.capacity["alpha"], b, N, G, device=self.device)
            m.slab_betas = torch.empty(self.capacity["alpha"], N, G, device=self.device)
            m.slab_alphas[0], m.slab_betas[0] = a, beta
            m.invalidate_caches()
        self._free = {t: list(range(self.capacity[t] - 1, 0, -1)) for t in TABLES}

    def table_for(self, adapter: Adapter) -> str:
        return _TABLE_OF[adapter.granularity]

    def free_slots(self, table: str) -> int:
        return len(self._free[table])

    def write(self, adapter: Adapter) -> SlotRef:
        """Copy a validated adapter into a free slot of its table. Call between engine steps."""
        table = self.table_for(adapter)
        if not self._free[table]:
            raise SlabFull(f"no free {table} slot ({self.capacity[table] - 1} in all)")
        ref = SlotRef(table, self._free[table].pop())
        self.copy_into(ref, adapter)
        return ref

    def copy_into(self, ref: SlotRef, adapter: Adapter) -> None:
        # One staged host->device transfer: every layer's tensors in one pinned buffer.
        host = torch.cat([t.reshape(-1).float() for _, t in sorted(adapter.tensors.items())])
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        off = 0
        for key, t in sorted(adapter.tensors.items()):
            mod, _, suf = key.rpartition(".")
            m = self.layers[mod]
            chunk = dev[off : off + t.numel()].view(t.shape)
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
        if ref.index in self._free[ref.table]:
            raise ValueError(f"slot {ref} released twice")
        self._free[ref.table].append(ref.index)

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
        t = torch.tensor(idx, dtype=torch.int32).reshape(-1, 3).to(self.device)
        return RowAdapters(t[:, 0], t[:, 1], t[:, 2], self.mode_for(refs))
