"""AsyncEngine over the real default model: streaming, concurrency, abort, errors, death, shutdown.

Every test builds its own small engine (a few dozen KV blocks over the session's
`default_loaded`) and the `engines` fixture shuts each one down, so no loop thread outlives
its test. Coroutines run under `asyncio.run` (no pytest-asyncio), each with a timeout so that a
hang fails the test instead of the suite.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from metroline.config import CacheConfig, SchedulerConfig
from metroline.engine.async_engine import AsyncEngine, EngineDeadError
from metroline.engine.core import EngineCore
from metroline.engine.llm import accumulate
from metroline.engine.request import SamplingParams
from metroline.errors import InvalidRequestError

BS = 16
PROMPT = "The capital of France is"
TIMEOUT = 30.0


def greedy(max_tokens=4, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture
def engines(default_loaded):
    """Factory of AsyncEngines with small pools; all are shut down (and checked) at teardown."""
    made: list[AsyncEngine] = []

    def make(num_blocks=32, max_model_len=None, max_num_seqs=8) -> AsyncEngine:
        core = EngineCore(default_loaded, CacheConfig(num_blocks=num_blocks, block_size=BS),
                          SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=max_num_seqs,
                                          max_model_len=max_model_len))
        eng = AsyncEngine(core, idle_wait_s=0.01)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.shutdown(timeout=10)
    for eng in made:
        assert not eng._thread.is_alive(), "an engine loop thread survived shutdown"


@pytest.fixture
def tok(default_loaded):
    return default_loaded.tokenizer


def llm_generate(llm, prompt, params):
    """LLM.generate on one intra-op thread: on a small shared CPU the default thread pool of
    the main thread oversubscribes the cores and runs ~10x slower (engine threads don't)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return llm.generate(prompt, params, use_tqdm=False)
    finally:
        torch.set_num_threads(n)


def run(coro, timeout=TIMEOUT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(engine, prompt_ids, params, request_id=None):
    deltas = []
    async for out in engine.generate(prompt_ids, params, request_id=request_id):
        deltas.append(out)
    return deltas


def wait_until(cond, timeout=5.0, interval=0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def all_free(engine) -> bool:
    kv = engine.core.kv_manager
    return kv.num_free_blocks == kv.num_total_blocks and not engine.core.has_unfinished_requests()


# ----------------------------------------------------------------------------- streaming

def test_stream_deltas_join_to_llm_generate_result(engines, default_llm, tok):
    params = greedy(max_tokens=8)
    ref = llm_generate(default_llm, PROMPT, params)[0].outputs[0]
    engine = engines()
    deltas = run(collect(engine, tok.encode(PROMPT), params, request_id="stream"))

    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert all(d.request_id == "stream" for d in deltas)
    assert len(deltas) >= 2  # it really streamed
    assert "".join(d.outputs[0].text for d in deltas) == ref.text
    assert sum((d.outputs[0].token_ids for d in deltas), []) == ref.token_ids
    assert len(ref.token_ids) == 8
    assert deltas[-1].outputs[0].finish_reason == ref.finish_reason == "length"
    assert all(d.outputs[0].finish_reason is None for d in deltas[:-1])
    folded = None
    for d in deltas:
        folded = accumulate(folded, d)
    assert folded.outputs[0].text == ref.text and folded.finished
    assert wait_until(lambda: all_free(engine)) and engine.num_requests() == 0


def test_concurrent_requests_all_complete(engines, tok):
    engine = engines()
    prompts = ["Hello, my name is", "The sky is", "1, 2, 3, 4,", PROMPT]
    params = [greedy(3), greedy(5, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=7, max_tokens=4, ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=3, ignore_eos=True)]

    async def main():
        return await asyncio.gather(*[collect(engine, tok.encode(p), sp)
                                      for p, sp in zip(prompts, params)])

    results = run(main())
    for deltas, sp in zip(results, params):
        final = None
        for d in deltas:
            final = accumulate(final, d)
        assert final.finished and final.error is None
        assert [o.index for o in final.outputs] == list(range(sp.n))
        for o in final.outputs:
            assert 1 <= len(o.token_ids) <= sp.max_tokens
            assert o.finish_reason in ("length", "stop")
            if sp.ignore_eos:
                assert len(o.token_ids) == sp.max_tokens and o.finish_reason == "length"
    assert len({d[0].request_id for d in results}) == len(prompts)
    assert wait_until(lambda: all_free(engine)) and engine.num_requests() == 0


# ------------------------------------------------------------------------------- aborts

@pytest.mark.parametrize("how", ["break", "aclose", "cancel"])
def test_abort_mid_decode_frees_blocks_while_other_request_completes(engines, tok, how):
    engine = engines(num_blocks=32)
    kv = engine.core.kv_manager
    long_prompt = tok.encode("Once upon a time, in a land far away, there lived a king who")
    victim_state = {}

    async def victim():
        params = greedy(max_tokens=100, ignore_eos=True)
        n_tokens = 0
        if how == "break":
            async for out in engine.generate(long_prompt, params, request_id="victim"):
                n_tokens += len(out.outputs[0].token_ids)
                victim_state["blocks"] = len(kv.get_block_ids("victim"))
                if n_tokens >= 2:
                    break
        elif how == "aclose":
            agen = engine.generate(long_prompt, params, request_id="victim")
            async for out in agen:
                n_tokens += len(out.outputs[0].token_ids)
                victim_state["blocks"] = len(kv.get_block_ids("victim"))
                if n_tokens >= 2:
                    await agen.aclose()
                    break
        else:
            got_two = asyncio.Event()

            async def consume():
                nonlocal n_tokens
                async for out in engine.generate(long_prompt, params, request_id="victim"):
                    n_tokens += len(out.outputs[0].token_ids)
                    victim_state["blocks"] = len(kv.get_block_ids("victim"))
                    if n_tokens >= 2:
                        got_two.set()

            task = asyncio.create_task(consume())
            await got_two.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        victim_state["tokens"] = n_tokens
        # Freed promptly: poll without blocking the event loop (the survivor keeps streaming).
        deadline = time.monotonic() + 5.0
        while kv.get_block_ids("victim") or "victim" in engine.core.groups:
            assert time.monotonic() < deadline, "the aborted request still holds its blocks"
            await asyncio.sleep(0.01)
        victim_state["freed_at"] = time.monotonic()

    async def survivor():
        return await collect(engine, tok.encode(PROMPT), greedy(max_tokens=8, ignore_eos=True),
                             request_id="survivor")

    async def main():
        s = asyncio.create_task(survivor())
        await asyncio.sleep(0)  # the survivor is submitted first
        await victim()
        return await s

    deltas = run(main())
    assert victim_state["tokens"] < 10 and victim_state["blocks"] >= 1
    final = None
    for d in deltas:
        final = accumulate(final, d)
    assert final.finished and final.error is None
    assert len(final.outputs[0].token_ids) == 8 and final.outputs[0].finish_reason == "length"
    assert wait_until(lambda: all_free(engine)) and engine.num_requests() == 0
    assert engine.is_alive


def test_cancel_during_submission_keeps_engine_alive(engines, tok, monkeypatch):
    """A task cancelled while its add is in flight: never added, or added then aborted."""
    engine = engines()
    real_add = engine.core.add_request

    def slow_add(*a, **kw):
        time.sleep(0.3)
        return real_add(*a, **kw)

    monkeypatch.setattr(engine.core, "add_request", slow_add)
    ids = tok.encode(PROMPT)

    async def main():
        # "running": its add is being applied when cancelled; "queued": still waiting for it.
        t1 = asyncio.create_task(collect(engine, ids, greedy(50, ignore_eos=True), "running"))
        await asyncio.sleep(0.05)
        t2 = asyncio.create_task(collect(engine, ids, greedy(50, ignore_eos=True), "queued"))
        await asyncio.sleep(0.05)
        t1.cancel()
        t2.cancel()
        for t in (t1, t2):
            with pytest.raises(asyncio.CancelledError):
                await t

    run(main())
    assert wait_until(lambda: all_free(engine) and engine.core.scheduler.get_request("running")
                      is None)
    assert engine.is_alive
    monkeypatch.setattr(engine.core, "add_request", real_add)
    deltas = run(collect(engine, ids, greedy(2)))
    assert deltas[-1].finished and engine.is_alive


def test_consumer_loop_closed_without_closing_stream(engines, tok):
    """A caller's event loop that closes mid-stream must not take the engine with it."""
    engine = engines()
    loop = asyncio.new_event_loop()
    agen = engine.generate(tok.encode(PROMPT), greedy(100, ignore_eos=True), request_id="orphan")
    first = loop.run_until_complete(asyncio.wait_for(agen.__anext__(), TIMEOUT))
    assert not first.finished
    loop.close()  # no shutdown_asyncgens: the stream is never closed by its owner
    try:
        assert wait_until(lambda: all_free(engine), timeout=10)
        assert engine.is_alive
        deltas = run(collect(engine, tok.encode(PROMPT), greedy(2)))
        assert deltas[-1].finished
    finally:
        asyncio.run(agen.aclose())  # finalize it here, not in the garbage collector


# ------------------------------------------------------------------------------ errors

BAD_PARAMS = [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(logit_bias={10**7: 1.0}), "logit_bias"),
    (dict(stop_token_ids=[10**7]), "stop_token_ids"),
]


def test_invalid_params_raise_at_submission_and_engine_keeps_serving(engines, tok):
    engine = engines()
    ids = tok.encode(PROMPT)

    async def main():
        for kw, param in BAD_PARAMS:
            agen = engine.generate(ids, SamplingParams(**kw))
            with pytest.raises(InvalidRequestError) as ei:
                await agen.__anext__()  # raised at submission, before any output
            assert ei.value.param == param, kw
            assert engine.is_alive and engine.num_requests() == 0

    run(main())
    assert not engine.core.has_unfinished_requests()
    deltas = run(collect(engine, ids, greedy(2)))
    assert deltas[-1].finished and deltas[-1].error is None


def test_invalid_prompts_and_duplicate_ids(engines, tok, default_loaded):
    engine = engines()
    vocab = default_loaded.config.vocab_size
    ids = tok.encode(PROMPT)
    for prompt in ([], [vocab], [-1, 5]):
        with pytest.raises(InvalidRequestError) as ei:
            run(collect(engine, prompt, greedy(2)))
        assert ei.value.param == "prompt"

    async def dup():
        agen = engine.generate(ids, greedy(6, ignore_eos=True), request_id="dup")
        first = await agen.__anext__()
        with pytest.raises(InvalidRequestError) as ei:
            await collect(engine, ids, greedy(2), request_id="dup")
        assert ei.value.param == "request_id"
        # The rejected duplicate did not disturb the original, which goes on streaming.
        rest = [first] + [out async for out in agen]
        return rest

    deltas = run(dup())
    assert deltas[-1].finished and sum(len(d.outputs[0].token_ids) for d in deltas) == 6
    assert engine.is_alive and wait_until(lambda: all_free(engine))


def test_context_length_exceeded(engines, tok):
    engine = engines(num_blocks=32, max_model_len=64)
    assert engine.core.max_model_len == 64
    with pytest.raises(InvalidRequestError) as ei:
        run(collect(engine, [tok.encode("hi")[0]] * 80, greedy(2)))
    assert ei.value.code == "context_length_exceeded" and ei.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as ei:
        run(collect(engine, [tok.encode("hi")[0]] * 64, greedy(2)))
    assert ei.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError) as ei:
        run(collect(engine, [tok.encode("hi")[0]] * 40, greedy(30)))
    assert ei.value.code == "context_length_exceeded" and ei.value.param == "max_tokens"
    assert engine.is_alive and engine.num_requests() == 0
    # max_tokens=None: up to the context length.
    deltas = run(collect(engine, [tok.encode("hi")[0]] * 61,
                         SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)))
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"
    assert sum(len(d.outputs[0].token_ids) for d in deltas) == 3


