"""The host-memory KV tier: evicted blocks are kept in a bounded LRU and restored on a hit."""

import torch

from metroline.engine.request import Request, SamplingParams
from metroline.kv.host_tier import HostKVTier
from metroline.kv.kv_manager import HostHit, KVCacheManager

BS = 4
LAYERS, HEADS, DIM = 2, 1, 3


def caches(num_blocks):
    return [(torch.zeros(num_blocks * BS, HEADS, DIM), torch.zeros(num_blocks * BS, HEADS, DIM))
            for _ in range(LAYERS)]


def write(kv_caches, kv, req, value_of_token):
    """What a forward pass does: every slot of the request gets its token's K/V."""
    for pos, tok in enumerate(req.all_token_ids[:req.num_computed_tokens]):
        block = kv.req_blocks[req.request_id][pos // BS]
        slot = block.block_id * BS + pos % BS
        for layer, (k, v) in enumerate(kv_caches):
            k[slot] = value_of_token(tok, layer)
            v[slot] = -value_of_token(tok, layer)


def prefill(kv, req):
    hits, n = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - n, hits) is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)  # the forward succeeded: its full blocks become findable
    return hits, n


def val(tok, layer):
    return float(tok * 10 + layer)


def test_evicted_block_is_restored_from_host_memory():
    kvc = caches(4)
    tier = HostKVTier(kvc, BS, capacity_blocks=8)
    kv = KVCacheManager(4, BS, host_tier=tier)
    a = Request("a", list(range(1, 10)), SamplingParams())  # blocks 0, 1 full; 2 partial
    prefill(kv, a)
    write(kvc, kv, a, val)
    kv.free(a)
    # A different prompt takes all 4 blocks: the cached blocks are evicted -> offloaded.
    b = Request("b", list(range(100, 116)), SamplingParams())
    prefill(kv, b)
    assert tier.num_offloaded == 2 and len(tier) == 2
    for layer, (k, _) in enumerate(kvc):
        k.fill_(-7.0)  # the device copies are gone for good
    kv.free(b)
    c = Request("c", list(range(1, 10)) + [42], SamplingParams())
    hits, n = kv.get_computed_blocks(c)
    # b's two full blocks are still cached on the device, but a's prefix lives only on the host.
    assert n == 8 and all(isinstance(h, HostHit) for h in hits)
    assert kv.allocate_slots(c, c.num_tokens - n, hits) is not None
    assert tier.num_restored == 2 and kv.host_tier_hits == 8
    for pos, tok in enumerate(c.all_token_ids[:8]):
        slot = kv.req_blocks["c"][pos // BS].block_id * BS + pos % BS
        for layer, (k, v) in enumerate(kvc):
            assert torch.equal(k[slot], torch.full((HEADS, DIM), val(tok, layer)))
            assert torch.equal(v[slot], torch.full((HEADS, DIM), -val(tok, layer)))
    # Restored blocks are device-cached again: a fourth request hits them on the device.
    d = Request("d", list(range(1, 10)) + [43], SamplingParams())
    hits, n = kv.get_computed_blocks(d)
    assert n == 8 and not any(isinstance(h, HostHit) for h in hits)
    kv.free(c)
    assert kv.num_free_blocks == 4


def test_host_tier_is_bounded_lru():
    kvc = caches(2)
    tier = HostKVTier(kvc, BS, capacity_blocks=2)
    for i, h in enumerate((11, 22, 33)):
        tier.offload(i % 2, h)
    assert not tier.contains(11) and tier.contains(22) and tier.contains(33)
    tier.lock([22, 33])
    tier.offload(0, 44)  # everything locked: the new block is dropped, not a pending one
    assert tier.contains(22) and tier.contains(33) and not tier.contains(44)
    tier.unlock([22, 33])
    tier.contains(22)  # touch: 33 becomes the LRU entry
    tier.offload(1, 55)
    assert tier.contains(22) and tier.contains(55) and not tier.contains(33)
