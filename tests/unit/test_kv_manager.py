import os
import subprocess
import sys

import pytest

from metroline.engine.request import Request, SamplingParams
from metroline.kv.kv_manager import KVCacheManager, hash_block_tokens

BS = 16


def make_req(rid, tokens, salt=None):
    return Request(rid, list(tokens), SamplingParams(), cache_salt=salt)


def prefill(kv, req, hits=(), n_hit=0):
    """Allocate the rest of the request's tokens as the scheduler would, and mark them computed."""
    new = kv.allocate_slots(req, req.num_tokens - n_hit, hits)
    assert new is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)  # the forward succeeded: its full blocks become findable
    return new


def refs(kv, rid):
    return [b.ref_cnt for b in kv.req_blocks[rid]]


def assert_no_leak(kv):
    assert kv.req_blocks == {}
    assert kv.num_free_blocks == kv.num_total_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_hash_is_stable_across_processes_and_sensitive_to_inputs():
    h = hash_block_tokens(None, [1, 2, 3], ("salt",))
    code = ("from metroline.kv.kv_manager import hash_block_tokens;"
            "print(hash_block_tokens(None, [1, 2, 3], ('salt',)))")
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert int(out.stdout) == h
    variants = {h, hash_block_tokens(None, [1, 2, 3]), hash_block_tokens(0, [1, 2, 3], ("salt",)),
                hash_block_tokens(None, [1, 2, 4], ("salt",)), hash_block_tokens(None, [1, 2])}
    assert len(variants) == 5


def test_prefix_hit_reuses_exact_blocks():
    kv = KVCacheManager(10, BS)
    a = make_req("a", range(40))
    assert kv.get_computed_blocks(a) == ([], 0)
    assert [b.block_id for b in prefill(kv, a)] == [0, 1, 2]
    b = make_req("b", list(range(32)) + [99] * 9)
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 32
    b.num_computed_tokens = 0
    assert [x.block_id for x in kv.allocate_slots(b, b.num_tokens - n, hits)] == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert refs(kv, "a") == [2, 2, 1] and refs(kv, "b") == [2, 2, 1]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (40 + 41, 32)
    kv.free(a)
    kv.free(b)
    assert_no_leak(kv)


def test_fully_cached_sequence_leaves_last_block_to_compute():
    kv = KVCacheManager(10, BS)
    prefill(kv, make_req("a", range(32)))
    hits, n = kv.get_computed_blocks(make_req("b", range(32)))
    assert [h.block_id for h in hits] == [0] and n == 16
    hits, n = kv.get_computed_blocks(make_req("c", range(33)))
    assert [h.block_id for h in hits] == [0, 1] and n == 32


def test_salt_isolation():
    kv = KVCacheManager(10, BS)
    prefill(kv, make_req("a", range(20), salt="x"))
    assert [h.block_id for h in kv.get_computed_blocks(make_req("b", range(20), salt="x"))[0]] == [0]
    assert kv.get_computed_blocks(make_req("c", range(20), salt="y")) == ([], 0)
    assert kv.get_computed_blocks(make_req("d", range(20))) == ([], 0)


def test_lru_eviction_order():
    kv = KVCacheManager(10, BS)
    a = make_req("a", range(40))
    prefill(kv, a)  # blocks 0, 1 cached, 2 partial
    kv.free(a)
    assert kv.pool.free_block_ids() == [3, 4, 5, 6, 7, 8, 9, 2, 1, 0]
    filler = make_req("f", range(1000, 1000 + 8 * BS))
    assert [b.block_id for b in prefill(kv, filler)] == [3, 4, 5, 6, 7, 8, 9, 2]
    assert kv.pool.num_evictions == 0
    # Only a's second block is needed: a's tail goes before its head.
    g = make_req("g", range(2000, 2010))
    assert [b.block_id for b in prefill(kv, g)] == [1]
    assert kv.pool.num_evictions == 1
    hits, n = kv.get_computed_blocks(make_req("a2", range(40)))
    assert [h.block_id for h in hits] == [0] and n == 16
    kv.free(filler)
    kv.free(g)
    assert_no_leak(kv)


def test_allocation_none_has_no_side_effects():
    kv = KVCacheManager(10, BS)
    a = make_req("a", range(40))
    prefill(kv, a)
    kv.free(a)  # blocks 0, 1 cached with ref_cnt 0
    filler = make_req("f", range(1000, 1000 + 7 * BS))
    prefill(kv, filler)  # takes 3..9; free queue: 2, 1, 0
    b = make_req("b", list(range(32)) + list(range(500, 530)))  # 62 tokens: 4 blocks
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    free_before = kv.pool.free_block_ids()
    assert kv.allocate_slots(b, b.num_tokens - n, hits) is None
    assert kv.pool.free_block_ids() == free_before == [2, 1, 0]
    assert [h.ref_cnt for h in hits] == [0, 0] and "b" not in kv.req_blocks
    assert b.num_computed_tokens == 0
    # A running request asking beyond the pool says no as well.
    assert kv.allocate_slots(filler, 4 * BS) is None
    assert kv.get_block_ids("f") == [3, 4, 5, 6, 7, 8, 9]
    kv.free(filler)
    kv.free(b)
    assert_no_leak(kv)


