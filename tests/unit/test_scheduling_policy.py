"""Scheduling policies (engine/policy.py) driven through the Scheduler alone, fake outputs, a
fake clock: no model."""

import pytest

from metroline.config import SchedulerConfig
from metroline.engine.policy import (POLICIES, FCFSPolicy, PriorityPolicy, ProgramLeastAttainedPolicy,
                                     SchedulingPolicy, make_policy)
from metroline.engine.request import ModelRunnerOutput, Request, RequestStatus, SamplingParams
from metroline.engine.scheduler import Scheduler
from metroline.errors import InvalidRequestError
from metroline.kv.kv_manager import KVCacheManager

BS = 16


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def make_sched(policy, num_blocks=64, max_seqs=1, budget=256, clock=None):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy)
    s = Scheduler(cfg, KVCacheManager(num_blocks, BS, True), BS, 4096)
    s.clock = clock or Clock()
    return s


_starts = iter(range(0, 10**9, 10_000))


def make_req(rid, n=20, max_tokens=4, program=None, priority=0, arrival=None):
    start = next(_starts)
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens),
                   program_id=program, priority=priority, arrival_time=arrival)


def step(s, clock=None, dt=0.01):
    out = s.schedule()
    sampled = {sr.request.request_id: [5] for sr in out.scheduled if sr.sample}
    s.update_from_output(out, ModelRunnerOutput.from_token_ids(sampled))
    if clock is not None:
        clock.t += dt
    return out


def finish_order(s, clock=None, max_steps=2000):
    order = []
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return order
        out = s.schedule()
        sampled = {sr.request.request_id: [5] for sr in out.scheduled if sr.sample}
        for r in s.update_from_output(out, ModelRunnerOutput.from_token_ids(sampled)):
            if r.is_finished:
                order.append(r.request_id)
        if clock is not None:
            clock.t += 0.01
    raise AssertionError("scheduler did not drain")


def admitted_order(s, clock=None):
    """Request ids in the order they were first scheduled."""
    seen = []
    for _ in range(2000):
        if not s.has_unfinished_requests():
            return seen
        out = step(s, clock)
        for sr in out.scheduled:
            if sr.request.request_id not in seen:
                seen.append(sr.request.request_id)
    raise AssertionError("scheduler did not drain")


# ---------------------------------------------------------------- registry and config

def test_registry_and_config_accept_names_and_instances():
    assert set(POLICIES) == {"fcfs", "priority", "plas"}
    assert isinstance(make_policy("fcfs"), FCFSPolicy)
    assert isinstance(make_policy("priority"), PriorityPolicy)
    assert isinstance(make_policy("plas"), ProgramLeastAttainedPolicy)
    assert make_policy("plas") is not make_policy("plas")  # a fresh state per engine
    mine = ProgramLeastAttainedPolicy(aging_rate=1.0)
    assert make_policy(mine) is mine
    assert SchedulerConfig(policy=mine).policy is mine
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(policy="lifo")
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(policy=FCFSPolicy)  # a class, not an instance
    with pytest.raises(ValueError):
        make_policy("lifo")
    s = make_sched(mine)
    assert s.policy is mine


# ---------------------------------------------------------------- PLAS

def _long_program_then_a_fresh_one(s, clock, after_first=None) -> list[str]:
    """Program "long" has its first call served alone (200 prompt positions + decodes); then its
    next call arrives just before a new program's first one. The second finish order."""
    s.add_request(make_req("long-1", n=200, program="long"))
    assert finish_order(s, clock) == ["long-1"]
    if after_first is not None:
        after_first()
    clock.t += 0.001
    s.add_request(make_req("long-2", n=220, program="long"))
    clock.t += 0.001
    s.add_request(make_req("short-1", n=20, program="short"))
    return finish_order(s, clock)


def test_plas_admits_fresh_program_before_one_that_had_lots_of_service():
    clock = Clock()
    s = make_sched("plas", clock=clock)

    def check_service():
        assert s.policy.attained_service("long") == 200 + 3  # 200 prefill + 3 decodes (4th token ends it)

    # One slot: the fresh program goes first.
    assert _long_program_then_a_fresh_one(s, clock, check_service) == ["short-1", "long-2"]


def test_fcfs_serves_the_same_workload_in_arrival_order():
    clock = Clock()
    s = make_sched("fcfs", clock=clock)
    assert _long_program_then_a_fresh_one(s, clock) == ["long-2", "short-1"]


