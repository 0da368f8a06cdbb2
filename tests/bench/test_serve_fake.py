"""The load generator end to end against a fake streaming server with known delays."""

from __future__ import annotations

import asyncio
import json
import math
import os

import pytest

from metroline.bench import workloads as w
from metroline.bench.client import StreamingClient, TokenCounter, api_root
from metroline.bench.serve import arrival_offsets, bench, load_result
from tests.bench.fake_server import FakeServer
from tests.bench.fake_tokenizer import WordTokenizer

TOK = WordTokenizer()
INF = math.inf


def records(n=20, turns=1):
    return [{"conversations": [m for t in range(turns) for m in (
        {"from": "human", "value": " ".join(f"h{r}_{t}_{i}" for i in range(8))},
        {"from": "gpt", "value": " ".join(["a"] * 6)})]} for r in range(n)]


@pytest.fixture(scope="module")
def fake():
    s = FakeServer(ttft=0.1, itl=0.02)
    yield s
    s.stop()


def run(server, programs, points, endpoint="chat", warmup=1, **client_kw):
    client = StreamingClient(server.url, "fake-model", endpoint, **client_kw)
    return asyncio.run(bench(client, programs, points, warmup_calls=warmup, progress=False,
                             with_chunks=True))


def test_api_root():
    assert api_root("http://h:1") == api_root("http://h:1/") == api_root("http://h:1/v1/") == "http://h:1/v1"


@pytest.mark.timing
def test_measured_timings_match_the_servers_delays(fake):
    progs = w.random_programs(TOK, 4, input_len=12, output_len=10, seed=0)
    (summary,) = run(fake, progs, [(1, INF)], endpoint="completions")
    m = summary["metrics"]
    assert m["completed"] == 4 and m["failed"] == 0
    assert m["output_tokens"] == 40 and m["token_sources"] == {"usage": 4}
    assert m["input_tokens"] == 4 * (12 + 3)  # the server counts words; +3: the run's nonce
    for r in summary["requests"]:
        gaps = [b - a for a, b in zip(r["chunk_times"], r["chunk_times"][1:])]
        assert 0.1 <= r["ttft"] < 0.18, r
        assert sum(gaps) / len(gaps) == pytest.approx(0.02, abs=0.006)
        assert r["tpot"] == pytest.approx(0.02, abs=0.006)
        assert 0.1 + 9 * 0.02 <= r["latency"] < 0.1 + 9 * 0.02 + 0.12
    # one at a time: the run lasts about 4 requests
    assert 4 * 0.28 <= m["duration_s"] < 4 * 0.28 + 0.5
    assert m["request_throughput"] == pytest.approx(4 / m["duration_s"])
    # what was sent: fixed output lengths and a usage chunk, greedy
    body = fake.bodies[-1]
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == 10
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["model"] == "fake-model"


def test_tokens_counted_without_usage():
    # 7 tokens sent two to a chunk: counting chunks says 4, re-encoding the text says 7
    s = FakeServer(ttft=0.01, itl=0.005, usage=False, tokens_per_chunk=2)
    try:
        progs = w.random_programs(TOK, 2, 8, 7, seed=1)
        (by_chunks,) = run(s, progs, [(2, INF)], include_usage=False)
        (by_tok,) = run(s, progs, [(2, INF)], token_counter=TokenCounter(TOK))
    finally:
        s.stop()
    assert "stream_options" not in s.bodies[0]
    m = by_chunks["metrics"]
    assert m["output_tokens"] == 8 and m["token_sources"] == {"chunks": 2}
    assert m["input_tokens"] == 2 * 8  # the client's estimate: the content's tokens
    m = by_tok["metrics"]
    assert m["output_tokens"] == 14 and m["token_sources"] == {"tokenizer": 2}
    # the prompt as the chat template renders it
    assert sorted(r["prompt_tokens"] for r in by_tok["requests"]) == \
        sorted(len(TOK.apply_chat_template(b["messages"]).split()) for b in s.bodies[-2:])


def test_outputs_cut_short_by_eos_are_reported():
    s = FakeServer(ttft=0.01, itl=0.005, eos_after=3)
    try:
        (summary,) = run(s, w.random_programs(TOK, 3, 8, 10, seed=1), [(3, INF)], fixed_length=False)
    finally:
        s.stop()
    assert "ignore_eos" not in s.bodies[-1]
    assert summary["metrics"]["output_tokens"] == 9
    assert summary["metrics"]["output_tokens_short"] == 3


