"""The short soak (issue 16; scripts/stress.sh runs the long one): a mixed loopback load on the
shared server for 15 s (streams, aborts, chat, structured outputs, agent runs, bad inputs of
every kind): no server error, no hang, every good request completes, every bad one gets its
4xx, and the KV cache drains back to zero."""

from __future__ import annotations

import asyncio
import os

from metroline.bench.soak import BAD, soak


def test_a_short_soak_has_no_server_error_no_hang_and_drains(server):
    report = asyncio.run(soak(server.url, duration_s=15, concurrency=4, pid=os.getpid(),
                              request_timeout_s=90, seed=1))
    d = report.to_dict()
    assert report.server_errors == 0 and report.hangs == 0, d["failures"]
    assert report.failures == [], report.failures
    assert {"stream", "chat", "abort", "bad"} <= set(report.by_kind), report.by_kind
    assert all(k["failed"] == 0 for k in report.by_kind.values()), report.by_kind
    assert report.requests >= 20, report.by_kind
    assert set(report.bad_inputs) <= set(BAD)
    assert all(b["got_4xx"] == b["sent"] for b in report.bad_inputs.values()), report.bad_inputs
    assert report.kv_usage_at_end == 0.0
    assert len(report.samples) >= 10 and all(s["kv_usage"] is not None for s in report.samples)
    assert report.rss_mib_at_end is not None
