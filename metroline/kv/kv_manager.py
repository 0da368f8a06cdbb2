"""Per-request block tables over a BlockPool, with a hash-chained prefix cache.

Block i of a request covers token positions [i*block_size, (i+1)*block_size). When block i is
full of known token ids it gets the hash
    h_i = hash_block_tokens(h_{i-1}, tokens[i*bs:(i+1)*bs], extra_keys_i)
so equal hashes mean equal whole prefixes (and equal cache salt, which is mixed into h_0).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Container, Protocol, Sequence

from metroline.kv.block_pool import BlockPool, KVBlock

_HASH_BYTES = 16


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int],
                      extra_keys: tuple = ()) -> int:
    """A 128-bit hash, stable across processes and machines (unlike hash()).

    extra_keys must be built from values with a stable repr: str, int, bytes, None, tuples.
    """
    h = hashlib.blake2b(digest_size=_HASH_BYTES)
    h.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash.to_bytes(_HASH_BYTES, "little"))
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return int.from_bytes(h.digest(), "little")


def extend_block_hashes(hashes: list[int], num_tokens: int, block_size: int, token_slice,
                        cache_salt: str | None = None) -> list[int]:
    """Append to `hashes` the chained hashes of the full blocks of `num_tokens` tokens past
    those already hashed; `token_slice(start, end)` gives the token ids of a block. The salt
    only enters the first block: the chain carries it onward."""
    for i in range(len(hashes), num_tokens // block_size):
        extra = (cache_salt,) if i == 0 and cache_salt is not None else ()
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None,
                                        token_slice(i * block_size, (i + 1) * block_size), extra))
    return hashes


def prefix_block_hashes(token_ids: Sequence[int], block_size: int,
                        cache_salt: str | None = None) -> list[int]:
    """The hashes the prefix cache would give a prompt's full blocks (a router outside the
    engine uses them to find the replica that holds the longest cached prefix)."""
    return extend_block_hashes([], len(token_ids), block_size, lambda a, b: token_ids[a:b], cache_salt)


class Request(Protocol):
    """What the manager reads of a request (kv/ does not import engine/)."""

    request_id: str
    num_computed_tokens: int
    cache_salt: str | None

    @property
    def num_tokens(self) -> int: ...

    def token_ids_slice(self, start: int, end: int) -> list[int]: ...


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HostHit:
    """A prefix block found in the host tier: computed, but to be copied into a device block."""

    block_hash: int


@dataclass
class SessionPin:
    """Blocks of a finished turn held (one reference each) so the next turn finds them even
    under memory pressure, until `expires_at` (time.monotonic), the next turn, or a release."""

    session_id: str
    blocks: list[KVBlock]
    expires_at: float


class KVCacheManager:
    """Owns every request's block list (request_id -> list[KVBlock]).

    A block becomes findable in the prefix cache only once its KV is written: the scheduler
    calls cache_blocks() after a successful forward, for the full blocks of tokens that are
    both known (never a draft) and computed. A failed step therefore leaves nothing findable
    that was never written, and a rejected draft never reaches the cache.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 max_pinned_fraction: float = 0.25, host_tier=None):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.host_tier = host_tier if enable_caching else None
        if self.host_tier is not None:
            self.pool.on_evict = lambda b: self.host_tier.offload(b.block_id, b.block_hash)
        self.host_tier_hits = 0  # tokens restored from the host tier
        self.req_blocks: dict[str, list[KVBlock]] = {}
        # Chained hashes of the request's full blocks of known tokens, extended incrementally.
        self._block_hashes: dict[str, list[int]] = {}
        # How many leading blocks of req_blocks have been offered to the cache.
        self._num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found
        # Session pins, oldest first; together they never hold more than max_pinned_blocks.
        self.pins: OrderedDict[str, SessionPin] = OrderedDict()
        self.max_pinned_blocks = int(num_blocks * max_pinned_fraction) if enable_caching else 0
        self.num_pinned_blocks = 0

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def block_hashes(self, request: Request) -> list[int]:
        """Hashes of all full blocks of the request's known tokens (computed once per block)."""
        return extend_block_hashes(self._block_hashes.setdefault(request.request_id, []),
                                   request.num_tokens, self.block_size, request.token_ids_slice,
                                   request.cache_salt)

    def cached_block_hashes(self, limit: int | None = None) -> list[int]:
        """Hashes of the blocks a new request could hit (device pool, then host tier), most
        recently used last, at most `limit` of them (the newest). Call it from the thread
        that owns the manager."""
        hashes = self.pool.cached_hashes()
        if self.host_tier is not None:
            hashes = list(self.host_tier.hashes()) + hashes
        return hashes if limit is None or len(hashes) <= limit else hashes[-limit:]

    def get_computed_blocks(self, request: Request) -> tuple[list, int]:
        """Longest cached prefix of full blocks, and its length in tokens: device blocks, then
        HostHit entries for blocks the host tier can restore.

        At least one token is always left to compute, so that the step yields logits."""
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list = []
        on_device = True
        for h in self.block_hashes(request)[:max_blocks]:
            block = self.pool.get_cached_block(h) if on_device else None
            if block is not None:
                hits.append(block)
                continue
            on_device = False  # past the device prefix, only the host tier can continue it
            if self.host_tier is None or not self.host_tier.contains(h):
                break
            hits.append(HostHit(h))
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVBlock] = (),
                       num_lookahead_tokens: int = 0) -> list[KVBlock] | None:
        """Make room for num_computed_tokens + len(new_computed_blocks)*block_size
        + num_new_tokens + num_lookahead_tokens slots.

        Returns the newly allocated blocks, or None, having changed nothing, when the pool
        cannot provide them.
        """
        rid = request.request_id
        blocks = self.req_blocks.get(rid, [])
        assert not new_computed_blocks or (not blocks and request.num_computed_tokens == 0)
        device_hits = [b for b in new_computed_blocks if isinstance(b, KVBlock)]
        host_hits = [b.block_hash for b in new_computed_blocks if isinstance(b, HostHit)]
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_slots = num_computed + num_new_tokens + num_lookahead_tokens
        # Host hits need fresh device blocks to be restored into.
        num_needed = max(0, _cdiv(num_slots, self.block_size) - len(blocks) - len(device_hits))
        # Touching a cache hit with ref_cnt 0 takes it out of the free queue too.
        num_revived = sum(1 for b in device_hits if b.ref_cnt == 0)
        if num_needed + num_revived > self.pool.num_free_blocks:
            return None

        self.pool.touch(device_hits)
        if host_hits:
            self.host_tier.lock(host_hits)  # evictions below offload; keep what we restore
        new_blocks = self.pool.get_new_blocks(num_needed)
        assert new_blocks is not None
        for block, h in zip(new_blocks, host_hits):
            self.host_tier.restore(h, block.block_id)
            self.pool.cache_full_block(block, h)
        if host_hits:
            self.host_tier.unlock(host_hits)
            self.host_tier_hits += len(host_hits) * self.block_size
        blocks = self.req_blocks.setdefault(rid, blocks)
        blocks.extend(device_hits)
        blocks.extend(new_blocks)
        if new_computed_blocks:  # hits (and restored host blocks) are cached already
            self._num_cached_blocks[rid] = len(new_computed_blocks)
        return new_blocks

    def cache_blocks(self, request: Request) -> int:
        """Offer the request's newly written full blocks to the prefix cache: those covering
        tokens that are known (outputs appended, drafts excluded) and computed. Call only after
        the forward pass that wrote them succeeded. Returns how many blocks are cached now."""
        rid = request.request_id
        start = self._num_cached_blocks.get(rid, 0)
        if not self.enable_caching:
            return start
        num_full = min(request.num_tokens, request.num_computed_tokens) // self.block_size
        if num_full > start:
            blocks = self.req_blocks[rid]
            hashes = self.block_hashes(request)
            for i in range(start, num_full):
                self.pool.cache_full_block(blocks[i], hashes[i])
            self._num_cached_blocks[rid] = num_full
        return max(start, num_full)

    def free(self, request: Request) -> None:
        """Release all of the request's blocks (cached ones stay findable until evicted)."""
        rid = request.request_id
        self.pool.free_blocks(self.req_blocks.pop(rid, []))
        self._block_hashes.pop(rid, None)
        self._num_cached_blocks.pop(rid, None)

    def rollback(self, request: Request, num_tokens: int) -> int:
        """Forget the last num_tokens computed slots of a running request (rejected speculative
        tokens), after the forward that wrote them. Sets and returns num_computed_tokens.

        Blocks past the new end are freed; those only this request used are un-cached, since
        their slots will be rewritten. A shared block is never written into: if the new end
        falls inside one, the end moves back to its start and the block is released instead.
        """
        assert 0 <= num_tokens <= request.num_computed_tokens and (
            num_tokens == 0 or request.request_id in self.req_blocks)
        rid = request.request_id
        bs = self.block_size
        blocks = self.req_blocks.get(rid, [])
        keep = request.num_computed_tokens - num_tokens
        if keep % bs and blocks[keep // bs].ref_cnt > 1:
            keep -= keep % bs
        num_keep = _cdiv(keep, bs)
        for i in range(keep // bs, len(blocks)):
            if blocks[i].ref_cnt == 1:
                self.pool.uncache_block(blocks[i])
        self.pool.free_blocks(blocks[num_keep:])
        del blocks[num_keep:]
        del self._block_hashes.setdefault(rid, [])[keep // bs:]
        self._num_cached_blocks[rid] = min(self._num_cached_blocks.get(rid, 0), keep // bs)
        request.num_computed_tokens = keep
        return keep

    # ---- session retention ----

    def pin_session(self, request: Request, session_id: str, expires_at: float) -> int:
        """Pin the request's cached full blocks for its session (call before free()).

        Replaces the session's previous pin. To stay under max_pinned_blocks the oldest other
        pins are released first; a pin larger than the whole cap keeps its leading blocks
        (the prefix is what the next turn can reuse). Returns the number of blocks pinned."""
        self.release_session(session_id)
        blocks = []
        for b in self.req_blocks.get(request.request_id, ()):
            if b.block_hash is None or len(blocks) == self.max_pinned_blocks:
                break  # only a cached prefix is reusable by the next turn
            blocks.append(b)
        while self.pins and self.num_pinned_blocks + len(blocks) > self.max_pinned_blocks:
            self.release_session(next(iter(self.pins)))
        if not blocks:
            return 0
        self.pool.touch(blocks)
        self.pins[session_id] = SessionPin(session_id, blocks, expires_at)
        self.num_pinned_blocks += len(blocks)
        return len(blocks)

    def release_session(self, session_id: str) -> bool:
        """Drop a session's pin: its blocks go back to the LRU, still findable until evicted."""
        pin = self.pins.pop(session_id, None)
        if pin is None:
            return False
        self.pool.free_blocks(pin.blocks)
        self.num_pinned_blocks -= len(pin.blocks)
        return True

    def release_oldest_pin(self, spare: "Container[str]" = ()) -> bool:
        """Give back the oldest pin's blocks: running work must never wait on a retained turn.
        Pins of the sessions in `spare` (whose next turn is already queued) go last."""
        if not self.pins:
            return False
        for sid in self.pins:
            if sid not in spare:
                return self.release_session(sid)
        return self.release_session(next(iter(self.pins)))

    def expire_pins(self, now: float, keep: "Container[str]" = ()) -> int:
        """Release the pins past their expiry, except those of the sessions in `keep`: a
        session whose next turn has arrived and waits in the queue keeps its KV until that
        turn is admitted (its retention bet came true; dropping the KV now only means
        computing it again a moment later), unless memory is needed (release_oldest_pin)."""
        expired = [sid for sid, pin in self.pins.items() if pin.expires_at <= now and sid not in keep]
        for sid in expired:
            self.release_session(sid)
        return len(expired)