@pytest.mark.timing
def test_serialized_server_shows_queueing_in_ttft():
    # Each request takes 0.05 + 5 * 0.01 = 0.1 s and the server serves one at a time (as
    # llama-cpp-python's does): with 4 sent at once, the k-th waits k * 0.1 s for its turn.
    s = FakeServer(ttft=0.05, itl=0.01, serialize=True)
    try:
        progs = w.random_programs(TOK, 4, 8, 6, seed=0)
        c1, c4 = run(s, progs, [(1, INF), (4, INF)], warmup=0)
    finally:
        s.stop()
    ttfts = sorted(r["ttft"] for r in c4["requests"])
    for k, t in enumerate(ttfts):
        assert t == pytest.approx(0.05 + 0.1 * k, abs=0.05), ttfts
    assert all(r["ttft"] < 0.1 for r in c1["requests"])
    assert c4["metrics"]["duration_s"] == pytest.approx(c1["metrics"]["duration_s"], rel=0.3)
    assert c4["metrics"]["ttft_ms"]["p50"] > 2 * c1["metrics"]["ttft_ms"]["p50"]


def test_multiturn_history_grows_with_the_replies(fake):
    start = len(fake.bodies)
    progs = w.multiturn_programs(TOK, 2, max_turns=3, min_turns=3, max_output_len=4,
                                 records=records(5, turns=3))
    runs = run(fake, progs, [(2, INF), (1, INF)], warmup=0)
    bodies = [b for b in fake.bodies[start:]]
    assert len(bodies) == 2 * 2 * 3
    nonces = set()
    for b in bodies:
        msgs = b["messages"]
        k = (len(msgs) - 1) // 2  # call index: 1 user message, then (assistant, user) pairs
        assert [m["role"] for m in msgs] == ["user"] + ["assistant", "user"] * k
        for m in msgs[1::2]:
            assert m["content"] == " t0 t1 t2 t3"  # the streamed reply, verbatim
        nonces.add(" ".join(msgs[0]["content"].split()[:3]))
    assert len(nonces) == 2  # one per run: a sweep's second run does not hit the first's cache
    for summary in runs:
        assert set(summary["per_turn"]) == {"0", "1", "2"}
        assert summary["per_turn"]["2"]["prompt_tokens_mean"] > summary["per_turn"]["0"]["prompt_tokens_mean"]
        assert [(r["program_id"], r["turn"]) for r in summary["requests"]] == \
            [(p, t) for p in range(2) for t in range(3)]


@pytest.mark.timing
def test_agent_calls_wait_for_their_tool(fake):
    progs = w.agent_programs(TOK, 2, seed=0, num_calls=3, output_len=3, tool_output_len=5,
                             tool_pause_s=0.1, system_len=20, task_len=6, records=records())
    start = len(fake.bodies)
    (summary,) = run(fake, progs, [(None, INF)], warmup=0)
    reqs = summary["requests"]
    assert summary["metrics"]["completed"] == 6
    for p in progs:
        mine = [r for r in reqs if r["program_id"] == p.id]
        for prev, nxt, call in zip(mine, mine[1:], p.calls[1:]):
            assert nxt["start"] - (prev["start"] + prev["latency"]) >= call.pause_s - 0.005
    bodies = fake.bodies[start:]
    assert all(b["messages"][0]["role"] == "system" for b in bodies)
    assert len({b["messages"][0]["content"] for b in bodies}) == 1  # shared within the run
    assert max(len(b["messages"]) for b in bodies) == 1 + 5


