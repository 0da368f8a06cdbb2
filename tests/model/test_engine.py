"""The engine core on the real model: continuous batching must not change what is generated."""

from __future__ import annotations

import itertools

import pytest

from metroline.config import CacheConfig, SchedulerConfig
from metroline.engine.core import EngineCore
from metroline.engine.llm import accumulate
from metroline.engine.request import SamplingParams


def _engine(loaded, num_blocks=512, **sched) -> EngineCore:
    return EngineCore(loaded, CacheConfig(num_blocks=num_blocks, block_size=16),
                      SchedulerConfig(**sched))


def _run(core: EngineCore, arrivals: dict[int, list[tuple]]) -> dict:
    """Drive the step loop; `arrivals[step]` = [(id, prompt_ids, params)] added before that step."""
    results: dict = {}
    for step in itertools.count():
        for rid, ids, params in arrivals.get(step, []):
            core.add_request(rid, ids, params)
        if step > max(arrivals) and not core.has_unfinished_requests():
            break
        for out in core.step():
            results[out.request_id] = accumulate(results.get(out.request_id), out)
        assert step < 5000, "engine did not finish"
    return results


def _assert_pool_empty(core: EngineCore) -> None:
    assert core.kv_manager.num_free_blocks == core.num_blocks
    assert not core.scheduler.has_unfinished_requests()
    assert not core.groups


def test_batched_equals_solo_with_preemption_and_chunked_prefill(default_loaded, sharegpt_prompts):
    """16 ShareGPT prompts (4..400 tokens) arriving over time, through preemption and chunked
    prefill: each generates exactly what it generates alone."""
    prompts = sharegpt_prompts[:16]
    greedy = [SamplingParams(temperature=0, max_tokens=4 + (i % 4) * 3, ignore_eos=True)
              for i in range(16)]
    solo_core = _engine(default_loaded, num_blocks=64)
    solo = {}
    for i, (ids, p) in enumerate(zip(prompts, greedy)):
        solo.update(_run(solo_core, {0: [(f"r{i}", ids, p)]}))
    _assert_pool_empty(solo_core)

    # A pool of 40 blocks (640 tokens) cannot hold the running set, and a step budget of 96
    # tokens splits every long prompt: both preemption and chunked prefill must happen.
    core = _engine(default_loaded, num_blocks=40, max_num_batched_tokens=96, max_num_seqs=16)
    arrivals: dict[int, list] = {}
    for i, (ids, p) in enumerate(zip(prompts, greedy)):
        arrivals.setdefault((i // 3) * 2, []).append((f"r{i}", ids, p))
    batched = _run(core, arrivals)
    assert core.scheduler.num_preemptions > 0
    assert core.scheduler.num_prefill_chunks > 0
    for i in range(16):
        b, s = batched[f"r{i}"].outputs[0], solo[f"r{i}"].outputs[0]
        assert b.token_ids == s.token_ids, f"request {i} diverged"
        assert b.text == s.text
        assert b.finish_reason == "length"
    _assert_pool_empty(core)


def test_abort_frees_blocks_and_others_continue(default_loaded):
    core = _engine(default_loaded, num_blocks=64)
    tok = default_loaded.tokenizer
    core.add_request("a", tok.encode("Tell me a long story about a dragon."),
                     SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    core.add_request("b", tok.encode("Count to ten:"), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for _ in range(4):
        core.step()
    assert core.kv_manager.num_free_blocks < core.num_blocks
    core.abort_request("a")
    assert core.kv_manager.get_block_ids("a") == []
    res = _run(core, {0: []})
    assert "a" not in res
    assert res["b"].finished and res["b"].outputs[0].finish_reason == "length"
    _assert_pool_empty(core)


def test_seeded_sampling_independent_of_batch(default_loaded):
    tok = default_loaded.tokenizer
    ids = tok.encode("Write a haiku about autumn.")
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = _run(_engine(default_loaded), {0: [("x", ids, seeded)]})["x"].outputs[0].token_ids
    others = [(f"o{i}", tok.encode(f"Story number {i}:"),
               SamplingParams(temperature=1.0, max_tokens=10 + i, ignore_eos=True)) for i in range(5)]
    crowd = _run(_engine(default_loaded), {0: others[:3], 1: [("x", ids, seeded)], 2: others[3:]})
    assert crowd["x"].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=16, ignore_eos=True)
    assert _run(_engine(default_loaded), {0: [("y", ids, other_seed)]})["y"].outputs[0].token_ids != alone


def test_stop_string_across_token_boundary(default_loaded):
    tok = default_loaded.tokenizer
    ids = tok.encode("The capital of France is")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = _run(_engine(default_loaded), {0: [("f", ids, params)]})["f"].outputs[0]
    pieces = [tok.decode([t]) for t in full.token_ids]
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) >= 2 and pieces[i].strip())
    stop = pieces[k - 1][-2:] + pieces[k][:2]
    prefix = "".join(pieces[:k - 1]) + pieces[k - 1][:-2]
    assert full.text.find(stop) == len(prefix)
    core = _engine(default_loaded)
    for include in (False, True):
        p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                           include_stop_str_in_output=include)
        core.add_request(f"s{include}", ids, p)
        deltas = []
        while core.has_unfinished_requests():
            deltas += [o for o in core.step() if o.request_id == f"s{include}"]
        text = "".join(d.outputs[0].text for d in deltas)
        assert text == prefix + (stop if include else "")
        assert deltas[-1].outputs[0].finish_reason == "stop"
        assert deltas[-1].outputs[0].stop_reason == stop
    _assert_pool_empty(core)


