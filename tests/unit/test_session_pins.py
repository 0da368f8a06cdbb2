"""KV retention for sessions: pins survive memory pressure, expire, are capped, and released."""

from metroline.config import SchedulerConfig
from metroline.engine.request import ModelRunnerOutput, Request, RequestStatus, SamplingParams
from metroline.engine.scheduler import Scheduler
from metroline.kv.kv_manager import KVCacheManager

BS = 16


def req(rid, tokens, session=None, retention=None, max_tokens=1):
    r = Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens), session_id=session,
                kv_retention_s=retention)
    return r


def run_prefill(kv, r):
    hits, n = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - n, hits) is not None
    r.num_computed_tokens = r.num_tokens
    kv.cache_blocks(r)
    return n


def assert_no_leak(kv):
    assert kv.req_blocks == {} and not kv.pins and kv.num_pinned_blocks == 0
    assert kv.num_free_blocks == kv.num_total_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_pin_survives_memory_pressure_and_next_turn_hits():
    kv = KVCacheManager(16, BS, max_pinned_fraction=0.5)
    turn1 = req("t1", range(50))  # 3 full blocks + 2 tokens
    run_prefill(kv, turn1)
    assert kv.get_block_ids("t1") == [0, 1, 2, 3]
    assert kv.pin_session(turn1, "s", expires_at=100.0) == 3
    kv.free(turn1)
    assert [b.ref_cnt for b in kv.pool.blocks[:4]] == [1, 1, 1, 0]
    # Another request takes every free block: without the pin, blocks 0-2 would be evicted.
    hog = req("hog", range(1000, 1000 + 13 * BS))
    run_prefill(kv, hog)
    assert kv.num_free_blocks == 0 and kv.pool.num_evictions == 0  # block 3 held no hash
    kv.free(hog)
    turn2 = req("t2", list(range(50)) + [7, 8, 9])
    assert run_prefill(kv, turn2) == 48
    assert kv.get_block_ids("t2")[:3] == [0, 1, 2]
    kv.release_session("s")
    kv.free(turn2)
    assert_no_leak(kv)


def test_pin_expiry_returns_blocks_to_lru():
    kv = KVCacheManager(8, BS)
    r = req("a", range(40))
    run_prefill(kv, r)
    kv.pin_session(r, "s", expires_at=10.0)
    kv.free(r)
    assert kv.num_pinned_blocks == 2 and kv.num_free_blocks == 6
    assert kv.expire_pins(now=9.9) == 0
    assert kv.expire_pins(now=10.0) == 1
    assert kv.num_pinned_blocks == 0 and kv.num_free_blocks == 8
    # Still cached until evicted: a later identical prefix hits.
    assert kv.get_computed_blocks(req("b", range(40)))[1] == 32
    assert_no_leak(kv)


def test_pins_are_capped_oldest_released_first_and_prefix_kept():
    kv = KVCacheManager(16, BS, max_pinned_fraction=0.25)  # cap: 4 blocks
    a = req("a", range(3 * BS + 1))
    run_prefill(kv, a)
    assert kv.pin_session(a, "sa", 50.0) == 3
    kv.free(a)
    b = req("b", range(500, 500 + 2 * BS))
    run_prefill(kv, b)
    assert kv.pin_session(b, "sb", 50.0) == 2  # 3 + 2 > 4: session "sa" is released
    kv.free(b)
    assert list(kv.pins) == ["sb"] and kv.num_pinned_blocks == 2
    big = req("c", range(900, 900 + 6 * BS))
    run_prefill(kv, big)
    ids = kv.get_block_ids("c")
    assert kv.pin_session(big, "sc", 50.0) == 4  # larger than the cap: its first 4 blocks
    assert [b.block_id for b in kv.pins["sc"].blocks] == ids[:4]
    assert list(kv.pins) == ["sc"]
    kv.free(big)
    kv.release_session("sc")
    assert not kv.release_session("sc")
    assert_no_leak(kv)


def test_scheduler_pins_on_finish_and_releases_on_next_turn():
    kv = KVCacheManager(16, BS)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256), kv, BS, max_model_len=256)
    t1 = req("t1", range(40), session="s", retention=30.0, max_tokens=1)
    sched.add_request(t1)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput.from_token_ids({"t1": [5]}))
    assert t1.status == RequestStatus.FINISHED_LENGTH
    assert list(kv.pins) == ["s"] and kv.num_pinned_blocks == 2
    t2 = req("t2", list(range(40)) + [5, 6, 7], session="s", retention=30.0, max_tokens=1)
    sched.add_request(t2)
    out = sched.schedule()
    assert t2.num_cached_tokens == 32 and not kv.pins  # the new turn holds the blocks now
    sched.update_from_output(out, ModelRunnerOutput.from_token_ids({"t2": [1]}))
    assert list(kv.pins) == ["s"]
    # An aborted turn does not pin.
    t3 = req("t3", range(300, 340), session="s2", retention=30.0, max_tokens=4)
    sched.add_request(t3)
    sched.schedule()
    sched.finish_requests("t3", RequestStatus.FINISHED_ABORTED)
    assert "s2" not in kv.pins
    kv.release_session("s")
    assert_no_leak(kv)