def test_plas_service_is_per_program_not_per_request():
    clock = Clock()
    s = make_sched("plas", max_seqs=4, clock=clock)
    for i in range(3):
        s.add_request(make_req(f"a{i}", n=30, program="A"))
    s.add_request(make_req("b0", n=30, program="B"))
    finish_order(s, clock)
    # 3 calls of A (30 prefill + 3 decodes each) vs 1 of B.
    assert s.policy.attained_service("A") == 3 * 33
    assert s.policy.attained_service("B") == 33
    # A request without a program is its own: its state goes when it finishes.
    s.add_request(make_req("lone", n=30))
    finish_order(s, clock)
    assert set(s.policy.programs) == {"A", "B"}


def test_plas_preempts_the_program_with_most_service():
    clock = Clock()
    # 9 blocks; two requests of 64 tokens (4 blocks each) fill 8, the 9th goes to the first
    # that needs a 5th block, and the other must then be preempted.
    s = make_sched("plas", num_blocks=9, max_seqs=2, clock=clock)
    # Give program "heavy" prior service through a finished call.
    s.add_request(make_req("heavy-0", n=100, max_tokens=1, program="heavy"))
    finish_order(s, clock)
    clock.t += 0.001
    heavy = make_req("heavy-1", n=64, max_tokens=40, program="heavy")
    light = make_req("light-1", n=64, max_tokens=40, program="light")
    s.add_request(heavy)
    s.add_request(light)
    preempted = []
    for _ in range(400):
        if not s.has_unfinished_requests():
            break
        preempted += [r.request_id for r in step(s, clock).preempted]
    assert preempted and preempted[0] == "heavy-1"
    assert heavy.num_preemptions >= 1 and light.num_preemptions == 0
    assert heavy.status == light.status == RequestStatus.FINISHED_LENGTH


def test_plas_aging_lets_a_starving_request_win():
    clock = Clock()
    policy = ProgramLeastAttainedPolicy(aging_rate=100.0)
    s = make_sched(policy, clock=clock)
    s.add_request(make_req("long-1", n=500, program="long"))
    finish_order(s, clock)
    service = policy.attained_service("long")
    assert service >= 500
    starving = make_req("long-2", n=20, program="long", arrival=clock.t)
    s.add_request(starving)
    # A stream of fresh one-call programs keeps arriving; at first each goes ahead of long-2.
    first = make_req("fresh-0", n=20, program="fresh-0", arrival=clock.t + 0.001)
    s.add_request(first)
    out = step(s, clock)
    assert [sr.request.request_id for sr in out.scheduled] == ["fresh-0"]
    # Past service / aging_rate seconds of waiting, long-2 beats a newcomer.
    while s.num_running:
        step(s, clock)
    clock.t = starving.arrival_time + service / policy.aging_rate + 0.5
    s.add_request(make_req("fresh-1", n=20, program="fresh-1", arrival=clock.t))
    out = step(s, clock)
    assert [sr.request.request_id for sr in out.scheduled] == ["long-2"]
    assert policy.effective_service(starving, clock.t) < 0


def test_plas_without_aging_starves_under_a_stream_of_fresh_programs():
    """The control for the aging test: with aging_rate=0 the same request never gets in."""
    clock = Clock()
    policy = ProgramLeastAttainedPolicy(aging_rate=0.0)
    s = make_sched(policy, clock=clock)
    s.add_request(make_req("long-1", n=500, program="long"))
    finish_order(s, clock)
    starving = make_req("long-2", n=20, program="long", arrival=clock.t)
    s.add_request(starving)

    def run_with_newcomers(num_steps):
        for i in range(num_steps):
            if not s.num_running:  # a newcomer is always there when the slot frees
                s.add_request(make_req(f"f{clock.t}", n=20, program=f"p{clock.t}"))
            step(s, clock, dt=1.0)

    run_with_newcomers(200)  # 200 s: a newcomer's whole life is a few steps
    assert starving.status == RequestStatus.WAITING
    policy.aging_rate = 100.0  # with aging it gets in within service / rate seconds
    run_with_newcomers(20)
    assert starving.status != RequestStatus.WAITING


