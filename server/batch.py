"""Batch: what one engine step hands the model. Every sequence's new tokens, flattened."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleserve.kernels.linear import RowAdapters


@dataclass
class Batch:
    tokens: torch.Tensor  # [T] int64, new tokens of all sequences back to back
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, KV-cache slot (block * block_size + offset); -1 = padding
    block_tables: torch.Tensor  # [B, max_blocks] int32, each sequence's KV blocks in order
    seq_lens: torch.Tensor  # [B] int32, context length after this step (cached + new)
    query_start: torch.Tensor  # [B+1] int32, start of each sequence's tokens in `tokens`
    logits_index: torch.Tensor  # [B] int64, row of each sequence's last new token
    rows: RowAdapters  # per token [T]: adapter slab indices
    max_query_len: int  # host-side: 1 means a pure decode step
    # host-side: the decode attention's context splits (kernels/attention.py paged_attention's num_splits); None: its
    # heuristic, from the block table's capacity
    decode_splits: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @classmethod
    def build(cls, seqs: list[tuple[list[int], int, list[int]]], block_size: int, rows: RowAdapters,
              device) -> "Batch":
        """seqs: (new token ids, number already cached, block table) per sequence; rows per token."""
        tokens, positions, slots, qstart, lens, logits_index = [], [], [], [0], [], []
        max_blocks = max(len(bt) for _, _, bt in seqs)
        for new, cached, bt in seqs:
            for j, t in enumerate(new):
                pos = cached + j
                tokens.append(t)
                positions.append(pos)
                slots.append(bt[pos // block_size] * block_size + pos % block_size)
            qstart.append(qstart[-1] + len(new))
            lens.append(cached + len(new))
            logits_index.append(qstart[-1] - 1)
        tables = [bt + [0] * (max_blocks - len(bt)) for _, _, bt in seqs]
        return cls(
            tokens=torch.tensor(tokens, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            query_start=torch.tensor(qstart, dtype=torch.int32, device=device),
            logits_index=torch.tensor(logits_index, dtype=torch.int64, device=device),
            rows=rows,
            max_query_len=max(len(n) for n, _, _ in seqs),
        )