def test_pins_yield_to_work_that_needs_their_memory():
    kv = KVCacheManager(8, BS, max_pinned_fraction=0.9)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256), kv, BS, max_model_len=128)
    for i in range(2):  # two finished sessions pin 3 blocks each: 6 of 8 blocks
        r = req(f"s{i}", range(100 * i, 100 * i + 3 * BS + 1), session=f"sess{i}", retention=600.0)
        sched.add_request(r)
        sched.update_from_output(sched.schedule(), ModelRunnerOutput.from_token_ids({r.request_id: [1]}))
    assert kv.num_pinned_blocks == 6 and kv.num_free_blocks == 2
    # A new request needing 5 blocks, with nothing running: the oldest pin is released for it.
    big = req("big", range(500, 500 + 4 * BS + 3), max_tokens=2)
    sched.add_request(big)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["big"]
    assert list(kv.pins) == ["sess1"]
    sched.update_from_output(out, ModelRunnerOutput.from_token_ids({"big": [1]}))
    # Growing past the pool while running: the remaining pin goes before any preemption.
    sched.update_from_output(sched.schedule(), ModelRunnerOutput.from_token_ids({"big": [2]}))
    assert big.is_finished and sched.num_preemptions == 0
    kv.release_session("sess1")
    assert_no_leak(kv)


def test_pins_yield_to_a_waiting_request_while_others_run():
    """Pins must not hold a queued request's admission until they expire (the batch would
    shrink to what is running): the oldest pin goes first, the younger one stays."""
    kv = KVCacheManager(10, BS, max_pinned_fraction=0.9)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256), kv, BS, max_model_len=160)
    for i in range(2):  # two finished sessions pin 3 blocks each: 6 of 10 blocks
        r = req(f"s{i}", range(100 * i, 100 * i + 3 * BS + 1), session=f"sess{i}", retention=600.0)
        sched.add_request(r)
        sched.update_from_output(sched.schedule(), ModelRunnerOutput.from_token_ids({r.request_id: [1]}))
    runner = req("runner", range(700, 700 + BS + 4), max_tokens=50)  # 2 blocks, keeps running
    sched.add_request(runner)
    sched.update_from_output(sched.schedule(), ModelRunnerOutput.from_token_ids({"runner": [1]}))
    assert kv.num_pinned_blocks == 6 and kv.num_free_blocks == 2 and sched.num_running == 1
    new = req("new", range(500, 500 + 2 * BS + 3), max_tokens=2)  # needs 3 blocks
    sched.add_request(new)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["runner", "new"]
    assert list(kv.pins) == ["sess1"]  # only the oldest pin was given up
    sched.update_from_output(out, ModelRunnerOutput.from_token_ids({"runner": [1], "new": [1]}))
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        sched.update_from_output(out, ModelRunnerOutput.from_token_ids(
            {s.request.request_id: [1] for s in out.scheduled if s.sample}))
    assert runner.is_finished and new.is_finished
    kv.release_session("sess1")
    assert_no_leak(kv)


def test_a_pin_outlives_its_expiry_while_its_next_turn_waits_in_the_queue():
    """The retention bet came true once the next turn has arrived: if it waits for a slot, its
    session's pin stays past the expiry (released at admission), and when memory is needed
    the pins of sessions without a queued turn go first."""
    now = [0.0]
    kv = KVCacheManager(16, BS, max_pinned_fraction=0.9)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=1), kv, BS, max_model_len=256)
    sched.clock = lambda: now[0]
    for sid, base in (("s", 0), ("other", 400)):
        t1 = req(f"{sid}-1", range(base, base + 40), session=sid, retention=1.0)
        sched.add_request(t1)
        sched.update_from_output(sched.schedule(), ModelRunnerOutput.from_token_ids({t1.request_id: [5]}))
    assert list(kv.pins) == ["s", "other"]
    busy = req("busy", range(900, 910), max_tokens=20)  # holds the only slot
    sched.add_request(busy)
    sched.update_from_output(sched.schedule(), ModelRunnerOutput.from_token_ids({"busy": [1]}))
    t2 = req("s-2", list(range(40)) + [5, 6, 7], session="s", retention=1.0)
    sched.add_request(t2)  # the next turn of s arrives and waits
    now[0] = 5.0  # both pins are past their expiry
    sched.update_from_output(sched.schedule(), ModelRunnerOutput.from_token_ids({"busy": [1]}))
    assert list(kv.pins) == ["s"]  # other expired; s is kept while its turn is queued
    for _ in range(40):
        if busy.is_finished:
            break
        sched.update_from_output(sched.schedule(), ModelRunnerOutput.from_token_ids({"busy": [1]}))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["s-2"]
    assert t2.num_cached_tokens == 32 and not kv.pins  # the pin held until the admission
    sched.update_from_output(out, ModelRunnerOutput.from_token_ids({"s-2": [1]}))
    kv.release_session("s")
    assert_no_leak(kv)


def test_release_oldest_pin_spares_the_sessions_it_is_told_to():
    kv = KVCacheManager(16, BS, max_pinned_fraction=0.9)
    for sid, base in (("a", 0), ("b", 100), ("c", 200)):
        r = req(sid, range(base, base + 40))
        run_prefill(kv, r)
        kv.pin_session(r, sid, 10.0)
        kv.free(r)
    assert kv.release_oldest_pin(spare={"a"}) and list(kv.pins) == ["a", "c"]
    assert kv.release_oldest_pin(spare={"a"}) and list(kv.pins) == ["a"]
    assert kv.release_oldest_pin(spare={"a"}) and not kv.pins
    assert not kv.release_oldest_pin()
    assert kv.expire_pins(now=100.0) == 0
    assert_no_leak(kv)
