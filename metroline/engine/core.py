"""EngineCore: the step loop. propose drafts -> schedule -> execute -> update -> emit outputs.

Users submit "groups" (one prompt, n samples); the scheduler sees one Request per sample.
The runner returns a ModelRunnerOutput and only the scheduler applies it (tokens, stops, KV
rollback, prefix caching); the core then turns what changed into RequestOutputs. Outputs are
deltas: each step's RequestOutput carries only the new text and token ids of each sample, so
streaming is free and LLM.generate accumulates.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from metroline.config import CacheConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from metroline.engine.output_text import OutputText
from metroline.engine.processors import can_look_ahead
from metroline.engine.request import (FINISH_REASON, CompletionOutput, EngineInfo, EngineStats,
                                      Request, RequestHints, RequestOutput, RequestStatus,
                                      SamplingParams)
from metroline.engine.runner import ModelRunner
from metroline.engine.scheduler import Scheduler
from metroline.engine.speculative import NgramProposer, ProposerBase, SpeculationPolicy, SuffixProposer, as_draft
from metroline.engine.validation import EngineLimits, validate_request
from metroline.errors import InvalidRequestError, MetrolineError
from metroline.kv.kv_manager import KVCacheManager
from metroline.platform import (resolve_attention_backend, resolve_host_kv_cache_memory, resolve_kv_cache_dtype,
                                resolve_kv_cache_memory_fraction)

logger = logging.getLogger("metroline.engine")


@dataclass
class _Group:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[Request]
    arrival_time: float
    sent_tokens: list[int] = field(default_factory=list)
    sent_logprobs: list[int] = field(default_factory=list)
    finished_sent: list[bool] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(r.is_finished for r in self.samples)


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
                 model_config: ModelConfig | None = None, attention_backend: str = "auto",
                 proposer=None, num_speculative_tokens: int = 0,
                 speculative_config: SpeculativeConfig | None = None):
        """`speculative_config` turns on speculative decoding with one of the built-in
        proposers; a test may pass its own `proposer` (engine.speculative.Proposer) with a fixed
        `num_speculative_tokens` instead."""
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
        kv_dtype = resolve_kv_cache_dtype(self.cache_config.kv_cache_dtype)
        try:
            backend = get_attention_backend(resolve_attention_backend(attention_backend, self.device, kv_dtype),
                                            kv_dtype)
        except ValueError as e:
            raise MetrolineError(str(e)) from None
        per_token = ModelRunner.kv_bytes_per_token(model, backend, self.dtype)
        ctx = model.max_positions
        num_blocks, self.kv_sizing = self._size_kv_pool(per_token, ctx)
        self.num_blocks = num_blocks
        self.max_model_len = min(self.scheduler_config.max_model_len or ctx, ctx, num_blocks * bs)
        self.runner = ModelRunner(model, backend, num_blocks, bs, self.device, self.dtype,
                                  self.model_config.seed)
        self.host_tier = self._make_host_tier(per_token * bs)
        self.kv_manager = KVCacheManager(num_blocks, bs, self.cache_config.enable_prefix_caching,
                                         self.cache_config.max_pinned_fraction, self.host_tier)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_manager, bs, self.max_model_len)
        self.limits = EngineLimits(loaded.config.vocab_size, self.max_model_len, num_blocks * bs,
                                   self.scheduler_config.max_num_batched_tokens,
                                   self.scheduler_config.enable_chunked_prefill,
                                   self.scheduler_config.max_queued_requests)
        self.speculative_config = speculative_config or SpeculativeConfig()
        self.proposer, self.spec_policy = None, None
        if proposer is not None and num_speculative_tokens > 0:
            self.proposer = proposer
            self.spec_policy = SpeculationPolicy(num_speculative_tokens, max_batch=None, adaptive=False)
        elif self.speculative_config.method is not None:
            sc = self.speculative_config
            self.proposer = make_proposer(sc.method, loaded, core=self)
            self.spec_policy = SpeculationPolicy(sc.num_speculative_tokens, sc.max_batch, sc.adaptive)
        self.groups: dict[str, _Group] = {}
        self._sample_to_group: dict[str, _Group] = {}
        self.num_steps = 0
        self.info = EngineInfo(model_name=loaded.source.name, max_model_len=self.max_model_len,
                               vocab_size=loaded.config.vocab_size, device=str(self.device),
                               dtype=str(self.dtype).removeprefix("torch."), num_blocks=num_blocks,
                               block_size=bs, kv_cache_bytes=num_blocks * bs * per_token,
                               attention_backend=backend.name,
                               kv_cache_dtype=str(backend.cache_dtype(self.dtype)).removeprefix("torch."),
                               kv_sizing=self.kv_sizing, weight_bytes=int(loaded.weight_bytes or 0))
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s), max_model_len %d",
                    num_blocks, bs, num_blocks * bs * per_token / 2**20, self.kv_sizing,
                    self.max_model_len)

    def _size_kv_pool(self, per_token: int, ctx: int) -> tuple[int, str]:
        """Blocks of the KV pool, and how that number was chosen (for the start-up banner)."""
        cc, bs = self.cache_config, self.cache_config.block_size
        if cc.num_blocks is not None:
            return cc.num_blocks, "num_blocks"
        if cc.kv_cache_memory is not None:
            return max(2, cc.kv_cache_memory // (per_token * bs)), "--kv-cache-memory"
        seqs = self.scheduler_config.max_num_seqs
        ctx = min(self.scheduler_config.max_model_len or ctx, ctx)
        usable = seqs * ctx * per_token
        fraction = resolve_kv_cache_memory_fraction(cc.kv_cache_memory_fraction, self.device)
        cap = int(available_memory_bytes(self.device) * fraction)
        if usable <= cap:
            return max(2, -(-seqs * ctx // bs)), f"auto: {seqs} seqs x {ctx} tokens"
        return (max(2, cap // (per_token * bs)),
                f"auto: {seqs} seqs x {ctx} tokens, capped at {fraction:.0%} of free memory")

    def _make_host_tier(self, bytes_per_block: int):
        from metroline.kv.host_tier import HostKVTier

        budget = resolve_host_kv_cache_memory(
            self.cache_config.host_kv_cache_memory, self.device,
            self.cache_config.enable_prefix_caching,
            available_memory_bytes(torch.device("cpu")) if self.device.type == "cuda" else 0)
        if budget < bytes_per_block:
            return None
        return HostKVTier(self.runner.kv_caches, self.cache_config.block_size, budget // bytes_per_block)

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    hints: RequestHints | None = None, *, arrival_time: float | None = None) -> None:
        """Validate and enqueue. Raises InvalidRequestError (or QueueFullError): nothing is kept."""
        from metroline.tokenizer import IncrementalDetokenizer

        hints = hints or RequestHints()
        if request_id in self.groups:
            raise InvalidRequestError(f"duplicate request id {request_id!r}", param="request_id",
                                      code="duplicate_request_id")
        max_tokens = validate_request(prompt_token_ids, params, hints, self.limits)
        eos = frozenset(self.tokenizer.stop_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        samples = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, prompt_token_ids, params, eos_token_ids=eos, arrival_time=arrival,
                          priority=hints.priority, session_id=hints.session_id,
                          program_id=hints.program_id, cache_salt=hints.cache_salt,
                          group_id=request_id, sample_index=i, kv_retention_s=hints.kv_retention_s,
                          internal=hints.internal)
            req.max_tokens = max_tokens
            req.output_text = OutputText(
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                       skip_special_tokens=params.skip_special_tokens),
                params.stop, params.include_stop_str_in_output)
            samples.append(req)
        added = []
        try:
            for req in samples:
                self.scheduler.add_request(req)
                added.append(req.request_id)
        except Exception:
            self.scheduler.finish_requests(added, RequestStatus.FINISHED_ABORTED)
            raise
        n = len(samples)
        group = _Group(request_id, list(prompt_token_ids), params, samples, arrival,
                       [0] * n, [0] * n, [False] * n)
        self.groups[request_id] = group
        for req in samples:
            self._sample_to_group[req.request_id] = group

    def abort_request(self, request_id: str) -> None:
        """Abort a group (all its samples); its blocks are freed at once. Unknown ids are ignored."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        ids = [r.request_id for r in group.samples]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for rid in ids:
            self._sample_to_group.pop(rid, None)
        if self.proposer is not None:
            for req in group.samples:
                self._spec_forget(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def release_session(self, session_id: str) -> bool:
        """Drop a session's retained KV (DELETE /v1/sessions/{id}); False if none was pinned."""
        return self.kv_manager.release_session(session_id)

    def get_stats(self) -> EngineStats:
        """A snapshot of gauges and monotonic counters, for metrics. Only plain ints and floats
        are read, so another thread (the server's) may call it while the loop steps."""
        sched, kv = self.scheduler, self.kv_manager
        return EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting,
            kv_cache_usage=kv.usage, num_blocks=self.num_blocks,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            pinned_blocks=kv.num_pinned_blocks, pinned_sessions=len(kv.pins),
            kv_evictions=kv.pool.num_evictions, host_tier_hits=kv.host_tier_hits,
            prompt_tokens=sched.num_prompt_tokens_computed,
            generation_tokens=sched.num_generation_tokens, steps=self.num_steps,
            spec_draft_tokens=sched.num_spec_draft_tokens,
            spec_accepted_tokens=sched.num_spec_accepted_tokens,
            spec_verifications=sched.num_spec_verifications,
            fast_forward_tokens=sched.num_fast_forward_tokens)

    # ----------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule()
        changed = list(sched.finished)
        if sched.scheduled:
            if not all(sr.request.internal for sr in sched.scheduled):
                self.num_steps += 1
            try:
                result = self.runner.execute(sched.scheduled)
            except Exception as e:  # a failed step fails its requests, never the engine
                logger.exception("model step failed")
                changed = self.scheduler.fail_step(sched, f"{type(e).__name__}: {e}")
            else:
                changed = self.scheduler.update_from_output(sched, result)
            if self.proposer is not None:
                self._spec_done(sched.scheduled, changed)
        touched: dict[str, _Group] = {}
        for req in changed:
            g = self._sample_to_group.get(req.request_id)
            if g is not None:
                touched[g.request_id] = g
        outs = []
        for g in touched.values():
            try:
                outs.append(self._make_output(g))
            except Exception as e:  # its output text could not be made: it fails alone
                logger.exception("output of %s failed", g.request_id)
                outs.append(self._fail_group(g, f"{type(e).__name__}: {e}"))
        return outs

    def _fail_group(self, g: _Group, error: str) -> RequestOutput:
        """End a group with `error` (its blocks freed), for a failure outside the model step."""
        prompt = g.prompt_token_ids
        self.abort_request(g.request_id)
        return RequestOutput(g.request_id, prompt, [], True, error=error)

    def _propose(self) -> None:
        """Drafts for the requests about to decode, k per request from the policy (0 when the
        batch is too large for speculation to pay). Any request can draft except one with a
        stateful processor that cannot score draft positions (grammar masks can)."""
        decoding = [r for r in self.scheduler.running if r.num_tokens - r.num_computed_tokens == 1]
        reqs, ks = [], []
        for req in decoding:
            if not can_look_ahead(req.logits_processors):
                continue
            k = min(self.spec_policy.num_drafts(req, len(decoding)),
                    req.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens - 1)
            if k > 0:
                reqs.append(req)
                ks.append(k)
        if not reqs:
            return
        propose_batch = getattr(self.proposer, "propose_batch", None)
        drafts = (propose_batch(reqs, ks) if propose_batch is not None
                  else [self.proposer.propose(r, k) for r, k in zip(reqs, ks)])
        for req, k, d in zip(reqs, ks, drafts):
            d = as_draft(d)
            ids = list(d.token_ids[:k])
            if not all(0 <= t < self.limits.vocab_size for t in ids):  # a proposer's bad id: no draft
                ids = []
            req.spec_token_ids = ids
            req.spec_probs = d.probs[:len(ids)] if d.probs is not None and ids else None

    def _spec_done(self, scheduled, changed) -> None:
        """Tell the policy how each speculating request's drafts fared; let the proposer learn
        from, and forget, the requests that finished."""
        for sr in scheduled:
            if sr.spec_token_ids:
                self.spec_policy.observe(sr.request)
        for req in changed:
            if req.is_finished:
                self._spec_forget(req)

    def _spec_forget(self, req: Request) -> None:
        self.spec_policy.forget(req.request_id)
        finished = getattr(self.proposer, "request_finished", None)
        if finished is not None:
            finished(req)

    def _make_output(self, g: _Group) -> RequestOutput:
        outs = []
        for i, req in enumerate(g.samples):
            new_ids = req.output_token_ids[g.sent_tokens[i]:]
            if new_ids or (req.is_finished and not g.finished_sent[i]):
                text = req.output_text.take(req.is_finished)
                lps = req.output_logprobs[g.sent_logprobs[i]:]
                outs.append(CompletionOutput(
                    i, text, new_ids, FINISH_REASON.get(req.status) if req.is_finished else None,
                    req.stop_reason if req.is_finished else None,
                    lps if g.params.logprobs is not None else None))
                g.sent_tokens[i] = req.num_output_tokens
                g.sent_logprobs[i] += len(lps)
                g.finished_sent[i] = req.is_finished
        finished = g.finished
        if finished:
            self.groups.pop(g.request_id, None)
            for req in g.samples:
                self._sample_to_group.pop(req.request_id, None)
        errors = [r.error for r in g.samples if r.error]
        num_cached = max((r.num_cached_tokens for r in g.samples), default=0)
        return RequestOutput(g.request_id, g.prompt_token_ids, outs, finished,
                             num_cached_tokens=num_cached, error=errors[0] if errors else None,
                             num_spec_accepted_tokens=sum(r.num_spec_accepted for r in g.samples))


def make_proposer(method: str, loaded=None, core=None, **kwargs) -> ProposerBase:
    """`ngram`, `suffix` or `draft:MODEL` (MODEL: a path, or `layers=N` for the target's first N
    layers as its own draft; `core`, the engine, sizes its KV pool)."""
    if method == "ngram":
        return NgramProposer(**kwargs)
    if method == "suffix":
        return SuffixProposer(**kwargs)
    if method.startswith("draft:"):
        from metroline.engine.draft_model import DraftModelProposer  # a model runner of its own

        return DraftModelProposer.create(method.removeprefix("draft:"), loaded, core, **kwargs)
    raise ValueError(f"unknown speculative method {method!r} (ngram, suffix or draft:MODEL)")
