"""A short `bench serve` run against metroline's own server (real model), marked slow."""

from __future__ import annotations

import asyncio
import math

import pytest

from metroline.bench import workloads as w
from metroline.bench.client import StreamingClient
from metroline.bench.serve import bench

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def metroline_server(default_loaded):
    from metroline.server.app import ServerConfig, create_app
    from tests.server.conftest import ServerThread, make_engine

    engine = make_engine(default_loaded, num_blocks=256)
    st = ServerThread(create_app(engine, ServerConfig()))
    yield st
    st.stop()
    engine.shutdown(timeout=10)


def test_bench_serve_against_metroline(metroline_server, default_loaded):
    tok = default_loaded.tokenizer
    progs = w.random_programs(tok, 4, input_len=16, output_len=8, seed=0)
    client = StreamingClient(metroline_server.url, default_loaded.source.name, "completions")
    c1, c4 = asyncio.run(bench(client, progs, [(1, math.inf), (4, math.inf)], progress=False,
                               with_chunks=True))
    for run in (c1, c4):
        m = run["metrics"]
        assert m["completed"] == 4 and m["failed"] == 0
        assert m["output_tokens"] == 32 and m["token_sources"] == {"usage": 4}
        assert m["output_tokens_short"] == 0  # ignore_eos honoured
        for r in run["requests"]:
            assert 16 <= r["prompt_tokens"] <= 16 + 8  # + BOS / the run's nonce
            assert 0 < r["ttft"] < r["latency"]
            assert len(r["chunk_times"]) >= 2


def test_multiturn_chat_against_metroline(metroline_server, default_loaded):
    records = [{"conversations": [{"from": "human", "value": f"Question {i}.{t}: name a colour."}
                                  if k == 0 else {"from": "gpt", "value": "Blue is a colour."}
                                  for t in range(3) for k in range(2)]} for i in range(3)]
    progs = w.multiturn_programs(default_loaded.tokenizer, 2, max_turns=3, max_output_len=6,
                                 records=records)
    client = StreamingClient(metroline_server.url, default_loaded.source.name, "chat")
    (run,) = asyncio.run(bench(client, progs, [(2, math.inf)], progress=False))
    assert run["metrics"]["completed"] == 6
    turns = run["per_turn"]
    assert turns["2"]["prompt_tokens_mean"] > turns["1"]["prompt_tokens_mean"] > turns["0"]["prompt_tokens_mean"]
