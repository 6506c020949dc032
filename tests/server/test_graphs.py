"""server/graphs.py: a decode bucket's inputs are views of one byte buffer, so one copy fills them all."""

import numpy as np
import torch

from scaleserve.server.graphs import DecodeGraphs, decode_nbytes, decode_views


def test_one_copy_fills_every_decode_input(tiny_lm):
    from scaleserve.server.kv_cache import KVCache

    width = 5
    kv = KVCache.__new__(KVCache)  # (the graphs keep a reference; nothing here reads the cache)
    graphs = DecodeGraphs(tiny_lm.model, kv, 8, width, torch.device("cpu"), pool=None)
    rng = np.random.default_rng(0)
    for b in graphs.buckets:
        host = np.zeros(decode_nbytes(b, width), dtype=np.uint8)
        want = decode_views(host, b, width, np.int64, np.int32)
        for v in want:  # fresh values in every field, so a field read from the wrong bytes shows
            v[...] = rng.integers(-(2 ** 30), 2 ** 30, size=v.shape)
        graphs.load(b, torch.from_numpy(host))
        batch = graphs.batch(b, mode=1)
        rows = batch.rows
        got = (batch.tokens, batch.positions, batch.slot_mapping, batch.seq_lens, rows.chan_idx, rows.scale_idx,
               rows.alpha_idx, batch.block_tables)
        storage = graphs.inputs[b].untyped_storage().data_ptr()
        for g, w in zip(got, want):
            assert g.data_ptr() % 16 == 0  # as a tensor of its own would be: the same kernels' compiles
            assert g.untyped_storage().data_ptr() == storage  # a view of the bucket's buffer: no copy between
            assert g.dtype == {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}[w.dtype]
            assert torch.equal(g, torch.from_numpy(np.ascontiguousarray(w)))
        assert batch.query_start.tolist() == list(range(b + 1)) and batch.logits_index.tolist() == list(range(b))


def test_padded_rows_write_no_kv_until_loaded(tiny_lm):
    from scaleserve.server.kv_cache import KVCache

    graphs = DecodeGraphs(tiny_lm.model, KVCache.__new__(KVCache), 8, 3, torch.device("cpu"), pool=None)
    for b in graphs.buckets:  # warm-up replays every bucket before any step has loaded it
        batch = graphs.batch(b, mode=1)
        assert (batch.slot_mapping == -1).all() and (batch.seq_lens == 0).all()