def test_plas_program_state_is_dropped_after_idle_ttl():
    clock = Clock()
    policy = ProgramLeastAttainedPolicy(idle_ttl_s=60.0, prune_interval_s=0.0)
    s = make_sched(policy, max_seqs=8, clock=clock)
    for i in range(50):
        s.add_request(make_req(f"r{i}", n=20, program=f"prog{i}"))
    finish_order(s, clock)
    assert len(policy.programs) == 50
    clock.t += 30
    s.add_request(make_req("late", n=20, program="prog0"))  # prog0 is active again
    step(s, clock)
    assert len(policy.programs) == 50  # not idle long enough yet
    clock.t += 31
    step(s, clock)
    # Everyone idle > 60 s is gone; prog0 has a live request (and was active 31 s ago).
    assert set(policy.programs) == {"prog0"}
    finish_order(s, clock)
    clock.t += 61
    s.schedule()  # an idle step still prunes
    assert policy.programs == {}


def test_plas_waiting_request_keeps_its_program_alive_past_ttl():
    clock = Clock()
    policy = ProgramLeastAttainedPolicy(idle_ttl_s=5.0, prune_interval_s=0.0)
    s = make_sched(policy, max_seqs=1, clock=clock)
    s.add_request(make_req("hog", n=20, max_tokens=2000, program="hog"))
    s.add_request(make_req("w", n=20, program="waiter"))
    for _ in range(100):
        step(s, clock, dt=0.2)  # 20 s with "w" waiting behind the one slot
    assert "waiter" in policy.programs and policy.programs["waiter"].live == 1


def test_aborted_request_is_reported_to_the_policy():
    s = make_sched("plas", max_seqs=1)
    s.add_request(make_req("a", program="P"))
    s.add_request(make_req("b", program="P"))
    step(s)
    assert s.policy.programs["P"].live == 2
    s.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert s.policy.programs["P"].live == 0


# ---------------------------------------------------------------- custom policy

class ShortestPromptFirst(SchedulingPolicy):
    """A user's policy: the shortest prompt first; records what the scheduler told it."""

    def __init__(self):
        self.tokens: dict[str, int] = {}
        self.finished: list[str] = []
        self.added: list[str] = []
        self.steps = 0

    def sort_key(self, req, now):
        return (req.num_prompt_tokens, req.arrival_seq)

    def on_add(self, req, now):
        self.added.append(req.request_id)

    def on_tokens(self, req, num_tokens):
        self.tokens[req.request_id] = self.tokens.get(req.request_id, 0) + num_tokens

    def on_step(self, now):
        self.steps += 1

    def on_finish(self, req):
        self.finished.append(req.request_id)


def test_custom_policy_object_plugs_in():
    policy = ShortestPromptFirst()
    s = make_sched(policy, max_seqs=1)
    for rid, n in (("p60", 60), ("p10", 10), ("p30", 30)):
        s.add_request(make_req(rid, n=n, max_tokens=3))
    assert admitted_order(s) == ["p10", "p30", "p60"]
    assert policy.added == ["p60", "p10", "p30"]
    assert policy.finished == ["p10", "p30", "p60"]
    # Each: its prompt in one prefill + 2 decodes (the 3rd token finishes it).
    assert policy.tokens == {"p60": 62, "p10": 12, "p30": 32}
    assert policy.steps >= 9


# ---------------------------------------------------------------- FCFS / priority unchanged

def test_fcfs_keeps_the_waiting_queue_fifo_with_preempted_in_front():
    s = make_sched("fcfs", max_seqs=1)
    assert not s.policy.sorts_waiting
    late = make_req("late", arrival=5.0)
    early = make_req("early", arrival=1.0)
    s.add_request(late)
    s.add_request(early)
    # FIFO by submission, not by arrival_time: exactly today's behaviour.
    assert admitted_order(s) == ["late", "early"]


def test_priority_policy_orders_by_priority_then_arrival():
    s = make_sched("priority", max_seqs=1)
    for rid, p in (("a", 2), ("b", 0), ("c", 1), ("d", 0)):
        s.add_request(make_req(rid, priority=p))
    assert admitted_order(s) == ["b", "d", "c", "a"]
    s = make_sched("fcfs", max_seqs=1)
    for rid, p in (("a", 2), ("b", 0), ("c", 1), ("d", 0)):
        s.add_request(make_req(rid, priority=p))
    assert admitted_order(s) == ["a", "b", "c", "d"]
