"""Metric definitions on synthetic timings: exact percentiles, TPOT/ITL, goodput, throughput."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metroline.bench.metrics import (RequestRecord, compute_metrics, cost_per_million, meets_slos,
                                     parse_slos, per_turn_metrics, percentile, summarize)


def rec(start, ttft, gaps, *, program=0, turn=0, prompt=10, out=None, ok=True):
    """A successful record whose chunks arrive at ttft, ttft+gaps[0], ...; e2e = last chunk."""
    times = [ttft]
    for g in gaps:
        times.append(times[-1] + g)
    n = len(times) if out is None else out
    return RequestRecord(program, turn, start=start, success=ok, ttft=ttft, latency=times[-1],
                         chunk_times=times, prompt_tokens=prompt, output_tokens=n,
                         expected_output_tokens=n, token_source="usage")


def test_percentile_exact_values():
    xs = [15, 20, 35, 40, 50]
    assert percentile(xs, 0) == 15
    assert percentile(xs, 100) == 50
    assert percentile(xs, 50) == 35
    assert percentile(xs, 40) == 29  # rank 1.6: 20 + 0.6 * 15
    assert percentile(xs, 90) == pytest.approx(46)  # rank 3.6: 40 + 0.6 * 10
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))
    assert percentile([3, 1, 2], 50) == 2  # unsorted input
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 101, 1000):
        xs = rng.exponential(size=n).tolist()
        for p in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)), rel=1e-12)


def test_summarize_scales_and_empty():
    s = summarize([0.1, 0.2, 0.3, 0.4], scale=1000)
    assert s["n"] == 4 and s["mean"] == pytest.approx(250) and s["p50"] == pytest.approx(250)
    assert s["min"] == pytest.approx(100) and s["max"] == pytest.approx(400)
    assert s["p99"] == pytest.approx(397)
    assert summarize([])["mean"] is None and summarize([])["n"] == 0


def test_tpot_and_itl_definitions():
    r = rec(0.0, 0.5, [0.1, 0.2, 0.3])  # chunks at 0.5, 0.6, 0.8, 1.1
    assert r.itl == pytest.approx([0.1, 0.2, 0.3])
    assert r.latency == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    # TPOT counts tokens, not chunks: 7 tokens in 4 chunks
    r7 = rec(0.0, 0.5, [0.1, 0.2, 0.3], out=7)
    assert r7.tpot == pytest.approx(0.6 / 6)
    assert r7.itl == pytest.approx([0.1, 0.2, 0.3])
    assert rec(0.0, 0.5, []).tpot is None  # one token: undefined
    assert RequestRecord(0, 0, success=False).tpot is None


def test_compute_metrics_throughput_and_latency():
    rs = [rec(0.0, 0.2, [0.1] * 9),     # ends at 1.1, 10 tokens
          rec(0.5, 0.4, [0.05] * 19),   # ends at 0.5 + 1.35 = 1.85, 20 tokens
          RequestRecord(1, 0, start=0.2, error="HTTP 500", expected_output_tokens=5)]
    m = compute_metrics(rs)
    assert m["duration_s"] == pytest.approx(1.85)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["output_tokens"] == 30 and m["input_tokens"] == 20
    assert m["request_throughput"] == pytest.approx(2 / 1.85)
    assert m["output_throughput"] == pytest.approx(30 / 1.85)
    assert m["total_token_throughput"] == pytest.approx(50 / 1.85)
    assert m["ttft_ms"]["mean"] == pytest.approx(300)
    assert m["ttft_ms"]["p50"] == pytest.approx(300)
    assert m["tpot_ms"]["p50"] == pytest.approx((100 + 50) / 2)
    assert m["itl_ms"]["n"] == 9 + 19
    assert m["itl_ms"]["p50"] == pytest.approx(50)  # 19 gaps of 50 ms, 9 of 100 ms
    assert m["e2e_ms"]["max"] == pytest.approx(1350)
    assert m["output_tokens_short"] == 0 and m["token_sources"] == {"usage": 2}
    # an explicit duration (the run's wall time) wins
    assert compute_metrics(rs, duration=2.0)["output_throughput"] == pytest.approx(15)


def test_goodput_counts_requests_within_every_slo():
    fast = rec(0.0, 0.1, [0.02] * 10)      # ttft 100 ms, tpot 20 ms
    slow_ttft = rec(0.0, 0.6, [0.02] * 10)  # ttft 600 ms
    slow_tpot = rec(0.0, 0.1, [0.2] * 10)   # tpot 200 ms
    one_token = rec(0.0, 0.3, [])           # tpot undefined: does not fail a tpot SLO
    failed = RequestRecord(0, 0, error="boom")
    slos = parse_slos(["ttft:500", "tpot:100"])
    assert slos == {"ttft": 500.0, "tpot": 100.0}
    assert [meets_slos(r, slos) for r in (fast, slow_ttft, slow_tpot, one_token, failed)] == \
        [True, False, False, True, False]
    m = compute_metrics([fast, slow_ttft, slow_tpot, one_token, failed], duration=2.0, slos=slos)
    g = m["goodput"]
    assert g["good_requests"] == 2 and g["request_goodput"] == pytest.approx(1.0)
    assert g["fraction"] == pytest.approx(2 / 5)
    # boundary is inclusive; itl bounds the largest gap; e2e the whole latency
    assert meets_slos(rec(0, 0.5, [0.1]), {"ttft": 500})
    assert not meets_slos(rec(0, 0.1, [0.01, 0.3]), {"itl": 200})
    assert meets_slos(rec(0, 0.1, [0.01, 0.3]), {"e2e": 410})
    assert "goodput" not in compute_metrics([fast])


@pytest.mark.parametrize("bad", ["ttft", "ttft:abc", "foo:10", "ttft:-5", "ttft:0"])
def test_parse_slos_rejects(bad):
    with pytest.raises(ValueError):
        parse_slos([bad])


def test_parse_slos_forms():
    assert parse_slos(["ttft:500,tpot:50", "E2E:2000"]) == {"ttft": 500, "tpot": 50, "e2e": 2000}
    assert parse_slos(None) == {}


def test_per_turn_groups_by_call_index():
    rs = [rec(0, 0.1, [0.01], turn=0, prompt=10), rec(0, 0.3, [0.01], turn=1, prompt=30),
          rec(0, 0.2, [0.01], program=1, turn=0, prompt=20), rec(0, 0.5, [0.01], program=1, turn=1, prompt=50)]
    t = per_turn_metrics(rs)
    assert list(t) == [0, 1]
    assert t[0]["ttft_ms"]["p50"] == pytest.approx(150) and t[1]["ttft_ms"]["p50"] == pytest.approx(400)
    assert t[1]["prompt_tokens_mean"] == 40


def test_cost_per_million():
    c = cost_per_million(3.6, {"output_throughput": 100.0, "input_throughput": 1000.0,
                               "total_token_throughput": 1100.0})
    assert c["usd_per_m_output_tokens"] == pytest.approx(10.0)  # $0.001/s / 100 tok/s * 1e6
    assert c["usd_per_m_input_tokens"] == pytest.approx(1.0)
    assert c["usd_per_m_total_tokens"] == pytest.approx(1e3 / 1100)
    assert cost_per_million(1, {"output_throughput": 0, "input_throughput": 0,
                                "total_token_throughput": 0})["usd_per_m_output_tokens"] is None


def test_record_json_round_trip():
    r = rec(0.25, 0.1, [0.02, 0.03], turn=2)
    d = r.to_json(with_chunks=True)
    assert d["tpot"] == pytest.approx(r.tpot)
    back = RequestRecord.from_json(d)
    assert back == r
    assert "chunk_times" not in r.to_json()
