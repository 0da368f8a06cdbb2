"""A second KV tier in host memory: blocks evicted from the device pool are copied here and
copied back on a prefix hit, instead of being recomputed.

Worth it where the model runs on an accelerator (a PCIe copy of a block is far cheaper than
recomputing its tokens); on the CPU device the "host" is the device, so the engine leaves it
off there. The tier is bounded (LRU) and knows nothing of requests: it maps block hashes to
copies of a block's K and V across all layers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch


class HostKVTier:
    def __init__(self, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 capacity_blocks: int):
        assert capacity_blocks > 0
        k0 = kv_caches[0][0]
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        pin = k0.device.type == "cuda"
        # [capacity, layers, 2 (k/v), block_size, kv_heads, head_dim]
        self.store = torch.empty((capacity_blocks, len(kv_caches), 2, block_size, *k0.shape[1:]),
                                 dtype=k0.dtype, pin_memory=pin)
        self._where: OrderedDict[int, int] = OrderedDict()  # hash -> store index, LRU first
        self._free = list(range(capacity_blocks - 1, -1, -1))
        self._locked: set[int] = set()
        self.num_offloaded = 0
        self.num_restored = 0

    def __len__(self) -> int:
        return len(self._where)

    def hashes(self) -> list[int]:
        """The hashes held, least recently used first."""
        return list(self._where)

    def contains(self, block_hash: int) -> bool:
        if block_hash in self._where:
            self._where.move_to_end(block_hash)
            return True
        return False

    def lock(self, hashes: Sequence[int]) -> None:
        """Keep these entries while a restore is pending (offloads during it evict others)."""
        self._locked.update(hashes)

    def unlock(self, hashes: Sequence[int]) -> None:
        self._locked.difference_update(hashes)

    def offload(self, block_id: int, block_hash: int) -> None:
        """Copy a device block out before its slots are reused."""
        if block_hash in self._where:
            self._where.move_to_end(block_hash)
            return
        if not self._free:
            victim = next((h for h in self._where if h not in self._locked), None)
            if victim is None:
                return
            self._free.append(self._where.pop(victim))
        idx = self._free.pop()
        s = slice(block_id * self.block_size, (block_id + 1) * self.block_size)
        for layer, (k, v) in enumerate(self.kv_caches):
            self.store[idx, layer, 0].copy_(k[s], non_blocking=True)
            self.store[idx, layer, 1].copy_(v[s], non_blocking=True)
        if self.store.is_pinned():
            torch.cuda.current_stream(self.kv_caches[0][0].device).synchronize()
        self._where[block_hash] = idx
        self.num_offloaded += 1

    def restore(self, block_hash: int, block_id: int) -> None:
        """Copy a stored block back into a device block."""
        idx = self._where[block_hash]
        self._where.move_to_end(block_hash)
        s = slice(block_id * self.block_size, (block_id + 1) * self.block_size)
        for layer, (k, v) in enumerate(self.kv_caches):
            k[s].copy_(self.store[idx, layer, 0], non_blocking=True)
            v[s].copy_(self.store[idx, layer, 1], non_blocking=True)
        self.num_restored += 1


def host_tier_bytes_per_block(kv_caches, block_size: int) -> int:
    k0 = kv_caches[0][0]
    return 2 * len(kv_caches) * block_size * k0[0].numel() * k0.element_size()
