"""BlockAllocator: blocks held, freed, cached under a prefix hash, taken back by lookup and evicted."""

from __future__ import annotations

import pytest

from scaleserve.server.kv_cache import BlockAllocator


def test_blocks_go_out_and_come_back():
    a = BlockAllocator(6)  # blocks 1..5 (0 is reserved)
    got = a.allocate(3)
    assert len(set(got)) == 3 and 0 not in got and a.num_free == 2 and a.usage() == pytest.approx(0.6)
    with pytest.raises(MemoryError, match="3 blocks asked, 2 free"):
        a.allocate(3)
    a.free(got)
    assert a.num_free == a.usable == 5 and sorted(a.allocate(5)) == [1, 2, 3, 4, 5]


def test_cached_blocks_are_shared_kept_and_evicted_oldest_first():
    a = BlockAllocator(5)  # blocks 1..4
    b1, b2 = a.allocate(2)
    a.register(b1, b"h1")
    a.register(b2, b"h2")
    a.register(b2, b"other")  # one hash a block
    assert a.lookup([b"h1", b"h2", b"h3"]) == [b1, b2]  # now held twice
    a.free([b1, b2])  # by the first holder
    assert a.num_free == 2  # still held by the second
    held = a.lookup([b"h1"])  # a third holder of b1
    a.free([b1, b2])  # the second holder: b2 is cached and nobody's, b1 is still held
    assert held == [b1] and a.num_free == 3 and a.num_cached == 2
    # three blocks asked: the two plain free ones first, then b2 evicted from the cache; b1 is never handed out
    got = a.allocate(3)
    assert b1 not in got and b2 in got and a.lookup([b"h2"]) == [] and a.num_cached == 1 and a.num_free == 0
    with pytest.raises(MemoryError):
        a.allocate(1)
    a.free(held)
    assert a.num_free == 1 and a.lookup([b"h1"]) == [b1] and a.num_free == 0  # taken back out of the evictable ones
    a.free([b1])
    a.free(got)
    assert a.num_free == a.usable


def test_eviction_order_is_least_recently_freed():
    a = BlockAllocator(4)  # blocks 1..3
    blocks = a.allocate(3)
    for i, b in enumerate(blocks):
        a.register(b, bytes([i]))
    a.free([blocks[1]])
    a.free([blocks[0]])
    a.free([blocks[2]])
    assert a.allocate(1) == [blocks[1]] and a.lookup([bytes([1])]) == []
    assert a.lookup([bytes([0])]) == [blocks[0]] and a.allocate(1) == [blocks[2]]