@pytest.mark.timing
def test_poisson_arrivals():
    assert arrival_offsets(3, INF, 0) == [0, 0, 0]
    offs = arrival_offsets(2000, 10.0, seed=4)
    assert offs == arrival_offsets(2000, 10.0, seed=4) and offs[0] == 0
    gaps = [b - a for a, b in zip(offs, offs[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)
    with pytest.raises(ValueError):
        arrival_offsets(2, 0, 0)


@pytest.mark.timing
def test_request_rate_spaces_the_starts(fake):
    progs = w.random_programs(TOK, 4, 8, 2, seed=0)
    (summary,) = run(fake, progs, [(None, 8.0)], warmup=0)
    starts = [r["start"] for r in summary["requests"]]
    for s, o in zip(starts, arrival_offsets(4, 8.0, 0)):
        assert s == pytest.approx(o, abs=0.04)
    assert summary["request_rate"] == 8.0


def test_errors_are_recorded_and_end_the_program(fake):
    progs = w.multiturn_programs(TOK, 2, max_turns=2, min_turns=2, records=records(4, turns=2))
    client = StreamingClient(fake.url, "bad", "chat")
    (summary,) = asyncio.run(bench(client, progs, [(2, INF)], warmup_calls=0, progress=False))
    m = summary["metrics"]
    assert m["completed"] == 0 and m["failed"] == 4
    errors = [r["error"] for r in summary["requests"]]
    assert errors.count("not sent: an earlier call of the program failed") == 2
    assert all(e.startswith("HTTP 404") for e in errors if not e.startswith("not sent"))
    with pytest.raises(RuntimeError, match="warm-up"):
        asyncio.run(bench(StreamingClient(fake.url, "bad"), progs, [(1, INF)], progress=False))


def test_cli_serve_compare_roofline(fake, tmp_path, capsys):
    from metroline.cli import main

    out = str(tmp_path / "a.json")
    base = ["bench", "serve", "--base-url", fake.url + "/v1", "--dataset", "random",
            "--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "4",
            "--disable-tqdm", "--goodput", "ttft:1000", "tpot:500", "--price-per-hour", "2"]
    assert main(base + ["--max-concurrency", "1,3", "--output", out, "--label", "A"]) == 0
    res = load_result(out)
    assert res["model"] == "fake-model" and res["endpoint"] == "completions"
    assert [r["max_concurrency"] for r in res["runs"]] == [1, 3]
    assert res["runs"][0]["metrics"]["goodput"]["fraction"] == 1.0
    assert res["runs"][0]["cost"]["usd_per_m_output_tokens"] > 0
    assert len(res["machine"]["load_avg_at_start"]) == 3
    for suffix in ("_cdf.png", "_sweep.png"):
        assert os.path.getsize(str(tmp_path / f"a{suffix}")) > 1000
    out_b = str(tmp_path / "b.json")
    assert main(base + ["--max-concurrency", "1,3", "--output", out_b, "--label", "B", "--no-plots"]) == 0
    capsys.readouterr()

    png, table = str(tmp_path / "cmp.png"), str(tmp_path / "cmp.json")
    assert main(["bench", "compare", out, out_b, "--output", png, "--json", table]) == 0
    text = capsys.readouterr().out
    assert "output tok/s" in text and "B/A" in text
    cmp = json.load(open(table))
    assert cmp["labels"] == ["A", "B"]
    assert all(r["ratios"][0] == 1.0 for r in cmp["rows"] if r["values"][0])
    assert os.path.getsize(png) > 1000

    assert main(["bench", "roofline", "--bandwidth-gbs", "20", "--flops-gflops", "100",
                 "--weight-format", "fp32,q4_1", "--result", out, "--price-per-hour", "2",
                 "--output", str(tmp_path / "roof.json")]) == 0
    roof = json.load(open(tmp_path / "roof.json"))
    assert [c["weight_format"] for c in roof["ceilings"]] == ["fp32", "q4_1"]
    fractions = [r for r in roof["results"] if "fraction" in r]
    assert len(fractions) == 4 and all(r["fraction"] > 0 for r in fractions)
    assert len(roof["load"]["start"]["load_avg"]) == 3
    assert os.path.getsize(str(tmp_path / "roof.png")) > 1000  # the plot next to the JSON

    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--dataset", "random",
                 "--num-prompts", "1", "--output", str(tmp_path / "x.json")]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(base + ["--goodput", "ttft"]) == 2


def test_cli_serve_without_matplotlib_writes_the_json(fake, tmp_path, capsys, monkeypatch):
    import sys

    from metroline.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = str(tmp_path / "m.json")
    assert main(["bench", "serve", "--base-url", fake.url, "--dataset", "random", "--num-prompts", "2",
                 "--random-input-len", "4", "--random-output-len", "2", "--max-concurrency", "1,2",
                 "--disable-tqdm", "--output", out]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if "matplotlib" in ln] == [
        "warning: no plots: metroline bench serve needs matplotlib: pip install 'metroline[bench]' "
        "(the JSON is written)"]  # once, though two plots were due
    assert len(load_result(out)["runs"]) == 2
    assert not any(f.endswith(".png") for f in os.listdir(tmp_path))
