"""Iteration-level scheduler: schedule() -> run the model -> update_from_output().

Every step has one token budget (max_num_batched_tokens) shared by decodes and prefill
chunks. Running requests are served first, then waiting ones are admitted. When the KV pool
says no, the lowest-priority running request is preempted (its KV is dropped and recomputed
later).

As in vLLM v1, schedule() advances each scheduled request's num_computed_tokens by the tokens
it scheduled, before the model runs: the runner reads ScheduledRequest.start_pos instead.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from metroline.config import SchedulerConfig
from metroline.engine.request import Request, RequestStatus
from metroline.errors import InvalidRequestError, MetrolineError
from metroline.kv.kv_manager import KVCacheManager


class QueueFullError(MetrolineError):
    """The waiting queue is at max_queued_requests (the server answers 429)."""


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start_pos: int  # num_computed_tokens before this step
    block_ids: list[int]
    sample: bool  # after this step all known tokens are computed: sample the next one


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
        self.kv = kv_manager
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._group_leaders: dict[str, Request] = {}  # group_id -> sample 0, while n > 1
        # Extension point for speculative decoding: extra KV slots reserved per running request.
        self.num_lookahead_tokens = 0
        self.num_preemptions = 0
        self.num_prefill_chunks = 0  # times a request's known tokens were split across steps

    # ---- admission ----

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise: InvalidRequestError if it can never fit, QueueFullError."""
        n = request.num_prompt_tokens
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use",
                                      param="request_id", code="duplicate_request_id")
        if n == 0:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the context length is {self.max_model_len} "
                f"(prompt plus at least one generated token must fit)",
                param="prompt", code="context_length_exceeded")
        if _cdiv(n + 1, self.block_size) > self.kv.num_total_blocks:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the KV cache holds only "
                f"{self.kv.num_total_blocks * self.block_size - 1} tokens plus one generated",
                param="prompt", code="context_length_exceeded")
        if not self.config.enable_chunked_prefill and n > self.config.max_num_batched_tokens:
            raise InvalidRequestError(
                f"the prompt has {n} tokens, more than max_num_batched_tokens="
                f"{self.config.max_num_batched_tokens}, and chunked prefill is disabled",
                param="prompt", code="context_length_exceeded")
        limit = self.config.max_queued_requests
        if limit is not None and len(self.waiting) >= limit:
            raise QueueFullError(f"too many requests waiting ({limit}); retry later")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request
        if request.sampling_params.n > 1 and request.sample_index == 0:
            self._group_leaders[request.group_id] = request

    # ---- one step ----

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running requests first (decodes, ongoing prefill chunks),
        preempting when the pool says no, then admit waiting ones while budget allows."""
        out = SchedulerOutput()
        self.kv.expire_pins(time.monotonic())
        budget = self.config.max_num_batched_tokens
        # Sorted so the lowest-priority request (the preemption victim) is always last and
        # therefore never one already scheduled in this step.
        self.running.sort(key=self._priority_key)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(self.token_budget(req), budget)
            if num_new <= 0:
                i += 1
                continue
            while True:
                if self.kv.allocate_slots(req, num_new,
                                          num_lookahead_tokens=self.num_lookahead_tokens) is not None:
                    break
                if self.kv.release_oldest_pin():  # session pins yield before running work does
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
            self._admit_waiting(out, budget)

        for sr in out.scheduled:
            sr.request.num_computed_tokens += sr.num_new_tokens
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        if self.config.policy == "priority":
            self.waiting = deque(sorted(self.waiting, key=self._priority_key))
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self._waits_for_group_leader(req):
                skipped.append(self.waiting.popleft())
                continue
            if _cdiv(req.num_tokens + self.num_lookahead_tokens,
                     self.block_size) > self.kv.num_total_blocks:
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
            if self.kv.allocate_slots(req, num_new, hits, self.num_lookahead_tokens) is None:
                # With nothing running, only pins can hold the memory it needs: release them
                # (oldest first) rather than wait for their expiry.
                if not self.running and self.kv.release_oldest_pin():
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
                                              self.kv.get_block_ids(req.request_id), sample))
        out.num_batched_tokens += num_new

    def token_budget(self, req: Request) -> int:
        """Tokens a running request asks for this step; speculative tokens will add to it."""
        return req.num_tokens - req.num_computed_tokens

    def _priority_key(self, req: Request) -> tuple:
        arrival = (req.arrival_time, req.arrival_seq)
        return (req.priority, *arrival) if self.config.policy == "priority" else arrival

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
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)  # ahead of new arrivals

    # ---- after the model ran ----

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           sampled_token_ids: dict[str, list[int]]) -> list[Request]:
        """Append sampled tokens, apply stop checks, free finished requests.

        Returns the requests that got new tokens or finished in this step."""
        changed: list[Request] = list(scheduler_output.finished)
        for sr in scheduler_output.scheduled:
            req = sr.request
            if not sr.sample or req.is_finished:  # mid-prefill, or aborted during the step
                continue
            new = sampled_token_ids.get(req.request_id, [])
            for tok in new:
                if req.first_token_time is None:
                    req.first_token_time = time.monotonic()
                req.output_token_ids.append(tok)
                status = self._check_stop(req, tok)
                if status is not None:
                    self._finish(req, status)
                    break
            if new or req.is_finished:
                changed.append(req)
        return changed

    def _check_stop(self, req: Request, tok: int) -> RequestStatus | None:
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
            self.kv.pin_session(req, req.session_id, time.monotonic() + req.kv_retention_s)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
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
