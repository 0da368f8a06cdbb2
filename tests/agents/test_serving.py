"""agents/serving.py: KV retention from expected tool latency, and the per-tool latency EMA."""

import math

import pytest

from metroline.agents.serving import (DEFAULT_CAP_S, DEFAULT_FLOOR_S, ToolLatencyTracker,
                                      retention_seconds)
from metroline.engine.validation import MAX_KV_RETENTION_S


def test_retention_is_expected_latency_times_margin_within_floor_and_cap():
    assert retention_seconds(2.0, margin=1.5, floor_s=0.5, cap_s=30) == pytest.approx(3.0)
    assert retention_seconds(0.05, margin=1.5, floor_s=0.5, cap_s=30) == 0.5  # the floor
    assert retention_seconds(0.0) == DEFAULT_FLOOR_S
    assert retention_seconds(25.0, margin=2.0, cap_s=30) == 30.0  # clipped to the cap
    assert retention_seconds(30.0, margin=1.0, cap_s=30) == 30.0  # at the cap: still retained


def test_a_tool_slower_than_the_cap_gets_no_retention():
    assert retention_seconds(DEFAULT_CAP_S + 0.1) == 0.0
    assert retention_seconds(120.0, cap_s=60.0) == 0.0
    assert retention_seconds(math.inf) == 0.0
    # The cap itself never exceeds what the engine accepts.
    assert retention_seconds(10.0, cap_s=10**9) <= MAX_KV_RETENTION_S


@pytest.mark.parametrize("kwargs", [dict(expected_tool_latency_s=-1.0),
                                    dict(expected_tool_latency_s=math.nan),
                                    dict(expected_tool_latency_s=1.0, margin=0.5),
                                    dict(expected_tool_latency_s=1.0, floor_s=-1.0)])
def test_retention_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        retention_seconds(**kwargs)


def test_tracker_prior_then_first_observation_then_ema():
    t = ToolLatencyTracker(prior_s=2.0, alpha=0.5, priors={"search": 4.0})
    assert t.expected("calc") == 2.0 and t.expected("search") == 4.0
    assert t.num_observations("calc") == 0
    assert t.observe("calc", 0.1) == pytest.approx(0.1)  # the first one replaces the prior
    assert t.observe("calc", 0.3) == pytest.approx(0.2)
    assert t.observe("calc", 0.2) == pytest.approx(0.2)
    assert t.expected("calc") == pytest.approx(0.2) and t.num_observations("calc") == 3
    assert t.expected("search") == 4.0  # other tools untouched


def test_tracker_follows_a_tool_that_got_slower():
    t = ToolLatencyTracker(alpha=0.3)
    for _ in range(5):
        t.observe("db", 0.1)
    for _ in range(20):
        t.observe("db", 2.0)
    assert 1.9 < t.expected("db") <= 2.0


def test_retention_for_uses_the_slowest_of_parallel_tools():
    t = ToolLatencyTracker(prior_s=1.0)
    t.observe("fast", 0.2)
    t.observe("slow", 4.0)
    t.observe("glacial", 600.0)
    assert t.retention_for("fast") == DEFAULT_FLOOR_S
    assert t.retention_for(["fast", "slow"]) == pytest.approx(6.0)
    assert t.retention_for(["fast", "glacial"]) == 0.0  # the pin would outlive its use
    assert t.retention_for("unknown") == pytest.approx(1.5)  # the prior
    assert t.retention_for([]) == 0.0
    assert t.retention_for("slow", margin=1.0) == pytest.approx(4.0)


def test_measure_records_duration_even_when_the_tool_raises():
    now = [100.0]
    t = ToolLatencyTracker(clock=lambda: now[0])
    with t.measure("calc"):
        now[0] += 0.25
    assert t.expected("calc") == pytest.approx(0.25)
    with pytest.raises(RuntimeError):
        with t.measure("flaky"):
            now[0] += 3.0
            raise RuntimeError("tool failed")
    assert t.expected("flaky") == pytest.approx(3.0)


def test_tracker_memory_is_bounded_lru():
    t = ToolLatencyTracker(prior_s=9.0, max_tools=3)
    for name in ("a", "b", "c"):
        t.observe(name, 1.0)
    t.expected("a")  # a is now the most recently used
    t.observe("d", 1.0)
    assert len(t) == 3
    assert t.expected("b") == 9.0 and t.num_observations("b") == 0  # b was dropped
    assert t.expected("a") == 1.0 and t.expected("d") == 1.0


def test_tracker_rejects_bad_values():
    with pytest.raises(ValueError):
        ToolLatencyTracker(alpha=0.0)
    with pytest.raises(ValueError):
        ToolLatencyTracker(prior_s=-1.0)
    with pytest.raises(ValueError):
        ToolLatencyTracker().observe("x", -0.1)
