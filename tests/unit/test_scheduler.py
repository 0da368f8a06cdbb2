"""The scheduler driven alone, with fake sampled tokens: no model."""

import zlib

import pytest

from metroline.config import SchedulerConfig
from metroline.engine.request import (ModelRunnerOutput, Request, RequestHints, RequestStatus,
                                      SamplingParams)
from metroline.engine.scheduler import QueueFullError, Scheduler
from metroline.engine.validation import EngineLimits, validate_request
from metroline.errors import InvalidRequestError
from metroline.kv.kv_manager import KVCacheManager

BS = 16
TOKEN = 5  # what the fake model always samples, unless told otherwise


def make_sched(num_blocks=10, budget=256, max_seqs=8, policy="fcfs", chunked=True,
               caching=True, max_model_len=1024, max_queued=None):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy,
                          enable_chunked_prefill=chunked, max_queued_requests=max_queued)
    return Scheduler(cfg, KVCacheManager(num_blocks, BS, caching), BS, max_model_len)


def make_req(rid, n, start=None, max_tokens=100, priority=0, eos=(), **sp):
    start = zlib.crc32(rid.encode()) % 10_000 * 100 if start is None else start
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, **sp),
                   eos_token_ids=frozenset(eos), priority=priority)


def step(s, tokens=None):
    """One engine step; tokens: request_id -> list of tokens to emit in order (default TOKEN)."""
    out = s.schedule()
    sampled = {}
    for sr in out.scheduled:
        if sr.sample:
            queue = (tokens or {}).get(sr.request.request_id)
            sampled[sr.request.request_id] = [queue.pop(0) if queue else TOKEN]
    return out, s.update_from_output(out, ModelRunnerOutput.from_token_ids(sampled))


def run_to_end(s, max_steps=500):
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return
        step(s)
    raise AssertionError("scheduler did not drain")


def sched_view(out):
    return [(sr.request.request_id, sr.num_new_tokens, sr.start_pos, sr.sample) for sr in out.scheduled]


def assert_drained(s):
    assert not s.has_unfinished_requests() and s.num_running == 0 and s.num_waiting == 0
    assert s.requests == {} and s.kv.req_blocks == {}
    assert s.kv.num_free_blocks == s.kv.num_total_blocks
    assert all(b.ref_cnt == 0 for b in s.kv.pool.blocks)


def test_decode_first_then_prefill_within_budget():
    s = make_sched(budget=64)
    s.add_request(make_req("a", 20, max_tokens=3))
    out, changed = step(s)
    assert sched_view(out) == [("a", 20, 0, True)] and changed[0].output_token_ids == [TOKEN]
    assert out.scheduled[0].block_ids == [0, 1]
    s.add_request(make_req("b", 50, max_tokens=1))
    out, _ = step(s)
    assert sched_view(out) == [("a", 1, 20, True), ("b", 50, 0, True)]
    assert out.num_batched_tokens == 51
    assert [sr.block_ids for sr in out.scheduled] == [[0, 1], [2, 3, 4, 5]]
    assert s.get_request("b") is None  # max_tokens=1: finished and freed at once
    assert s.kv.get_block_ids("b") == []
    run_to_end(s)
    assert_drained(s)


def test_chunked_prefill_splits_long_prompt_while_decodes_run():
    s = make_sched(budget=32)
    a, b = make_req("a", 10, max_tokens=10), make_req("b", 70, max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    views = [sched_view(step(s)[0]) for _ in range(4)]
    assert views == [
        [("a", 10, 0, True), ("b", 22, 0, False)],
        [("a", 1, 10, True), ("b", 31, 22, False)],
        [("a", 1, 11, True), ("b", 17, 53, True)],
        [("a", 1, 12, True), ("b", 1, 70, True)],
    ]
    assert s.num_prefill_chunks == 2
    assert a.num_output_tokens == 4 and b.status == RequestStatus.FINISHED_LENGTH
    assert b.output_token_ids == [TOKEN, TOKEN]
    run_to_end(s)
    assert_drained(s)


def limits(num_blocks=10, max_model_len=1024, budget=256, chunked=True, vocab=1_000_000):
    return EngineLimits(vocab, max_model_len, num_blocks * BS, budget, chunked)


def test_without_chunked_prefill_prompt_waits_for_room():
    s = make_sched(budget=32, chunked=False)
    with pytest.raises(InvalidRequestError) as e:
        validate_request(list(range(33)), SamplingParams(), RequestHints(),
                         limits(budget=32, chunked=False))
    assert e.value.code == "context_length_exceeded"
    s.add_request(make_req("a", 10, max_tokens=3))
    s.add_request(make_req("b", 30, max_tokens=1))
    assert sched_view(step(s)[0]) == [("a", 10, 0, True)]
    assert sched_view(step(s)[0]) == [("a", 1, 10, True), ("b", 30, 0, True)]
    assert s.num_prefill_chunks == 0
    run_to_end(s)
    assert_drained(s)


def _three_full_runners(policy, priorities=(0, 0, 0)):
    """Three requests of 3 full blocks each in a 10-block pool; all need a 4th block at once."""
    s = make_sched(policy=policy, caching=False)
    reqs = [make_req(r, 48, priority=p) for r, p in zip("abc", priorities)]
    for r in reqs:
        s.add_request(r)
    out, _ = step(s)
    return s, reqs, out


def test_preemption_fcfs_takes_latest_arrival():
    s, (a, b, c), out = _three_full_runners("fcfs")
    assert [sr.block_ids for sr in out.scheduled] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    out, _ = step(s)
    assert out.preempted == [c] and c.status == RequestStatus.PREEMPTED
    assert sched_view(out) == [("a", 1, 48, True), ("b", 1, 48, True)]
    # a took the last free block 9; c's blocks were freed tail-first, so b gets c's last one.
    assert [sr.block_ids for sr in out.scheduled] == [[0, 1, 2, 9], [3, 4, 5, 8]]
    assert c.num_computed_tokens == 0 and c.num_preemptions == 1 and s.num_preemptions == 1
    d = make_req("d", 10)
    s.add_request(d)
    assert list(s.waiting) == [c, d]  # the preempted request goes ahead of new arrivals
    run_to_end(s)
    assert [r.num_output_tokens for r in (a, b, c, d)] == [100] * 4
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in (a, b, c, d))
    assert_drained(s)


