"""The multi-token step contract, driven without a model: a request carries k drafts, the fake
runner accepts some of them, and Scheduler.update_from_output alone applies the result (tokens,
stops, KV rollback, prefix caching)."""

from __future__ import annotations

import pytest
import torch

from metroline.config import SchedulerConfig
from metroline.engine.output_text import OutputText
from metroline.engine.processors import LogitsProcessor
from metroline.engine.request import (ModelRunnerOutput, Request, RequestStatus, SampledTokens,
                                      SamplingParams)
from metroline.engine.sampler import Sampler
from metroline.engine.scheduler import Scheduler
from metroline.kv.kv_manager import KVCacheManager

BS = 16


class CharDetok:
    """Token t is the letter chr(ord('a') + t % 26)."""

    def step(self, ids):
        return "".join(chr(97 + t % 26) for t in ids)

    def flush(self):
        return ""


def make(num_blocks=20, budget=256):
    kv = KVCacheManager(num_blocks, BS)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget), kv, BS, 4096)


def decoding_request(s, rid="r", n_prompt=30, max_tokens=100, stop=(), **sp):
    """A request past its prefill (one output token known, not yet computed)."""
    params = SamplingParams(max_tokens=max_tokens, stop=list(stop), temperature=0.0, **sp)
    req = Request(rid, list(range(100, 100 + n_prompt)), params)
    req.output_text = OutputText(CharDetok(), params.stop, params.include_stop_str_in_output)
    s.add_request(req)
    while req.num_output_tokens == 0:
        out = s.schedule()
        s.update_from_output(out, ModelRunnerOutput.from_token_ids(
            {sr.request.request_id: [0] for sr in out.scheduled if sr.sample}))
    assert req.num_tokens == n_prompt + 1 and req.num_computed_tokens == n_prompt
    return req


def spec_step(s, req, drafts, accepted_tokens):
    req.spec_token_ids = list(drafts)
    out = s.schedule()
    (sr,) = out.scheduled
    assert sr.num_new_tokens == 1 + len(drafts) and sr.spec_token_ids == list(drafts)
    assert sr.num_logits == 1 + len(drafts)
    changed = s.update_from_output(out, ModelRunnerOutput({req.request_id: SampledTokens(accepted_tokens)}))
    return sr, changed


