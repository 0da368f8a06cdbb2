"""Made-up `bench serve` results (no server): realistic shapes for plots and comparisons."""

from __future__ import annotations

import random

from metroline.bench.metrics import RequestRecord, compute_metrics, per_turn_metrics
from metroline.bench.serve import RESULT_KIND, RESULT_VERSION


def fake_run(concurrency: int | None, n: int = 24, seed: int = 0, ttft_s: float = 0.3,
             itl_s: float = 0.09, turns: int = 1, rate: float | None = None) -> dict:
    """One run: TTFT and ITL grow with the concurrency (queueing, bigger batches)."""
    rng = random.Random(seed * 1000 + (concurrency or 0))
    c = concurrency or n
    records = []
    for i in range(n):
        for t in range(turns):
            rec = RequestRecord(i, t, start=rng.uniform(0, 2), success=True, token_source="usage")
            rec.ttft = ttft_s * c ** 0.8 * rng.uniform(0.5, 2.5) * (1 + 0.3 * t)
            rec.output_tokens = rec.expected_output_tokens = rng.randint(16, 64)
            rec.prompt_tokens = rng.randint(20, 500) + 80 * t
            now, times = rec.ttft, [rec.ttft]
            for _ in range(rec.output_tokens - 1):
                now += itl_s * c ** 0.4 * rng.uniform(0.8, 1.3) * (8 if rng.random() < 0.01 else 1)
                times.append(now)
            rec.chunk_times, rec.latency = times, now + 0.002
            records.append(rec)
    m = compute_metrics(records, max(r.end for r in records), {"ttft": 2000, "tpot": 200})
    run = {"max_concurrency": concurrency, "request_rate": rate,
           "load_avg": {"start": [0.5, 0.6, 0.7], "end": [1.9, 1.2, 0.8]}, "metrics": m,
           "requests": [r.to_json(with_chunks=True) for r in records]}
    if turns > 1:
        run["per_turn"] = {str(k): v for k, v in per_turn_metrics(records).items()}
    return run


def fake_result(label: str = "fake", concurrencies=(1, 4, 16), load1: float | None = 0.63,
                cores: int = 2, turns: int = 1, dataset: str = "sharegpt", **kw) -> dict:
    load = None if load1 is None else {"time": "2026-11-29 01:53:00", "load_avg": [load1, 0.8, 0.9],
                                       "cpu_count": cores}
    res = {"kind": RESULT_KIND, "version": RESULT_VERSION, "label": label, "date": "2026-11-29 01:53:00",
           "base_url": "http://127.0.0.1:8000", "model": "SmolLM2-135M-Instruct.Q4_1",
           "endpoint": "chat", "machine": {"cpu": "fake", "cores": cores},
           "dataset": {"name": dataset, "num_prompts": 24},
           "runs": [fake_run(c, turns=turns, **kw) for c in concurrencies]}
    if load is not None:
        res["load"] = {"start": load}
        res["machine"]["load_avg_at_start"] = load["load_avg"]
    return res