def test_preemption_priority_takes_largest_priority_value():
    s, (a, b, c), out = _three_full_runners("priority", priorities=(1, 0, 0))
    # Admitted in priority order although a arrived first.
    assert [(sr.request.request_id, sr.block_ids) for sr in out.scheduled] == [
        ("b", [0, 1, 2]), ("c", [3, 4, 5]), ("a", [6, 7, 8])]
    out, _ = step(s)
    assert out.preempted == [a]
    # b takes the last free block; c gets a's last block, freed first.
    assert sched_view(out) == [("b", 1, 48, True), ("c", 1, 48, True)]
    assert [sr.block_ids for sr in out.scheduled] == [[0, 1, 2, 9], [3, 4, 5, 8]]
    run_to_end(s)
    assert a.num_preemptions >= 1 and [r.num_output_tokens for r in (a, b, c)] == [100] * 3
    assert_drained(s)


def test_preempted_request_resumes_by_recompute_with_prefix_cache():
    s = make_sched()  # caching on
    a, b, c = make_req("a", 48, max_tokens=16), make_req("b", 48, max_tokens=16), make_req("c", 48)
    for r in (a, b, c):
        s.add_request(r)
    step(s)
    out, _ = step(s)
    assert out.preempted == [c]  # b took c's last block (8); c's blocks 6, 7 stay cached
    for _ in range(14):
        out, _ = step(s)
        assert c in s.waiting and not out.preempted
    assert a.is_finished and b.is_finished
    out, _ = step(s)
    # c recomputes prompt + its one output; its first two prompt blocks come from the cache.
    assert sched_view(out) == [("c", 49 - 32, 32, True)]
    # Free queue after a, b finished: 7, 6 (c's cached prefix), 9, 2, 1, 0 (a), 8, 5, 4, 3 (b).
    assert out.scheduled[0].block_ids == [6, 7, 9, 2]
    run_to_end(s)
    assert c.num_output_tokens == 100 and c.num_cached_tokens == 0 and c.num_preemptions == 1
    assert_drained(s)


def test_request_alone_outgrowing_pool_finishes_with_length():
    s = make_sched(num_blocks=4)
    r = make_req("r", 60)
    s.add_request(r)
    for _ in range(5):
        out, _ = step(s)
        assert not out.finished
    out, changed = step(s)
    assert out.finished == [r] and changed == [r] and out.scheduled == []
    assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 5
    assert_drained(s)


def test_preempted_request_resumes_then_finishes_alone_when_pool_is_too_small():
    s = make_sched(num_blocks=4)
    a, b = make_req("a", 8, max_tokens=40), make_req("b", 40)
    s.add_request(a)
    s.add_request(b)
    run_to_end(s)
    # b (latest) preempted itself at its 49th slot; it resumed once a finished, and ended
    # when 64 slots (the whole pool) were not enough.
    assert b.num_preemptions == 1 and b.status == RequestStatus.FINISHED_LENGTH
    assert b.num_tokens == 65
    assert a.num_output_tokens == 40
    assert_drained(s)


