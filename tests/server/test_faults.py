"""Fault injection (metroline.faults) under load (issue 16): a step, a kernel, a detokenizer
or a tool that raises or stalls fails only the requests in it, with a clear error; the engine
lives on, no KV block leaks (every test ends with the engines idle and their KV empty: see
conftest), the prefix cache holds no block whose KV was not written (the same prompts give
the same greedy tokens afterwards), and /health tells the truth meanwhile."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time

import pytest

from metroline import faults
from metroline.agents import AgentRuntime, MemoryRunStore, ScriptedModel
from metroline.agents.tools import builtin_tools
from metroline.engine.request import RequestHints, SamplingParams

from .conftest import wait_idle

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(autouse=True)
def _disarm():
    faults.clear()
    yield
    faults.clear()


def prompts(tok, n):
    return [tok.encode(f"Story {i}: once upon a time, in a land far away, there lived a") for i in range(n)]


async def collect(engine, prompt, rid, max_tokens=12):
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids, error = [], None
    async for out in engine.generate(prompt, sp, request_id=rid):
        ids += out.outputs[0].token_ids if out.outputs else []
        error = out.error or error
    return ids, error


def run_all(engine, items, max_tokens=12):
    async def main():
        return await asyncio.wait_for(asyncio.gather(*(collect(engine, p, rid, max_tokens) for rid, p in items)), 120)
    return asyncio.run(main())


def test_fault_points_are_validated_and_parsed():
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.inject("nowhere")
    assert faults.parse_spec("step:after=3:times=1, tool:stall_s=2:match=search:raise=0") == [
        {"point": "step", "after": 3, "times": 1},
        {"point": "tool", "stall_s": 2.0, "match": "search", "raise_": False}]
    with faults.injected("tool", times=None) as f:
        assert faults.ACTIVE
        for _ in range(3):
            with pytest.raises(faults.InjectedFault):
                faults.hit("tool", "x")
        assert f.fired == 3
    assert not faults.ACTIVE
    faults.hit("tool")  # disarmed: nothing


@pytest.mark.parametrize("point", ["step", "kernel"])
def test_a_failing_step_fails_its_requests_alone_and_the_engine_goes_on(engine, tok, point):
    items = [(f"{point}-ref-{i}", p) for i, p in enumerate(prompts(tok, 4))]
    ref = run_all(engine, items)
    assert all(err is None and len(ids) == 12 for ids, err in ref)
    # Mid-generation (after some decode steps) one step raises.
    with faults.injected(point, after=6, times=1) as f:
        got = run_all(engine, [(f"{point}-a-{i}", p) for i, p in enumerate(prompts(tok, 4))])
    assert f.fired == 1
    failed = [(ids, err) for ids, err in got if err is not None]
    assert failed, got
    for ids, err in failed:
        assert "InjectedFault" in err and f"injected fault at {point}" in err
    for (ids, err), (ref_ids, _) in zip(got, ref):
        if err is None:
            assert ids == ref_ids  # a request outside the failed step is untouched
        else:
            assert ids == ref_ids[:len(ids)]  # what it got before the failure was right
    stats = wait_idle(engine)
    assert stats.kv_cache_usage == 0.0
    # The prefix cache kept only blocks whose KV was written: the same prompts, the same tokens.
    again = run_all(engine, [(f"{point}-b-{i}", p) for i, p in enumerate(prompts(tok, 4))])
    assert [ids for ids, _ in again] == [ids for ids, _ in ref]


def test_a_fault_in_a_prefill_chunk_leaves_the_cached_chunks_valid(tiny_engine, tok):
    """The tiny engine prefills 16 tokens a step: a step failing in the middle of a long
    prompt's prefill fails it; the chunks cached before it are valid: the rerun, which hits
    them, gives the tokens of a run that computed everything (a salt nobody else uses)."""
    prompt = tok.encode("The history of the city begins with a small fishing village on the river, "
                        "where traders from the north met merchants from the south every spring to "
                        "exchange salt, furs, amber and wine. Over the centuries the village grew into "
                        "a market town with walls, a cathedral, a university and a harbour for ships")
    assert len(prompt) > 48, len(prompt)

    async def gen(rid, salt=None):
        sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        ids, error, cached = [], None, 0
        async for out in tiny_engine.generate(prompt, sp, request_id=rid, hints=RequestHints(cache_salt=salt)):
            ids += out.outputs[0].token_ids if out.outputs else []
            error, cached = out.error or error, out.num_cached_tokens
        return ids, error, cached

    def once(rid, salt=None):
        return asyncio.run(asyncio.wait_for(gen(rid, salt), 60))

    ref, err, _ = once("chunk-ref", salt=f"fresh-{time.time()}")
    assert err is None and len(ref) == 6
    with faults.injected("step", after=2, times=1) as f:  # the third chunk's step raises
        ids, err, _ = once("chunk-a")
    assert f.fired == 1 and err is not None and "InjectedFault" in err and ids == []
    ids, err, cached = once("chunk-b")
    assert err is None and cached >= 32, cached  # it reused the two chunks computed before the fault
    assert ids == ref


def test_a_failing_detokenizer_fails_only_its_request(engine, tok):
    items = [(f"detok-{i}", p) for i, p in enumerate(prompts(tok, 3))]
    ref = run_all(engine, [(f"detok-ref-{i}", p) for i, p in enumerate(prompts(tok, 3))])
    with faults.injected("detokenize", match="detok-1", after=3, times=1) as f:
        got = run_all(engine, items)
    assert f.fired == 1
    assert got[0] == (ref[0][0], None) and got[2] == (ref[2][0], None)
    ids, err = got[1]
    assert err is not None and "InjectedFault" in err and ids == ref[1][0][:len(ids)]
    assert wait_idle(engine).kv_cache_usage == 0.0


def test_a_step_fault_over_http_is_a_clear_error_and_health_tells_the_truth(server, client):
    with server.http() as http:
        with faults.injected("step", times=1):
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert "InjectedFault" in err["message"] and err["type"] != "invalid_request_error"
        # Streams: the error arrives as an event, then the stream ends.
        with faults.injected("step", after=3, times=1):
            with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 20,
                                                               "stream": True, "ignore_eos": True}) as s:
                lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        events = [json.loads(ln[6:]) for ln in lines if ln != "data: [DONE]"]
        assert any("error" in e for e in events), events
        # A stalled step: /health answers at once, and truthfully (the engine is alive).
        with faults.injected("step", stall_s=1.5, raise_=False):
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                slow = pool.submit(client.completions.create, model=MODEL, prompt="Hi", max_tokens=2)
                time.sleep(0.3)
                t0 = time.monotonic()
                h = http.get("/health")
                assert h.status_code == 200 and time.monotonic() - t0 < 1.0
                assert slow.result(timeout=60).choices[0].text is not None
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_a_failing_or_stalling_tool_is_an_observation_not_a_crash():
    store = MemoryRunStore()
    tools = builtin_tools()
    tools["clock"].timeout_s = 0.5
    model = ScriptedModel([{"tool": "calculator", "arguments": {"expression": "1+1"}},
                           {"tool": "clock", "arguments": {}}, "done"])

    async def go():
        rt = AgentRuntime(model, tools, store)
        with faults.injected("tool", match="calculator"), \
                faults.injected("tool", match="clock", stall_s=2.0, raise_=False):
            return await asyncio.wait_for(rt.run("t", tools=["calculator", "clock"]), 30)

    res = asyncio.run(go())
    assert res.status == "completed" and res.output == "done"
    done = [e for e in res.events if e["kind"] == "tool_finished"]
    assert [(e["name"], e["ok"], e["error"]) for e in done] == [("calculator", False, "exception"),
                                                                ("clock", False, "timeout")]
    assert "InjectedFault" in done[0]["content"]