def test_n_samples_share_prompt_blocks(default_loaded):
    tok = default_loaded.tokenizer
    ids = tok.encode("A list of fruits: apple, banana, cherry, " * 6)
    assert len(ids) > 48
    core = _engine(default_loaded, num_blocks=64)
    core.add_request("g", ids, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))
    seen_shared = False
    results = {}
    while core.has_unfinished_requests():
        for out in core.step():
            results[out.request_id] = accumulate(results.get(out.request_id), out)
        tables = [core.kv_manager.get_block_ids(f"g#{i}") for i in range(3)]
        full = len(ids) // 16
        if all(len(t) >= full for t in tables):
            assert tables[0][:full] == tables[1][:full] == tables[2][:full]
            seen_shared = True
    assert seen_shared
    outs = results["g"].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    _assert_pool_empty(core)


def test_logprobs_and_finish_reasons(default_llm):
    out = default_llm.generate("Hello, my name is",
                               SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert len(out.logprobs) == 5
    for tok_id, lp, top in zip(out.token_ids, (x[1] for x in out.logprobs), (x[2] for x in out.logprobs)):
        assert len(top) == 3 and top[0][0] == tok_id and abs(top[0][1] - lp) < 1e-6
        assert top[0][1] >= top[1][1] >= top[2][1]
    chat = default_llm.chat([{"role": "user", "content": "Say hi."}],
                            SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert chat.finish_reason == "stop" and chat.stop_reason is None  # ended by EOS (<|im_end|>)


def test_rejects_prompt_that_can_never_fit(default_loaded):
    from metroline.errors import InvalidRequestError

    core = _engine(default_loaded, num_blocks=8)  # 128 tokens of KV
    with pytest.raises(InvalidRequestError) as e:
        core.add_request("big", list(range(100, 300)), SamplingParams(max_tokens=4))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError) as e:
        core.add_request("long", list(range(100, 200)), SamplingParams(max_tokens=100))
    assert e.value.code == "context_length_exceeded"
    _assert_pool_empty(core)


def test_failed_step_fails_its_requests_not_the_engine(default_loaded, monkeypatch):
    core = _engine(default_loaded, num_blocks=64)
    tok = default_loaded.tokenizer
    real = core.runner.execute
    calls = {"n": 0}

    def flaky(scheduled):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device fault")
        return real(scheduled)

    monkeypatch.setattr(core.runner, "execute", flaky)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    res = _run(core, {0: [("a", tok.encode("Hello there"), params)]})
    assert res["a"].finished and res["a"].outputs[0].finish_reason == "error"
    assert "simulated device fault" in res["a"].error
    _assert_pool_empty(core)
    res = _run(core, {0: [("b", tok.encode("Hello again"), params)]})
    assert res["b"].outputs[0].finish_reason == "length" and len(res["b"].outputs[0].token_ids) == 4
    _assert_pool_empty(core)


def test_failed_step_does_not_poison_the_prefix_cache(default_loaded, sharegpt_prompts, monkeypatch):
    """A forward that raises leaves none of its blocks findable: the same prompt again gets no
    cache hit and the clean engine's greedy output (regression: blocks used to be hashed at
    allocation, before the forward wrote them)."""
    prompt = sharegpt_prompts[6]  # 250 tokens: 15 full blocks
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    clean = _run(_engine(default_loaded), {0: [("ref", prompt, params)]})["ref"].outputs[0].token_ids
    core = _engine(default_loaded, max_num_batched_tokens=512)
    real, calls = core.runner.execute, {"n": 0}

    def fail_first(scheduled):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated fault in the prefill")
        return real(scheduled)

    monkeypatch.setattr(core.runner, "execute", fail_first)
    res = _run(core, {0: [("a", prompt, params)]})
    assert res["a"].outputs[0].finish_reason == "error"
    assert core.kv_manager.pool.num_cached_blocks == 0
    res = _run(core, {0: [("b", prompt, params)]})
    assert res["b"].num_cached_tokens == 0
    assert res["b"].outputs[0].token_ids == clean
    # Now the blocks were written: a third identical prompt hits them and agrees.
    res = _run(core, {0: [("c", prompt, params)]})
    assert res["c"].num_cached_tokens == 240 and res["c"].outputs[0].token_ids == clean
    _assert_pool_empty(core)


class _ScriptedProposer:
    """Drafts from a known continuation: right ones, wrong ones, or a mix, by request id."""

    def __init__(self, continuations: dict, mode: dict):
        self.continuations, self.mode, self.calls = continuations, mode, 0

    def propose(self, req, k):
        self.calls += 1
        ref = self.continuations[req.request_id]
        n = req.num_output_tokens
        right = ref[n:n + k]
        mode = self.mode[req.request_id]
        if mode == "right":
            return right
        if mode == "wrong":
            return [(t + 1) % 49152 for t in right]
        return [t if (n + i) % 3 else (t + 1) % 49152 for i, t in enumerate(right)]  # mixed


def test_speculative_drafts_verified_in_the_batch_change_nothing(default_loaded, sharegpt_prompts):
    """Requests that carry k drafts (q_len k+1 in the decode batch) beside ones that do not,
    with all, none or some drafts accepted: every output equals the non-speculative engine's,
    and KV is released exactly."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
    stop = SamplingParams(temperature=0, max_tokens=24, stop=[" the"], ignore_eos=True)
    jobs = [("right", sharegpt_prompts[3], greedy), ("wrong", sharegpt_prompts[4], greedy),
            ("mixed", sharegpt_prompts[5], greedy), ("plain", sharegpt_prompts[2], sampled),
            ("stop", sharegpt_prompts[1], stop)]
    ref = _run(_engine(default_loaded), {0: jobs})
    conts = {rid: ref[rid].outputs[0].token_ids for rid, _, _ in jobs}
    modes = {"right": "right", "wrong": "wrong", "mixed": "mixed", "plain": "right",
             "stop": "right"}
    proposer = _ScriptedProposer(conts, modes)
    core = EngineCore(default_loaded, CacheConfig(num_blocks=512, block_size=16),
                      SchedulerConfig(), proposer=proposer, num_speculative_tokens=4)
    res = _run(core, {0: jobs})
    for rid, _, _ in jobs:
        assert res[rid].outputs[0].token_ids == conts[rid], rid
        assert res[rid].outputs[0].text == ref[rid].outputs[0].text, rid
    stats = core.get_stats()
    assert stats.spec_draft_tokens > 0
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    _assert_pool_empty(core)
    # Alone, always-right drafts of 4 take a prefill and ~23 / 5 verification steps, not 24.
    core = EngineCore(default_loaded, CacheConfig(num_blocks=512, block_size=16),
                      SchedulerConfig(), proposer=proposer, num_speculative_tokens=4)
    res = _run(core, {0: [jobs[0]]})
    assert res["right"].outputs[0].token_ids == conts["right"]
    assert core.num_steps <= 7
    assert core.get_stats().spec_accepted_tokens == core.get_stats().spec_draft_tokens


def test_a_raising_logits_processor_fails_only_its_request(default_loaded):
    tok = default_loaded.tokenizer

    def boom(out_ids, row):
        if len(out_ids) == 2:
            raise ValueError("grammar state lost")
        return row

    ok = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    bad = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logits_processors=[boom])
    ids = tok.encode("The weather today is")
    core = _engine(default_loaded)
    res = _run(core, {0: [("ok", ids, ok), ("bad", ids, bad)]})
    assert res["bad"].outputs[0].finish_reason == "error" and "grammar state lost" in res["bad"].error
    assert len(res["bad"].outputs[0].token_ids) == 2
    assert res["ok"].outputs[0].finish_reason == "length" and len(res["ok"].outputs[0].token_ids) == 6
    _assert_pool_empty(core)


def test_speculative_drafts_with_a_grammar_and_min_tokens(default_loaded):
    """Grammar requests verify drafts too: the mask at each draft position is the grammar's
    after the drafts before it, and rejected drafts never reach the matcher. Right, wrong and
    mixed drafts give the non-speculative output, which is valid JSON; min_tokens counts
    drafts (EOS stays banned at every draft position before it)."""
    pytest.importorskip("llguidance")
    import json

    from metroline.structured import GrammarSpec, compile_grammar

    tok = default_loaded.tokenizer
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2}},
              "required": ["name", "tags"], "additionalProperties": False}
    grammar = compile_grammar(tok, GrammarSpec.json_schema(schema))
    ids = tok.encode("Describe a cat as JSON:")
    jobs = [(m, ids, SamplingParams(temperature=0, max_tokens=120, logits_processors=[grammar.processor()]))
            for m in ("right", "wrong", "mixed")]
    jobs.append(("min", tok.encode("Hi"), SamplingParams(temperature=0, max_tokens=20, min_tokens=12)))
    ref = _run(_engine(default_loaded), {0: jobs})
    conts = {rid: ref[rid].outputs[0].token_ids for rid, _, _ in jobs}
    # The min_tokens request's drafts: EOS everywhere, which min_tokens must refuse until 12.
    eos = sorted(tok.stop_token_ids)[0]
    proposer = _ScriptedProposer(conts, {"right": "right", "wrong": "wrong", "mixed": "mixed", "min": "right"})
    base = proposer.propose
    proposer.propose = lambda req, k: [eos] * k if req.request_id == "min" else base(req, k)
    core = EngineCore(default_loaded, CacheConfig(num_blocks=512, block_size=16),
                      SchedulerConfig(grammar_fast_forward=False), proposer=proposer, num_speculative_tokens=4)
    res = _run(core, {0: jobs})
    for rid, _, _ in jobs:
        assert res[rid].outputs[0].token_ids == conts[rid], rid
    for rid in ("right", "wrong", "mixed"):
        json.loads(res[rid].outputs[0].text)
    assert len(conts["min"]) >= 12
    stats = core.get_stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    _assert_pool_empty(core)
