"""Prefix caching on the real model: reuse must never change what is generated."""

from __future__ import annotations

from metroline.config import CacheConfig, SchedulerConfig
from metroline.engine.core import EngineCore
from metroline.engine.llm import accumulate
from metroline.engine.request import RequestHints, SamplingParams


def _engine(loaded, caching=True, num_blocks=256, **cache):
    return EngineCore(loaded, CacheConfig(num_blocks=num_blocks, enable_prefix_caching=caching, **cache),
                      SchedulerConfig(max_num_batched_tokens=256))


def _generate(core, rid, ids, params, **hints):
    core.add_request(rid, ids, params, RequestHints(**hints))
    final = None
    while core.has_unfinished_requests():
        for out in core.step():
            final = accumulate(final, out) if out.request_id == rid else final
    return final


def _conversation(core, tok, turns, **hints):
    messages, replies, cached = [], [], []
    for i, user in enumerate(turns):
        messages.append({"role": "user", "content": user})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        out = _generate(core, f"turn{i}", ids, SamplingParams(temperature=0, max_tokens=12), **hints)
        replies.append(out.outputs[0].token_ids)
        cached.append(out.num_cached_tokens)
        messages.append({"role": "assistant", "content": out.outputs[0].text})
    return replies, cached


TURNS = ["Hi! Can you help me plan a trip to Lisbon?", "What should I eat there?",
         "And which museums are worth it?", "Thanks. Summarise the plan in one sentence."]


def test_multiturn_identical_with_and_without_caching(default_loaded):
    tok = default_loaded.tokenizer
    off, cached_off = _conversation(_engine(default_loaded, caching=False), tok, TURNS)
    core = _engine(default_loaded, caching=True)
    on, cached_on = _conversation(core, tok, TURNS, session_id="s1", kv_retention_s=60)
    assert on == off
    assert cached_off == [0, 0, 0, 0]
    assert cached_on[0] == 0 and all(c >= 32 for c in cached_on[1:])  # the history was reused
    assert core.kv_manager.prefix_cache_hits > 0
    assert core.release_session("s1") and core.kv_manager.num_free_blocks == core.num_blocks


def test_n_samples_identical_with_and_without_caching(default_loaded):
    tok = default_loaded.tokenizer
    ids = tok.encode("Three ideas for a birthday party: " * 4)
    params = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=10, ignore_eos=True)
    on = _generate(_engine(default_loaded, caching=True), "g", ids, params)
    off = _generate(_engine(default_loaded, caching=False), "g", ids, params)
    assert [o.token_ids for o in on.outputs] == [o.token_ids for o in off.outputs]
    assert on.num_cached_tokens > 0 and off.num_cached_tokens == 0


def test_host_tier_restores_evicted_prefix(default_loaded):
    tok = default_loaded.tokenizer
    # 12 blocks on the "device", room for 64 more in host memory (forced on, on the CPU).
    core = _engine(default_loaded, num_blocks=12, host_kv_cache_memory=64 * 16 * 46080)
    assert core.host_tier is not None
    ids = tok.encode("The history of the printing press begins in " * 16)[:100]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = _generate(core, "a", ids, params).outputs[0].token_ids
    filler = tok.encode("Completely different text about oceans and whales. " * 30)[:150]
    assert len(ids) == 100 and len(filler) == 150
    # a held blocks 0-6; the filler's 10 blocks take the 5 unused ones, then a's from its tail.
    _generate(core, "filler", filler, params)
    assert core.host_tier.num_offloaded == 4
    again = _generate(core, "a2", ids, params)
    # Blocks 0-1 are still on the device; 2-5 come back from host memory: 96 tokens not recomputed.
    assert core.host_tier.num_restored == 4 and again.num_cached_tokens == 96
    assert again.outputs[0].token_ids == first
    assert core.kv_manager.num_free_blocks == core.num_blocks
