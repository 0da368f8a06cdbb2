"""metroline.agents.guards: the circuit breaker's states and the loop detector's escalation,
driven by scripted calls and a fake clock."""

from __future__ import annotations

import pytest

from metroline.agents.guards import BreakerState, CircuitBreaker, Escalation, LoopDetector


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_breaker_opens_half_opens_and_closes():
    clock = Clock()
    b = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record(False)
    assert b.state is BreakerState.CLOSED
    b.record(True)  # a success resets the count
    for _ in range(3):
        assert b.allow()
        b.record(False)
    assert b.state is BreakerState.OPEN and not b.allow() and b.retry_in() == 10
    clock.t = 9.9
    assert not b.allow()
    clock.t = 10.0
    assert b.allow() and b.state is BreakerState.HALF_OPEN  # the probe
    assert not b.allow()  # only one probe at a time
    b.record(False)  # the probe failed: open again for a full cool-down
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.t = 20.0
    assert b.allow()
    b.record(True)
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)


def test_endless_same_call_escalates_hint_remove_stop():
    d = LoopDetector(window=8, repeat=3)
    levels = []
    for i in range(9):
        v = d.observe("search", {"q": "weather"}, f"result {i}")
        levels.append(v.level)
    assert levels == [0, 0, Escalation.HINT, 0, 0, Escalation.REMOVE, 0, 0, Escalation.STOP]
    v = LoopDetector(repeat=2).observe("a", {}, "x")
    assert v.level is Escalation.NONE


def test_a_b_cycle_and_stale_results():
    d = LoopDetector(window=8, repeat=3)
    out = [d.observe(n, {"k": n}, f"{n}{i}") for i, n in enumerate("abab")]
    assert [v.level for v in out] == [0, 0, 0, Escalation.HINT]
    assert out[-1].kind == "cycle" and "A-B-A-B" in out[-1].reason and out[-1].tool == "b"
    d = LoopDetector(window=8, repeat=3, stale=3)
    vs = [d.observe("read", {"page": i}, "same text") for i in range(4)]  # new arguments, nothing new back
    assert [v.level for v in vs] == [0, 0, 0, Escalation.HINT] and vs[-1].kind == "stale"


def test_varied_work_is_not_a_loop():
    d = LoopDetector()
    for i in range(50):
        assert d.observe("calc", {"expression": f"{i} * 2"}, str(2 * i)).level is Escalation.NONE
