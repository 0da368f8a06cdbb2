"""Iteration-level scheduler: schedule() -> run the model -> update_from_output().

Every step has one token budget (max_num_batched_tokens) shared by decodes and prefill
chunks. Running requests are served first, then waiting ones are admitted. When the KV pool
says no, the lowest-priority running request is preempted (its KV is dropped and recomputed
later).

As in vLLM v1, schedule() advances each scheduled request's num_computed_tokens by the tokens
it scheduled, before the model runs: the runner reads ScheduledRequest.start_pos instead.

The step contract is multi-token: a request in its decode phase may carry draft tokens
(`Request.spec_token_ids`), scheduled after its last known token, so it asks for 1 + k slots
while its neighbours ask for one. The runner answers with a ModelRunnerOutput (per request:
the accepted tokens, their logprobs, how many draft positions were rejected, or an error), and
update_from_output() alone applies it: tokens are appended one by one through every stop check
(EOS, stop ids, stop strings, max_tokens, context length), rejected positions are rolled back
in the KV manager, and only then are the written full blocks offered to the prefix cache.

Requests reach add_request() already validated (engine/validation.py): what is checked here
are internal invariants (asserts) and the queue bound, which depends on the moment.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from metroline import faults
from metroline.config import SchedulerConfig
from metroline.engine.policy import make_policy
from metroline.engine.processors import forced_tokens, notify_accept
from metroline.engine.request import ModelRunnerOutput, Request, RequestStatus
from metroline.errors import QueueFullError, processor_failure
from metroline.kv.kv_manager import KVCacheManager

logger = logging.getLogger("metroline.engine")

__all__ = ["QueueFullError", "ScheduledRequest", "Scheduler", "SchedulerOutput"]


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # known tokens to compute + draft tokens to verify
    start_pos: int  # num_computed_tokens before this step
    block_ids: list[int]
    sample: bool  # after this step all known tokens are computed: sample the next one(s)
    # Drafts scheduled after the known tokens (the last len() of num_new_tokens); the runner
    # computes logits for each of them plus one more position.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: object = None  # [len(spec_token_ids), vocab] draft distributions, or None

    @property
    def num_logits(self) -> int:
        """Positions (at the end of this request's tokens) that need logits this step."""
        return 1 + len(self.spec_token_ids) if self.sample else 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # finished inside schedule()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, kv_manager: KVCacheManager,
                 block_size: int, max_model_len: int):
        self.config = scheduler_config
        # The order requests are served in (engine/policy.py); fed each step's service.
        self.policy = make_policy(scheduler_config.policy)
        self.kv = kv_manager
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._group_leaders: dict[str, Request] = {}  # group_id -> sample 0, while n > 1
        self.num_preemptions = 0
        self.num_generation_tokens = 0  # tokens appended to outputs
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model
        self.num_spec_draft_tokens = 0  # draft tokens verified
        self.num_spec_accepted_tokens = 0  # of which accepted
        self.num_spec_verifications = 0  # request-steps that verified drafts
        self.num_prefill_chunks = 0  # times a request's known tokens were split across steps
        self.num_fast_forward_tokens = 0  # tokens a grammar forced, appended without a step each

    def clock(self) -> float:
        """Seconds (monotonic) for pin expiry and the policy; a test may assign a fake one."""
        return time.monotonic()

    # ---- admission ----

    def add_request(self, request: Request) -> None:
        """Queue a validated request, or raise QueueFullError when the waiting queue is full."""
        assert request.request_id not in self.requests, request.request_id
        assert 0 < request.num_prompt_tokens < self.max_model_len
        limit = self.config.max_queued_requests
        if limit is not None and len(self.waiting) >= limit:
            raise QueueFullError(f"too many requests waiting ({limit}); retry later")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request
        self.policy.on_add(request, self.clock())
        if request.sampling_params.n > 1 and request.sample_index == 0:
            self._group_leaders[request.group_id] = request

    # ---- one step ----

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running requests first (decodes, ongoing prefill chunks),
        preempting when the pool says no, then admit waiting ones while budget allows."""
        out = SchedulerOutput()
        now = self.clock()
        # Sessions whose next turn is already queued: their pins outlive the expiry and yield last.
        queued = {r.session_id for r in self.waiting if r.session_id is not None} if self.kv.pins else ()
        self.kv.expire_pins(now, keep=queued)
        self.policy.on_step(now)
        budget = self.config.max_num_batched_tokens
        # Sorted so the lowest-priority request (the preemption victim) is always last and
        # therefore never one already scheduled in this step.
        self.running.sort(key=lambda r: self.policy.sort_key(r, now))

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(self.token_budget(req), budget)
            if num_new <= 0:
                i += 1
                continue
            # Drafts that do not fit this step's budget are dropped (they stay a proposal).
            num_known = req.num_tokens - req.num_computed_tokens
            keep = max(0, num_new - num_known)
            if keep < len(req.spec_token_ids):
                del req.spec_token_ids[keep:]
                if req.spec_probs is not None:
                    req.spec_probs = req.spec_probs[:keep] if keep else None
            while True:
                if self.kv.allocate_slots(req, num_new) is not None:
                    break
                if self.kv.release_oldest_pin(queued):  # session pins yield before running work does
                    continue
                if len(self.running) == 1:
                    # Alone and still too big for the whole pool: it can never continue.
                    self._finish(req, RequestStatus.FINISHED_LENGTH)
                    out.finished.append(req)
                    break
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # req preempted itself or finished: no room for anyone after it
            self._add_scheduled(out, req, num_new)
            budget -= num_new
            i += 1

        if not out.preempted:
            self._admit_waiting(out, budget, now, queued)

        for sr in out.scheduled:
            sr.request.num_computed_tokens += sr.num_new_tokens
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int, now: float, queued=()) -> None:
        if self.policy.sorts_waiting and len(self.waiting) > 1:
            # Re-sorted at each admission (the queue is short; keys move with service and age).
            self.waiting = deque(sorted(self.waiting, key=lambda r: self.policy.sort_key(r, now)))
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self._waits_for_group_leader(req):
                skipped.append(self.waiting.popleft())
                continue
            if _cdiv(req.num_tokens, self.block_size) > self.kv.num_total_blocks:
                # A resumed request that outgrew the whole pool: it can never run again.
                self.waiting.popleft()
                self._finish(req, RequestStatus.FINISHED_LENGTH)
                out.finished.append(req)
                continue
            hits, num_hit_tokens = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit_tokens
            # Without chunked prefill a prompt waits for a step with room for all of it; one
            # larger than any step (only a resumed, preempted request) is chunked regardless.
            if (not self.config.enable_chunked_prefill and num_new > budget
                    and num_new <= self.config.max_num_batched_tokens):
                break
            num_new = min(num_new, budget)
            req.spec_token_ids.clear()  # a request drafts only once it decodes
            req.spec_probs = None
            if self.kv.allocate_slots(req, num_new, hits) is None:
                # Pins yield to queued work too (oldest first): a pin is a bet that its
                # session's next turn comes soon, the request at the head is work now, and
                # holding its admission until the pins expire would shrink the batch.
                if self.kv.release_oldest_pin(queued):
                    continue
                break
            self.waiting.popleft()
            if req.session_id is not None:
                # The new turn now holds its own references: the session's pin has done its job.
                self.kv.release_session(req.session_id)
            if req.num_preemptions == 0 and req.num_output_tokens == 0:
                req.num_cached_tokens = num_hit_tokens
            req.num_computed_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_scheduled(out, req, num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _add_scheduled(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        sample = req.num_computed_tokens + num_new >= req.num_tokens
        if not sample:
            self.num_prefill_chunks += 1
        out.scheduled.append(ScheduledRequest(req, num_new, req.num_computed_tokens,
                                              self.kv.get_block_ids(req.request_id), sample,
                                              list(req.spec_token_ids), req.spec_probs))
        out.num_batched_tokens += num_new

    def token_budget(self, req: Request) -> int:
        """Tokens a running request asks for this step: its known tokens not yet computed, plus
        its drafts when it is decoding (a speculating request asks for 1 + k slots)."""
        num_known = req.num_tokens - req.num_computed_tokens
        return num_known + (len(req.spec_token_ids) if num_known == 1 else 0)

    def _waits_for_group_leader(self, req: Request) -> bool:
        """Samples 1..n-1 wait until sample 0 has computed the prompt, then share its blocks."""
        if req.sample_index == 0 or not self.kv.enable_caching:
            return False
        leader = self._group_leaders.get(req.group_id)
        return (leader is not None and leader is not req
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.spec_token_ids.clear()
        req.spec_probs = None
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        # Ahead of new arrivals; a policy that sorts the waiting queue puts it in its place.
        self.waiting.appendleft(req)

    # ---- after the model ran ----

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[Request]:
        """Apply one successful forward pass: per scheduled request, roll back rejected draft
        positions, append the accepted tokens through the stop checks, offer the written
        blocks to the prefix cache, finish what stopped. A request whose output carries an
        error (its logits processor raised) finishes with FINISHED_ERROR, alone.

        Returns the requests that got new tokens or finished in this step."""
        changed: list[Request] = list(scheduler_output.finished)
        for sr in scheduler_output.scheduled:
            req = sr.request
            if req.is_finished:  # aborted while the step ran
                continue
            if not req.internal:
                self.num_prompt_tokens_computed += max(
                    0, min(sr.start_pos + sr.num_new_tokens, req.num_prompt_tokens) - sr.start_pos)
            # Service: the positions the model ran for it (prefill chunk, or the decode that
            # produced this step's token, drafts verified included).
            self.policy.on_tokens(req, sr.num_new_tokens)
            res = runner_output.outputs.get(req.request_id) if sr.sample else None
            if res is not None and res.error is not None:
                req.error = res.error
                self._finish(req, RequestStatus.FINISHED_ERROR)
                changed.append(req)
                continue
            new = res.token_ids if res is not None else []
            num_spec = len(sr.spec_token_ids)
            if sr.sample:
                assert 1 <= len(new) <= num_spec + 1 and new[:-1] == sr.spec_token_ids[:len(new) - 1]
                if num_spec:
                    accepted = len(new) - 1
                    self.num_spec_draft_tokens += num_spec
                    self.num_spec_accepted_tokens += accepted
                    self.num_spec_verifications += 1
                    req.num_spec_drafted += num_spec
                    req.num_spec_accepted += accepted
                if num_spec + 1 > len(new):
                    self.kv.rollback(req, num_spec + 1 - len(new))
            req.spec_token_ids = []
            req.spec_probs = None
            if new and req.first_token_time is None:
                req.first_token_time = time.monotonic()
            try:
                status, appended = self._append(req, new, res.logprobs if res is not None else None)
                if status is None and appended and self.config.grammar_fast_forward:
                    status = self._fast_forward(req)
            except Exception as e:  # its detokenizer or stop check raised: it fails alone
                logger.exception("request %s failed after its step", req.request_id)
                req.error = f"{type(e).__name__}: {e}"
                status, appended = RequestStatus.FINISHED_ERROR, 0
            self.kv.cache_blocks(req)  # before _finish: a session pin keeps the cached prefix
            if status is not None:
                self._finish(req, status)
            if appended or req.is_finished:
                changed.append(req)
        return changed

    def _append(self, req: Request, tokens: list[int], logprobs) -> tuple[RequestStatus | None, int]:
        """Append tokens one by one through the stop checks, then tell the request's processors;
        (the status it ends with, if any; how many were appended)."""
        status = None
        appended = 0
        for i, tok in enumerate(tokens):
            req.output_token_ids.append(tok)
            if logprobs is not None:
                req.output_logprobs.append(logprobs[i])
            appended += 1
            status = self._check_stop(req, tok)
            if status is not None:
                break
        if not req.internal:
            self.num_generation_tokens += appended
        if appended and req.logits_processors:
            try:
                notify_accept(req.logits_processors, tokens[:appended])
            except Exception as e:
                req.error = processor_failure(e)
                status = RequestStatus.FINISHED_ERROR
        return status, appended

    def _fast_forward(self, req: Request) -> RequestStatus | None:
        """Grammar fast-forward: the tokens a request's grammar forces next (`{"name": "` of a
        tool call) are appended at once, as known tokens the next step computes in one pass
        with the request's last token, instead of one decode step each. Not for requests that
        want logprobs (a forced token's logprob would need its own logits row)."""
        if req.sampling_params.logprobs is not None:
            return None
        try:
            forced = forced_tokens(req.logits_processors)
        except Exception as e:
            req.error = processor_failure(e)
            return RequestStatus.FINISHED_ERROR
        if not forced:
            return None
        status, appended = self._append(req, forced, None)
        self.num_fast_forward_tokens += appended
        return status

    def fail_step(self, scheduler_output: SchedulerOutput, error: str) -> list[Request]:
        """The forward pass raised: its requests finish with the error (nothing they computed
        this step reaches the prefix cache); every other request goes on."""
        failed = []
        for sr in scheduler_output.scheduled:
            req = sr.request
            if not req.is_finished:
                req.error = error
                self._finish(req, RequestStatus.FINISHED_ERROR)
                failed.append(req)
        return list(scheduler_output.finished) + failed

    def _check_stop(self, req: Request, tok: int) -> RequestStatus | None:
        """The status `tok` (just appended) ends the request with, if any. The one place that
        decides why a request stops."""
        text = req.output_text
        if text is not None:
            faults.hit("detokenize", req.request_id)
            stop_str = text.append(tok)
            if stop_str is not None:
                req.stop_reason = stop_str
                return RequestStatus.FINISHED_STOPPED
        status = self._check_stop_token(req, tok)
        if status is not None and text is not None:
            stop_str = text.flush()  # the last characters held back may complete a stop string
            if stop_str is not None:
                req.stop_reason = stop_str
                return RequestStatus.FINISHED_STOPPED
        return status

    def _check_stop_token(self, req: Request, tok: int) -> RequestStatus | None:
        sp = req.sampling_params
        if req.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and tok in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if tok in sp.stop_token_ids:
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if req.max_tokens is not None and req.num_output_tokens >= req.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- aborts and queries ----

    def finish_requests(self, request_ids: str | Iterable[str],
                        status: RequestStatus) -> list[Request]:
        """Finish requests from outside (abort, stop string). Unknown or finished ids are ignored."""
        assert status.finished
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req not in self.running:
                self.waiting.remove(req)
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req in self.running:
            self.running.remove(req)
        req.status = status
        if (req.session_id is not None and req.kv_retention_s
                and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)):
            self.kv.pin_session(req, req.session_id, self.clock() + req.kv_retention_s)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self.policy.on_finish(req)
        if self._group_leaders.get(req.group_id) is req:
            del self._group_leaders[req.group_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)