@pytest.mark.parametrize("num_accepted", [0, 1, 2, 3, 4])
def test_accept_0_to_k_of_k_drafts(num_accepted):
    s = make()
    req = decoding_request(s)
    start = req.num_tokens
    drafts = [1, 2, 3, 4]
    tokens = drafts[:num_accepted] + ([9] if num_accepted < 4 else [5])  # correction or bonus
    sr, changed = spec_step(s, req, drafts, tokens)
    assert changed == [req]
    assert req.output_token_ids == [0] + tokens
    # Positions computed: the last known token and the accepted drafts; the rest rolled back.
    assert req.num_computed_tokens == start + num_accepted
    assert req.num_tokens == req.num_computed_tokens + 1
    assert req.spec_token_ids == []
    assert s.num_spec_draft_tokens == 4 and s.num_spec_accepted_tokens == num_accepted
    # Exactly the blocks the computed slots (+ the next token) need are held.
    assert len(s.kv.get_block_ids("r")) == -(-req.num_computed_tokens // BS)


def test_rollback_frees_exactly_the_draft_blocks():
    s = make(num_blocks=6)
    req = decoding_request(s, n_prompt=31)  # 31 computed; token 32 known -> fills block 1
    free_before = s.kv.num_free_blocks
    drafts = list(range(1, 17))  # 1 + 16 positions: slots 31..47 -> blocks 1 and 2
    req.spec_token_ids = drafts
    out = s.schedule()
    assert len(s.kv.get_block_ids("r")) == 3 and s.kv.num_free_blocks == free_before - 1
    s.update_from_output(out, ModelRunnerOutput({"r": SampledTokens([7])}))  # all rejected
    assert req.num_computed_tokens == 32 and req.output_token_ids == [0, 7]
    assert len(s.kv.get_block_ids("r")) == 2 and s.kv.num_free_blocks == free_before
    # Block 1 (tokens 16..31, all known and computed) is cached; the draft block never was.
    blocks = s.kv.req_blocks["r"]
    assert blocks[1].block_hash is not None
    assert s.kv.pool.num_cached_blocks == 2


def test_stop_string_inside_accepted_drafts_ends_there():
    s = make()
    req = decoding_request(s, stop=["cd"])
    # Drafts b c d e: "c" then "d" completes "cd" at the 3rd accepted token.
    sr, changed = spec_step(s, req, [1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason == "cd"
    assert req.output_token_ids == [0, 1, 2, 3]  # nothing after the stop
    assert req.output_text.text == "ab"
    assert s.kv.req_blocks == {} and s.kv.num_free_blocks == s.kv.num_total_blocks


def test_eos_and_stop_token_inside_drafts():
    s = make()
    req = decoding_request(s, stop_token_ids=[3])
    spec_step(s, req, [1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason == 3
    assert req.output_token_ids == [0, 1, 2, 3]


def test_max_tokens_reached_mid_draft():
    s = make()
    req = decoding_request(s, max_tokens=3)
    spec_step(s, req, [1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.output_token_ids == [0, 1, 2]
    assert s.kv.num_free_blocks == s.kv.num_total_blocks


def test_drafts_only_for_the_speculating_request_and_cut_to_the_budget():
    s = make(budget=6)
    a = decoding_request(s, "a", n_prompt=3)
    b = decoding_request(s, "b", n_prompt=3)
    a_out = list(a.output_token_ids)
    a.spec_token_ids = [1, 2, 3, 4, 5, 6, 7]
    out = s.schedule()
    got = {sr.request.request_id: (sr.num_new_tokens, sr.spec_token_ids) for sr in out.scheduled}
    # a comes first and takes the whole budget: 1 known + 5 of its 7 drafts; b waits its turn.
    assert got == {"a": (6, [1, 2, 3, 4, 5])}
    s.update_from_output(out, ModelRunnerOutput({"a": SampledTokens([1, 2, 9])}))
    assert a.output_token_ids == a_out + [1, 2, 9] and a.num_computed_tokens == a.num_tokens - 1
    assert b.output_token_ids == [0]
    out = s.schedule()
    got = {sr.request.request_id: (sr.num_new_tokens, sr.spec_token_ids) for sr in out.scheduled}
    assert got == {"a": (1, []), "b": (1, [])}


def test_preemption_drops_drafts():
    s = make(num_blocks=4)
    a = decoding_request(s, "a", n_prompt=31)
    a.spec_token_ids = list(range(1, 40))  # far more than the pool
    s._preempt(a)
    assert a.spec_token_ids == [] and a.num_computed_tokens == 0


def test_error_in_one_requests_output_fails_it_alone():
    s = make()
    a = decoding_request(s, "a")
    b = decoding_request(s, "b")
    out = s.schedule()
    res = ModelRunnerOutput({"a": SampledTokens([1], error="logits processor failed: boom"),
                             "b": SampledTokens([2])})
    changed = s.update_from_output(out, res)
    assert set(changed) == {a, b}
    assert a.status == RequestStatus.FINISHED_ERROR and "boom" in a.error
    assert b.status == RequestStatus.RUNNING and b.output_token_ids == [0, 2]
    assert "a" not in s.kv.req_blocks


class CountingProcessor(LogitsProcessor):
    def __init__(self):
        self.accepted = []

    def __call__(self, out_ids, row):
        return row

    def accept(self, token_ids):
        self.accepted += list(token_ids)

    def rollback(self, n):
        del self.accepted[len(self.accepted) - n:]


def test_processors_are_forked_per_sample_and_told_of_accepted_tokens():
    proc = CountingProcessor()
    params = SamplingParams(n=2, logits_processors=[proc], max_tokens=10)
    r0 = Request("g#0", [1, 2], params, sample_index=0, group_id="g")
    r1 = Request("g#1", [1, 2], params, sample_index=1, group_id="g")
    assert r0.logits_processors[0] is not r1.logits_processors[0]
    assert r0.logits_processors[0] is not proc
    s = make()
    s.add_request(r0)
    s.add_request(r1)
    for _ in range(2):  # sample 1 waits for sample 0's prompt, then shares its blocks
        out = s.schedule()
        s.update_from_output(out, ModelRunnerOutput.from_token_ids(
            {sr.request.request_id: [5 + sr.request.sample_index] for sr in out.scheduled}))
    assert r0.logits_processors[0].accepted == [5, 5] and r1.logits_processors[0].accepted == [6]
    assert proc.accepted == []


def test_a_raising_processor_fails_its_row_only():
    def boom(out_ids, row):
        raise RuntimeError("grammar exploded")

    reqs = [Request("ok", [1], SamplingParams(temperature=0.0)),
            Request("bad", [1], SamplingParams(temperature=0.0, logits_processors=[boom]))]
    res = Sampler(8)(torch.tensor([[0.0, 5, 0, 0, 0, 0, 0, 0]] * 2), reqs)
    assert res[0].error is None and res[0].token_id == 1
    assert "grammar exploded" in res[1].error
