"""KV blocks, their reference counts, the eviction-ordered free queue and the hash -> block map.

All blocks are usable, block 0 included: runners pad slot_mapping with -1 (which attention
kernels skip) rather than pointing padding at a reserved block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    # Set while the block is full and findable by prefix hash; cleared when it is evicted.
    block_hash: int | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    """Hands out blocks; allocation says "no" (None) instead of raising.

    Invariant: a block is in the free queue iff its ref_cnt is 0. A free block may still be
    cached (block_hash set): it stays findable until allocation takes it from the head of the
    queue (LRU eviction), which is when its hash entry is dropped.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Head = next to evict/allocate, tail = most recently freed.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}
        self.num_evictions = 0
        # Called with a cached block about to be reused (its contents are still intact).
        self.on_evict: Callable[[KVBlock], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free queue in eviction order (head first); for tests and debugging."""
        return list(self._free)

    def get_new_blocks(self, n: int) -> list[KVBlock] | None:
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        # Reversed: the tail of a sequence (least likely to be shared as a prefix) reaches the
        # free queue first and is therefore evicted first.
        for block in reversed(list(blocks)):
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the cache, pulling them out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def cache_full_block(self, block: KVBlock, block_hash: int) -> bool:
        """Make a full block findable by hash. False when caching is off, or when another block
        already holds this hash (two requests computed the same prefix at once): the block then
        stays private and is recycled when freed."""
        if not self.enable_caching:
            return False
        if block.block_hash is not None:
            assert block.block_hash == block_hash, "a cached block cannot change its hash"
            return True
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def cached_hashes(self) -> list[int]:
        """Hashes of every findable block, the next to be evicted first: the free ones in
        eviction order, then those in use."""
        free = self._free
        idle = [b.block_hash for b in free.values() if b.block_hash is not None]
        return idle + [h for h, b in self._cached.items() if b.block_id not in free]

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def uncache_block(self, block: KVBlock) -> None:
        """Forget a block's hash (its contents are about to be overwritten)."""
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def _evict(self, block: KVBlock) -> None:
        if self.on_evict is not None:
            self.on_evict(block)
        self.uncache_block(block)
        self.num_evictions += 1