# --------------------------------------------------------------------- death & shutdown

def test_engine_death_fails_streams_and_marks_dead(engines, tok, monkeypatch):
    engine = engines()
    ids = tok.encode(PROMPT)

    def boom():
        raise RuntimeError("boom")

    async def main():
        agen = engine.generate(ids, greedy(50, ignore_eos=True))
        first = await agen.__anext__()
        assert not first.finished
        other = asyncio.create_task(collect(engine, ids, greedy(50, ignore_eos=True)))
        await asyncio.sleep(0)
        monkeypatch.setattr(engine.core, "step", boom)
        with pytest.raises(EngineDeadError, match="boom"):
            async for _ in agen:
                pass
        with pytest.raises(EngineDeadError):
            await other

    run(main())
    engine._thread.join(5)
    assert not engine._thread.is_alive()
    assert not engine.is_alive
    assert isinstance(engine.dead_error, RuntimeError)
    with pytest.raises(EngineDeadError):
        run(collect(engine, ids, greedy(2)))


def test_shutdown_stops_thread_and_fails_open_streams(engines, tok):
    engine = engines()
    ids = tok.encode(PROMPT)
    assert engine.is_alive

    async def main():
        agen = engine.generate(ids, greedy(100, ignore_eos=True))
        first = await agen.__anext__()
        assert not first.finished
        engine.shutdown(timeout=10)
        with pytest.raises(EngineDeadError):
            async for _ in agen:
                pass

    run(main(), timeout=20)
    assert not engine._thread.is_alive() and not engine.is_alive
    assert all_free(engine)  # what was running at shutdown was aborted
    with pytest.raises(EngineDeadError):
        run(collect(engine, ids, greedy(2)))
    engine.shutdown()  # idempotent


@pytest.mark.timing
def test_idle_shutdown_is_prompt(engines):
    engine = engines()
    t = time.monotonic()
    engine.shutdown()
    assert time.monotonic() - t < 2.0
    assert not engine._thread.is_alive() and not engine.is_alive
    assert engine._thread not in threading.enumerate()