def test_validation_rejects_prompts_that_can_never_fit():
    def check(n, lim, max_tokens=1):
        return validate_request(list(range(n)), SamplingParams(max_tokens=max_tokens),
                                RequestHints(), lim)

    for n in (100, 150):
        with pytest.raises(InvalidRequestError) as e:
            check(n, limits(max_model_len=100))
        assert (e.value.code, e.value.param) == ("context_length_exceeded", "prompt")
    with pytest.raises(InvalidRequestError) as e:
        check(160, limits(num_blocks=10))  # 161 slots > 10 blocks of 16
    assert "KV cache" in str(e.value)
    assert check(159, limits(num_blocks=10)) == 1
    with pytest.raises(InvalidRequestError) as e:
        check(0, limits())
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        check(90, limits(max_model_len=100), max_tokens=11)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "max_tokens")
    assert check(90, limits(max_model_len=100), max_tokens=None) == 10  # resolved
    with pytest.raises(InvalidRequestError) as e:
        validate_request([1, 2, 10], SamplingParams(), RequestHints(), limits(vocab=10))
    assert e.value.param == "prompt" and "[0, 10)" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        validate_request([1], SamplingParams(), RequestHints(kv_retention_s=-1), limits())
    assert e.value.param == "kv_retention_s"


def test_scheduler_asserts_what_validation_guarantees():
    s = make_sched(num_blocks=10, max_model_len=100)
    s.add_request(make_req("ok", 50, max_tokens=1))
    with pytest.raises(AssertionError):
        s.add_request(make_req("ok", 10))  # duplicate id: the engine refuses it first
    with pytest.raises(AssertionError):
        s.add_request(make_req("long", 100))
    run_to_end(s)
    assert_drained(s)


def test_queue_full():
    s = make_sched(max_queued=2)
    s.add_request(make_req("a", 10, max_tokens=2))
    s.add_request(make_req("b", 10, max_tokens=2))
    with pytest.raises(QueueFullError):
        s.add_request(make_req("c", 10))
    assert s.get_request("c") is None
    step(s)  # a and b start running: the queue has room again
    s.add_request(make_req("c", 10, max_tokens=2))
    run_to_end(s)
    assert_drained(s)


def test_max_num_seqs():
    s = make_sched(max_seqs=2)
    for r in "abc":
        s.add_request(make_req(r, 10, max_tokens=2))
    out, _ = step(s)
    assert [v[0] for v in sched_view(out)] == ["a", "b"] and s.num_waiting == 1
    run_to_end(s)
    assert_drained(s)


def _generate(s, req, tokens):
    s.add_request(req)
    tokens = {req.request_id: list(tokens)}
    while s.has_unfinished_requests():
        step(s, tokens)
    assert_drained(s)
    return req


def test_eos_stops():
    r = _generate(make_sched(), make_req("r", 10, eos=(2,)), [7, 2, 7])
    assert r.output_token_ids == [7, 2] and r.status == RequestStatus.FINISHED_STOPPED
    assert r.stop_reason is None and r.first_token_time is not None


def test_min_tokens_delays_eos_and_stop_tokens():
    r = _generate(make_sched(), make_req("r", 10, eos=(2,), min_tokens=3, stop_token_ids=[9]),
                  [2, 9, 2, 7])
    assert r.output_token_ids == [2, 9, 2] and r.status == RequestStatus.FINISHED_STOPPED


def test_ignore_eos_runs_to_max_tokens():
    r = _generate(make_sched(), make_req("r", 10, eos=(2,), ignore_eos=True, max_tokens=4),
                  [2, 2, 2, 2, 2])
    assert r.output_token_ids == [2, 2, 2, 2] and r.status == RequestStatus.FINISHED_LENGTH


def test_stop_token_id_sets_stop_reason():
    r = _generate(make_sched(), make_req("r", 10, stop_token_ids=[9]), [7, 9])
    assert r.output_token_ids == [7, 9] and r.stop_reason == 9
    assert r.status == RequestStatus.FINISHED_STOPPED


def test_max_tokens_and_max_model_len():
    r = _generate(make_sched(), make_req("r", 10, max_tokens=3), [])
    assert r.num_output_tokens == 3 and r.status == RequestStatus.FINISHED_LENGTH
    r = _generate(make_sched(max_model_len=14), make_req("r", 10, max_tokens=None), [])
    assert r.num_tokens == 14 and r.status == RequestStatus.FINISHED_LENGTH


def _group(n, prompt_len=40, max_tokens=3):
    return [Request(f"g-{i}", list(range(prompt_len)), SamplingParams(n=n, max_tokens=max_tokens),
                    group_id="g", sample_index=i) for i in range(n)]


