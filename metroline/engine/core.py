"""EngineCore: the step loop. schedule -> execute -> update, then detokenize and emit outputs.

Users submit "groups" (one prompt, n samples); the scheduler sees one Request per sample.
Outputs are deltas: each step's RequestOutput carries only the new text and token ids of each
sample, so streaming is free and LLM.generate accumulates.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from metroline.config import CacheConfig, ModelConfig, SchedulerConfig
from metroline.engine.request import (FINISH_REASON, CompletionOutput, Request, RequestOutput,
                                      RequestStatus, SamplingParams)
from metroline.engine.runner import ModelRunner
from metroline.engine.scheduler import Scheduler
from metroline.errors import InvalidRequestError
from metroline.kv.kv_manager import KVCacheManager

logger = logging.getLogger("metroline.engine")


@dataclass
class _SampleState:
    """Per-sample output state: detokenizer, stop-string search, what was already sent."""

    request: Request
    detok: object
    text: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0
    sent_logprobs: int = 0
    finished_sent: bool = False


@dataclass
class _Group:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_SampleState]
    arrival_time: float
    metrics: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class EngineCore:
    def __init__(self, loaded, cache_config: CacheConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None,
                 model_config: ModelConfig | None = None, attention_backend: str = "auto"):
        from metroline.attention.backend import get_attention_backend

        self.cache_config = cache_config or CacheConfig()
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.model_config = model_config or ModelConfig()
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        model = loaded.model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        bs = self.cache_config.block_size
        per_token = ModelRunner.kv_bytes_per_token(model, self.dtype)
        num_blocks = self.cache_config.num_blocks
        if num_blocks is None:
            budget = self.cache_config.kv_cache_memory or int(
                available_memory_bytes(self.device) * self.cache_config.kv_cache_memory_fraction)
            num_blocks = max(2, budget // (per_token * bs))
        self.num_blocks = num_blocks
        ctx = model.model.rotary_emb.max_positions
        self.max_model_len = min(self.scheduler_config.max_model_len or ctx, ctx, num_blocks * bs)
        self.runner = ModelRunner(model, get_attention_backend(attention_backend, self.device),
                                  num_blocks, bs, self.device, self.dtype, self.model_config.seed)
        self.host_tier = self._make_host_tier(per_token * bs)
        self.kv_manager = KVCacheManager(num_blocks, bs, self.cache_config.enable_prefix_caching,
                                         self.cache_config.max_pinned_fraction, self.host_tier)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_manager, bs, self.max_model_len)
        self.groups: dict[str, _Group] = {}
        self._sample_to_group: dict[str, _Group] = {}
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d",
                    num_blocks, bs, num_blocks * bs * per_token / 2**20, self.max_model_len)

    def _make_host_tier(self, bytes_per_block: int):
        from metroline.kv.host_tier import HostKVTier

        budget = self.cache_config.host_kv_cache_memory
        if budget is None:
            budget = int(available_memory_bytes(torch.device("cpu")) * 0.1) if self.device.type == "cuda" else 0
        if not budget or not self.cache_config.enable_prefix_caching or budget < bytes_per_block:
            return None
        return HostKVTier(self.runner.kv_caches, self.cache_config.block_size, budget // bytes_per_block)

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    priority: int = 0, session_id: str | None = None, program_id: str | None = None,
                    cache_salt: str | None = None, arrival_time: float | None = None,
                    kv_retention_s: float | None = None) -> None:
        """Validate and enqueue. Raises InvalidRequestError (or QueueFullError): nothing is kept."""
        from metroline.tokenizer import IncrementalDetokenizer

        if request_id in self.groups:
            raise InvalidRequestError(f"duplicate request id {request_id!r}", param="request_id")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.loaded.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        params.validate(vocab)
        if kv_retention_s is not None and not (0 <= kv_retention_s <= 24 * 3600):
            raise InvalidRequestError("kv_retention_s must be in [0, 86400]", param="kv_retention_s")
        n_prompt = len(prompt_token_ids)
        if n_prompt >= self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt "
                f"has {n_prompt} tokens", param="prompt", code="context_length_exceeded")
        max_tokens = params.max_tokens or (self.max_model_len - n_prompt)
        if n_prompt + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{n_prompt} prompt tokens + {max_tokens} max_tokens were requested",
                param="max_tokens", code="context_length_exceeded")
        eos = frozenset(self.tokenizer.stop_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        samples = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, prompt_token_ids, params, eos_token_ids=eos, arrival_time=arrival,
                          priority=priority, session_id=session_id, program_id=program_id,
                          cache_salt=cache_salt, group_id=request_id, sample_index=i,
                          kv_retention_s=kv_retention_s)
            req.max_tokens = max_tokens
            samples.append(_SampleState(req, IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens)))
        added = []
        try:
            for s in samples:
                self.scheduler.add_request(s.request)
                added.append(s.request.request_id)
        except Exception:
            self.scheduler.finish_requests(added, RequestStatus.FINISHED_ABORTED)
            raise
        group = _Group(request_id, list(prompt_token_ids), params, samples, arrival)
        self.groups[request_id] = group
        for s in samples:
            self._sample_to_group[s.request.request_id] = group

    def abort_request(self, request_id: str) -> None:
        """Abort a group (all its samples); its blocks are freed at once. Unknown ids are ignored."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        ids = [s.request.request_id for s in group.samples]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for rid in ids:
            self._sample_to_group.pop(rid, None)
            self.runner.sampler.release(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def release_session(self, session_id: str) -> bool:
        """Drop a session's retained KV (DELETE /v1/sessions/{id}); False if none was pinned."""
        return self.kv_manager.release_session(session_id)

    def get_stats(self) -> dict:
        """A snapshot of gauges and monotonic counters, for metrics. Only plain ints and floats
        are read, so another thread (the server's) may call it while the loop steps."""
        sched, kv = self.scheduler, self.kv_manager
        return {"num_running": sched.num_running, "num_waiting": sched.num_waiting,
                "kv_cache_usage": kv.usage, "num_blocks": self.num_blocks,
                "num_preemptions": sched.num_preemptions,
                "prefix_cache_queries": kv.prefix_cache_queries,
                "prefix_cache_hits": kv.prefix_cache_hits,
                "pinned_blocks": kv.num_pinned_blocks, "pinned_sessions": len(kv.pins),
                "kv_evictions": kv.pool.num_evictions, "host_tier_hits": kv.host_tier_hits,
                **self.stats}

    # ----------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        touched: dict[str, _Group] = {}

        def touch(reqs) -> None:
            for req in reqs:
                g = self._sample_to_group.get(req.request_id)
                if g:
                    touched[g.request_id] = g

        touch(sched.finished)
        if sched.scheduled:
            self.stats["steps"] += 1
            try:
                results = self.runner.execute(sched.scheduled)
            except Exception as e:  # a failed step fails its requests, never the engine
                logger.exception("model step failed")
                ids = [s.request.request_id for s in sched.scheduled]
                for s in sched.scheduled:
                    s.request.error = f"{type(e).__name__}: {e}"
                self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR)
                touch(s.request for s in sched.scheduled)
                results = None
            if results is not None:
                self.stats["prompt_tokens"] += sum(
                    max(0, min(s.start_pos + s.num_new_tokens, s.request.num_prompt_tokens) - s.start_pos)
                    for s in sched.scheduled)
                for rid, res in results.items():
                    req = self.scheduler.get_request(rid)
                    if req is not None and res.logprob is not None:
                        req.output_logprobs.append((res.token_id, res.logprob, res.top_logprobs))
                changed = self.scheduler.update_from_output(
                    sched, {rid: [res.token_id] for rid, res in results.items()})
                self.stats["generation_tokens"] += len(results)
                touch(changed)
        return [self._make_output(g) for g in touched.values()]

    def _make_output(self, g: _Group) -> RequestOutput:
        stops = g.params.stop
        hold = max((len(s) for s in stops), default=1) - 1
        outs = []
        for i, st in enumerate(g.samples):
            req = st.request
            new_ids = req.output_token_ids[st.sent_tokens:]
            if new_ids or (req.is_finished and not st.finished_sent):
                st.text += st.detok.step(new_ids) if new_ids else ""
                if req.is_finished:
                    st.text += st.detok.flush()
                if stops and not (req.is_finished and req.stop_reason in stops):
                    self._check_stop_strings(st, stops, hold)
                end = len(st.text) if req.is_finished else max(st.sent_chars, len(st.text) - hold)
                lps = req.output_logprobs[st.sent_logprobs:]
                out = CompletionOutput(i, st.text[st.sent_chars:end], new_ids,
                                       FINISH_REASON.get(req.status) if req.is_finished else None,
                                       req.stop_reason if req.is_finished else None,
                                       lps if g.params.logprobs is not None else None)
                st.sent_chars, st.sent_tokens = end, req.num_output_tokens
                st.sent_logprobs += len(lps)
                st.finished_sent = req.is_finished
                outs.append(out)
        finished = g.finished
        if finished:
            self.groups.pop(g.request_id, None)
            for st in g.samples:
                self._sample_to_group.pop(st.request.request_id, None)
                self.runner.sampler.release(st.request.request_id)
        errors = [st.request.error for st in g.samples if st.request.error]
        num_cached = max((st.request.num_cached_tokens for st in g.samples), default=0)
        return RequestOutput(g.request_id, g.prompt_token_ids, outs, finished,
                             num_cached_tokens=num_cached, error=errors[0] if errors else None)

    def _check_stop_strings(self, st: _SampleState, stops: list[str], hold: int) -> None:
        # Search only where a match could not have been seen before: stop strings may span
        # tokens, so the window starts `hold` characters before the unsent text.
        start = max(0, st.sent_chars - hold)
        best = None
        for s in stops:
            pos = st.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return
        pos, s = best
        st.text = st.text[:pos + (len(s) if st.request.sampling_params.include_stop_str_in_output else 0)]
        if not st.request.is_finished:
            self.scheduler.finish_requests([st.request.request_id], RequestStatus.FINISHED_STOPPED)
        else:
            st.request.status = RequestStatus.FINISHED_STOPPED
        st.request.stop_reason = s
