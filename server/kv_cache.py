"""Paged KV cache: fixed-size blocks per layer, and the allocator that hands them to sequences."""

from __future__ import annotations

from collections import OrderedDict

import torch


class KVCache:
    """k[layer], v[layer]: [num_blocks, block_size, KVH, head_dim]. Block 0 is never handed out:
    padded rows of a captured decode graph write there harmlessly."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(n_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * block_size * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class BlockAllocator:
    """Hands out blocks 1 .. num_blocks - 1. With prefix caching, a full block of prompt K/V can be registered
    under the hash of its tokens and everything before them (Scheduler.block_hashes); a later sequence with the
    same prefix takes it by lookup() instead of computing it again. Blocks count their holders: a registered
    block whose last holder frees it stays cached, evictable in least-recently-freed order, until allocate()
    needs it, so num_free counts it as free."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # block 0 reserved
        self._refs = [0] * num_blocks
        self._by_hash: dict[bytes, int] = {}  # prefix hash -> block
        self._hash_of: dict[int, bytes] = {}  # block -> its prefix hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.usable

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"KV cache exhausted: {n} blocks asked, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # the cached block freed longest ago leaves the cache
                b, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, prefix_hash: bytes) -> None:
        """Offer a held block whose K/V are complete under prefix_hash (a no-op where another block has it)."""
        if prefix_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[prefix_hash] = block
            self._hash_of[block] = prefix_hash

    def lookup(self, prefix_hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of prefix_hashes from the first, each now also held by the
        caller (free() them as any other)."""
        out = []
        for h in prefix_hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            self._evictable.pop(b, None)
            self._refs[b] += 1
            out.append(b)
        return out