def test_n_samples_share_prompt_blocks():
    s = make_sched()
    g = _group(3)
    for r in g:
        s.add_request(r)
    out, _ = step(s)
    assert sched_view(out) == [("g-0", 40, 0, True)]  # siblings wait for sample 0's prompt
    out, _ = step(s)
    assert sched_view(out) == [("g-0", 1, 40, True), ("g-1", 8, 32, True), ("g-2", 8, 32, True)]
    assert [sr.block_ids for sr in out.scheduled] == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    blocks = s.kv.pool.blocks
    assert [blocks[i].ref_cnt for i in range(5)] == [3, 3, 1, 1, 1]
    assert g[1].num_cached_tokens == 32
    run_to_end(s)
    assert all(r.num_output_tokens == 3 for r in g)
    assert_drained(s)


def test_n_samples_wait_for_chunked_leader():
    s = make_sched(budget=32)
    g = _group(2)
    for r in g:
        s.add_request(r)
    assert sched_view(step(s)[0]) == [("g-0", 32, 0, False)]
    assert sched_view(step(s)[0]) == [("g-0", 8, 32, True)]
    assert sched_view(step(s)[0]) == [("g-0", 1, 40, True), ("g-1", 8, 32, True)]
    run_to_end(s)
    assert_drained(s)


def test_n_samples_without_caching_are_admitted_together():
    s = make_sched(caching=False)
    for r in _group(3):
        s.add_request(r)
    out, _ = step(s)
    assert [sr.block_ids for sr in out.scheduled] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    run_to_end(s)
    assert_drained(s)


def test_abort_frees_blocks_and_is_idempotent():
    s = make_sched()
    a, b, c = make_req("a", 20), make_req("b", 20), make_req("c", 20)
    for r in (a, b):
        s.add_request(r)
    step(s)
    s.add_request(c)
    assert s.kv.get_block_ids("a") == [0, 1]
    done = s.finish_requests(["a", "c", "nope"], RequestStatus.FINISHED_ABORTED)
    assert done == [a, c] and a.status == c.status == RequestStatus.FINISHED_ABORTED
    assert s.kv.get_block_ids("a") == [] and s.num_running == 1 and s.num_waiting == 0
    assert s.finish_requests("a", RequestStatus.FINISHED_ABORTED) == []
    # Aborted between schedule() and update_from_output(): its token is dropped.
    out = s.schedule()
    s.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert s.update_from_output(out, ModelRunnerOutput.from_token_ids({"b": [TOKEN]})) == []
    assert b.num_output_tokens == 1
    assert_drained(s)


def _check_invariants(s, out):
    kv = s.kv
    holders = {}
    for rid, blocks in kv.req_blocks.items():
        assert rid in {r.request_id for r in s.running}
        for b in blocks:
            holders[b.block_id] = holders.get(b.block_id, 0) + 1
    assert all(b.ref_cnt == holders.get(b.block_id, 0) for b in kv.pool.blocks)
    assert sorted(kv.pool.free_block_ids()) == [b.block_id for b in kv.pool.blocks if b.ref_cnt == 0]
    for r in s.running:
        assert r.num_computed_tokens <= r.num_tokens
        assert len(kv.req_blocks.get(r.request_id, ())) * BS >= r.num_computed_tokens
    assert all(r.num_computed_tokens == 0 and r.request_id not in kv.req_blocks for r in s.waiting)
    assert out.num_batched_tokens <= s.config.max_num_batched_tokens
    assert s.num_running <= s.config.max_num_seqs


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_invariants_and_drains(seed):
    import random
    rng = random.Random(seed)
    s = make_sched(num_blocks=12, budget=rng.choice([24, 48, 96]), max_seqs=rng.choice([3, 8]),
                   policy=rng.choice(["fcfs", "priority"]), chunked=seed % 3 != 0,
                   caching=seed % 2 == 0, max_model_len=150)
    prefixes = [list(range(i * 1000, i * 1000 + 40)) for i in range(3)]
    n_req = 0
    for t in range(3000):
        if t < 250 and rng.random() < 0.3:
            prompt = rng.choice(prefixes)[:rng.randint(1, 40)] + [rng.randint(0, 99)
                                                                  for _ in range(rng.randint(0, 60))]
            n = rng.choice([1, 1, 3])
            sp = SamplingParams(n=n, max_tokens=rng.randint(1, 60), stop_token_ids=[3])
            for i in range(n):
                try:
                    s.add_request(Request(f"r{n_req}-{i}", prompt, sp, group_id=f"r{n_req}",
                                          sample_index=i, priority=rng.randint(0, 2)))
                except InvalidRequestError:
                    pass
            n_req += 1
        if rng.random() < 0.05 and s.requests:
            s.finish_requests(rng.choice(sorted(s.requests)), RequestStatus.FINISHED_ABORTED)
        out = s.schedule()
        sampled = {sr.request.request_id: [rng.randint(0, 40)] for sr in out.scheduled if sr.sample}
        s.update_from_output(out, ModelRunnerOutput.from_token_ids(sampled))
        _check_invariants(s, out)
        if t >= 250 and not s.has_unfinished_requests():
            break
    assert_drained(s)
