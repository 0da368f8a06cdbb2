import pytest

from metroline.kv.block_pool import BlockPool


def ids(blocks):
    return [b.block_id for b in blocks]


def test_allocate_from_head_and_usage():
    pool = BlockPool(10)
    blocks = pool.get_new_blocks(3)
    assert ids(blocks) == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 7
    assert pool.usage == pytest.approx(0.3)


def test_allocation_says_no_without_side_effects():
    pool = BlockPool(10)
    pool.get_new_blocks(4)
    before = pool.free_block_ids()
    assert pool.get_new_blocks(7) is None
    assert pool.free_block_ids() == before
    assert ids(pool.get_new_blocks(6)) == [4, 5, 6, 7, 8, 9]
    assert pool.get_new_blocks(1) is None
    assert pool.get_new_blocks(0) == []


def test_free_goes_to_tail_in_reverse_order():
    pool = BlockPool(10)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(blocks)
    # The sequence's last block is evicted first.
    assert pool.free_block_ids() == [3, 4, 5, 6, 7, 8, 9, 2, 1, 0]
    assert [b.ref_cnt for b in blocks] == [0, 0, 0]
    assert pool.num_free_blocks == 10 and pool.usage == 0.0


def test_cached_block_stays_findable_until_evicted():
    pool = BlockPool(4)
    a = pool.get_new_blocks(2)
    assert pool.cache_full_block(a[0], 111)
    assert pool.cache_full_block(a[1], 222)
    pool.free_blocks(a)  # queue: 2, 3, 1, 0
    assert pool.get_cached_block(111) is a[0] and pool.get_cached_block(222) is a[1]
    assert ids(pool.get_new_blocks(2)) == [2, 3]
    assert pool.num_evictions == 0
    assert ids(pool.get_new_blocks(1)) == [1]  # LRU: block 1 reached the queue before block 0
    assert pool.num_evictions == 1
    assert pool.get_cached_block(222) is None and a[1].block_hash is None
    assert pool.get_cached_block(111) is a[0]
    assert pool.num_cached_blocks == 1


def test_touch_revives_free_cached_block_and_counts_refs():
    pool = BlockPool(4)
    b = pool.get_new_blocks(1)[0]
    pool.cache_full_block(b, 7)
    pool.free_blocks([b])
    assert 0 in pool.free_block_ids()
    pool.touch([b])
    assert b.ref_cnt == 1 and 0 not in pool.free_block_ids()
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free_blocks([b])
    assert pool.free_block_ids() == [1, 2, 3, 0]
    with pytest.raises(AssertionError):
        pool.free_blocks([b])


def test_duplicate_hash_keeps_first_block():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_full_block(a, 5)
    assert not pool.cache_full_block(b, 5)
    assert b.block_hash is None and pool.get_cached_block(5) is a
    pool.uncache_block(a)
    assert pool.get_cached_block(5) is None and a.block_hash is None


def test_caching_disabled():
    pool = BlockPool(4, enable_caching=False)
    b = pool.get_new_blocks(1)[0]
    assert not pool.cache_full_block(b, 1)
    assert pool.get_cached_block(1) is None
