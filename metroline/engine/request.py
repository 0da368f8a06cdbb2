"""Typed messages of the engine: SamplingParams and RequestHints in, Request inside,
RequestOutput out, EngineStats and EngineInfo for whoever serves the engine."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from metroline.engine.processors import build_processors
from metroline.errors import InvalidRequestError

# A logits processor sees the request's output ids so far and its logits row (1-D float
# tensor) and returns the row to use; see engine/processors.py. Grammars plug in here.
LogitsProcessor = Callable[[Sequence[int], "object"], "object"]

MAX_STOP_CHARS = 4096
MAX_LOGPROBS = 20
MAX_N = 128


def _check(cond: bool, msg: str, param: str) -> None:
    if not cond:
        raise InvalidRequestError(msg, param=param)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token (0: only the chosen token)
    skip_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError, naming the parameter, for any value out of range."""
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}]", "n")
        _check(0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]", "temperature")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be >= 0 (or -1)",
               "top_k")
        _check(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
        _check(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]", "min_p")
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]",
               "repetition_penalty")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]",
               "presence_penalty")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]",
               "frequency_penalty")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens must be >= 1", "max_tokens")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens must be >= 0",
               "min_tokens")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               "min_tokens must not exceed max_tokens", "min_tokens")
        _check(self.logprobs is None
               or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be in [0, {MAX_LOGPROBS}]", "logprobs")
        _check(self.seed is None or isinstance(self.seed, int), "seed must be an integer", "seed")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty",
               "stop")
        _check(len(self.stop) <= 16, "at most 16 stop strings", "stop")
        # A stop string holds its length of text back from streams; past this it is no stop.
        _check(all(len(s) <= MAX_STOP_CHARS for s in self.stop),
               f"a stop string has at most {MAX_STOP_CHARS} characters", "stop")
        for name, ids in (("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", list((self.logit_bias or {}).keys()))):
            for t in ids:
                _check(isinstance(t, int) and t >= 0 and (vocab_size is None or t < vocab_size),
                       f"token id {t!r} in {name} is out of the vocabulary"
                       + (f" (size {vocab_size})" if vocab_size else ""), name)
        for v in (self.logit_bias or {}).values():
            _check(-100.0 <= float(v) <= 100.0, "logit_bias values must be in [-100, 100]",
                   "logit_bias")


@dataclass(frozen=True)
class RequestHints:
    """What a caller may tell the engine about a request besides its prompt and sampling."""

    priority: int = 0  # lower value = served first (as in vLLM); used by policy "priority"
    session_id: str | None = None  # a conversation or agent run, for KV retention
    program_id: str | None = None  # an agent program, for program-level scheduling
    cache_salt: str | None = None  # scopes the prefix cache (a tenant, a secret)
    kv_retention_s: float | None = None  # with session_id: keep this turn's KV pinned
    internal: bool = False  # a health probe: left out of the engine's token and step counts


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}

_arrival_counter = itertools.count()


class Request:
    """One sequence being generated. n > 1 is fanned out into n Requests sharing a group_id."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float | None = None,
        priority: int = 0,
        session_id: str | None = None,
        program_id: str | None = None,
        cache_salt: str | None = None,
        group_id: str | None = None,
        sample_index: int = 0,
        kv_retention_s: float | None = None,
        internal: bool = False,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # Ties in arrival time are broken by submission order.
        self.arrival_seq = next(_arrival_counter)
        self.priority = priority  # lower value = served first (as in vLLM)
        self.session_id = session_id
        # With a session_id: keep this turn's KV pinned this long after it finishes.
        self.kv_retention_s = kv_retention_s
        self.internal = internal  # not counted in the engine's token counters
        self.program_id = program_id
        self.cache_salt = cache_salt
        self.group_id = group_id or request_id
        self.sample_index = sample_index

        # Stateful processors are forked per sample: siblings of n > 1 never share state.
        self.logits_processors = build_processors(sampling_params.logits_processors)
        # Draft tokens proposed for the next step (speculative decoding); verified by the
        # runner in the same forward as the last known token, never part of the output.
        self.spec_token_ids: list[int] = []
        self.spec_probs = None  # their draft distributions ([k, vocab] tensor), if the proposer has them
        self.num_spec_drafted = 0  # drafts verified for this request
        self.num_spec_accepted = 0  # of which accepted
        # The sample's text, detokenized as tokens are appended (set by the engine core).
        self.output_text = None

        self.output_token_ids: list[int] = []
        self.output_logprobs: list = []  # per output token: (logprob, [(id, logprob), ...])
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.first_token_time: float | None = None
        self.error: str | None = None
        self.max_tokens = sampling_params.max_tokens  # resolved by the engine against max_model_len

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list | None = None  # per token: (token_id, logprob, [(id, logprob), ...])


@dataclass
class RequestOutput:
    """A snapshot (or, when streaming, a delta) of one user request's outputs."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    num_spec_accepted_tokens: int = 0  # output tokens that were accepted drafts (all samples)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's gauges and monotonic counters (for metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_blocks: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    pinned_blocks: int = 0
    pinned_sessions: int = 0
    kv_evictions: int = 0
    host_tier_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    spec_draft_tokens: int = 0  # draft tokens verified
    spec_accepted_tokens: int = 0  # of which accepted
    spec_verifications: int = 0  # request-steps that verified drafts
    fast_forward_tokens: int = 0  # tokens a grammar forced (one decode step saved each)
    num_streams: int = 0  # open output streams (AsyncEngine only)


@dataclass(frozen=True)
class EngineInfo:
    """What a server needs to know about the engine it fronts."""

    model_name: str
    max_model_len: int
    vocab_size: int
    device: str
    dtype: str
    num_blocks: int
    block_size: int
    kv_cache_bytes: int = 0
    kv_sizing: str = ""  # how the pool's size was chosen
    attention_backend: str = ""
    kv_cache_dtype: str = ""
    weight_bytes: int = 0  # weight bytes one decode step reads (0: unknown)


@dataclass
class SampledTokens:
    """One request's result of a forward pass.

    token_ids: the accepted draft tokens, then one sampled token (a plain decode: one token;
    k drafts verified: 1..k+1 tokens, so k + 1 - len(token_ids) draft positions were rejected
    and are rolled back). logprobs: per token (token_id, logprob, top alternatives), when the
    request asked for them. error: the request's own failure (its logits processor raised);
    it then finishes alone."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    error: str | None = None


@dataclass
class ModelRunnerOutput:
    """What ModelRunner.execute returns; only Scheduler.update_from_output applies it."""

    outputs: dict[str, SampledTokens] = field(default_factory=dict)

    @classmethod
    def from_token_ids(cls, token_ids: dict[str, list[int]]) -> "ModelRunnerOutput":
        """Tokens only, no logprobs (fake runners in tests and benchmarks)."""
        return cls({rid: SampledTokens(list(ids)) for rid, ids in token_ids.items()})