def test_decode_caches_block_once_full_and_allocates_on_boundary():
    kv = KVCacheManager(10, BS)
    r = make_req("r", range(15))
    prefill(kv, r)
    assert kv.req_blocks["r"][0].block_hash is None
    r.output_token_ids.append(77)  # token 16 known at schedule time
    assert kv.allocate_slots(r, 1) == []
    assert kv.req_blocks["r"][0].block_hash is None  # not before its KV is written
    r.num_computed_tokens += 1
    kv.cache_blocks(r)
    assert kv.req_blocks["r"][0].block_hash is not None
    r.output_token_ids.append(78)
    assert [b.block_id for b in kv.allocate_slots(r, 1)] == [1]
    kv.free(r)
    assert_no_leak(kv)


def test_lookahead_and_draft_slots_are_never_cached():
    kv = KVCacheManager(10, BS)
    r = make_req("r", range(20))
    assert [b.block_id for b in kv.allocate_slots(r, 20, num_lookahead_tokens=20)] == [0, 1, 2]
    assert all(b.block_hash is None for b in kv.req_blocks["r"])  # nothing written yet
    r.num_computed_tokens = 40  # the 20 known tokens and 20 draft slots were written
    assert kv.cache_blocks(r) == 1  # only the block of known tokens
    assert [b.block_hash is not None for b in kv.req_blocks["r"]] == [True, False, False]
    kv.free(r)
    assert_no_leak(kv)


def test_blocks_of_a_failed_forward_are_never_findable():
    kv = KVCacheManager(10, BS)
    r = make_req("r", range(50))
    assert kv.allocate_slots(r, 50) is not None
    r.num_computed_tokens = 50  # scheduled, but the forward raised: no cache_blocks()
    kv.free(r)
    again = make_req("again", range(50))
    assert kv.get_computed_blocks(again) == ([], 0)
    assert kv.pool.num_cached_blocks == 0


def test_rollback_frees_tail_blocks():
    kv = KVCacheManager(10, BS)
    r = make_req("r", range(20))
    kv.allocate_slots(r, 20, num_lookahead_tokens=20)
    r.num_computed_tokens = 40  # 20 draft slots written
    assert kv.rollback(r, 15) == 25
    assert r.num_computed_tokens == 25 and kv.get_block_ids("r") == [0, 1]
    assert kv.pool.free_block_ids()[-1] == 2
    kv.free(r)
    assert_no_leak(kv)


def test_rollback_uncaches_private_block_but_not_shared_one():
    kv = KVCacheManager(10, BS)
    a = make_req("a", range(40))
    prefill(kv, a)  # [0, 1, 2], 0 and 1 cached
    h1 = kv.req_blocks["a"][1].block_hash
    assert kv.rollback(a, 20) == 20
    assert kv.get_block_ids("a") == [0, 1]
    assert kv.pool.get_cached_block(h1) is None  # block 1 will be rewritten from slot 4 on
    kv.free(a)

    kv = KVCacheManager(10, BS)
    a = make_req("a", range(40))
    prefill(kv, a)
    b = make_req("b", range(40))
    hits, n = kv.get_computed_blocks(b)
    prefill(kv, b, hits, n)  # shares blocks 0, 1
    assert kv.get_block_ids("b") == [0, 1, 3]
    # a's new end falls inside shared block 1: a gives it up and recomputes from slot 16.
    assert kv.rollback(a, 20) == 16
    assert kv.get_block_ids("a") == [0]
    assert refs(kv, "b") == [2, 1, 1]
    assert kv.pool.get_cached_block(kv.req_blocks["b"][1].block_hash) is kv.req_blocks["b"][1]
    assert kv.allocate_slots(a, 24) is not None
    assert kv.get_block_ids("a") == [0, 4, 5]
    kv.free(a)
    kv.free(b)
    assert_no_leak(kv)


def test_caching_disabled_never_hits():
    kv = KVCacheManager(10, BS, enable_caching=False)
    prefill(kv, make_req("a", range(40)))
    assert kv.get_computed_blocks(make_req("b", range(40))) == ([], 0)
    assert all(b.block_hash is None for b in kv.pool.blocks)


@pytest.mark.parametrize("caching", [True, False])
def test_no_leak_after_many_requests(caching):
    kv = KVCacheManager(10, BS, enable_caching=caching)
    reqs = [make_req(str(i), range(i * 7 % 30, i * 7 % 30 + 10 + i)) for i in range(6)]
    for r in reqs:
        hits, n = kv.get_computed_blocks(r)
        assert kv.allocate_slots(r, r.num_tokens - n, hits) is not None
    for r in reqs:
        kv.free(r)
    assert_no_leak(kv)
