"""Every check of a request's input, in one place: the engine's boundary (EngineCore.add_request).

Whatever calls the engine (the HTTP server, the CLI, LLM.generate, an agent) gets the same
InvalidRequestError, with the same wording and the engine's parameter names (`prompt`,
`max_tokens`, ...); a front end renames the parameter to what its user sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from metroline.engine.request import RequestHints, SamplingParams
from metroline.errors import InvalidRequestError

MAX_KV_RETENTION_S = 24 * 3600


@dataclass(frozen=True)
class EngineLimits:
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int  # every block of the KV pool
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True
    max_queued_requests: int | None = None  # the waiting queue's bound (None: unbounded)


def validate_request(prompt_token_ids: Sequence[int], params: SamplingParams,
                     hints: RequestHints, limits: EngineLimits) -> int:
    """Raise InvalidRequestError for anything that can never be served; return the request's
    max_tokens, resolved against the context length."""
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    vocab = limits.vocab_size
    if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})",
                                  param="prompt")
    params.validate(vocab)
    if limits.max_queued_requests is not None and params.n > limits.max_queued_requests:
        # Every sample waits in the queue at first: more than it holds can never be admitted, and
        # a 429 would send the client into retries that cannot succeed.
        raise InvalidRequestError(
            f"n={params.n} samples can never be queued at once: the queue holds "
            f"{limits.max_queued_requests} requests", param="n", code="n_exceeds_queue")
    if hints.kv_retention_s is not None and not 0 <= hints.kv_retention_s <= MAX_KV_RETENTION_S:
        raise InvalidRequestError(f"kv_retention_s must be in [0, {MAX_KV_RETENTION_S}]",
                                  param="kv_retention_s")
    if not isinstance(hints.priority, int):
        raise InvalidRequestError("priority must be an integer", param="priority")
    limit = limits.max_model_len
    if n >= limit:
        raise InvalidRequestError(
            f"this model's maximum context length is {limit} tokens, but the prompt has {n} "
            f"tokens (the prompt and at least one generated token must fit)",
            param="prompt", code="context_length_exceeded")
    if n + 1 > limits.kv_capacity_tokens:
        raise InvalidRequestError(
            f"the KV cache holds {limits.kv_capacity_tokens} tokens, but the prompt has {n} "
            f"tokens (the prompt and at least one generated token must fit)",
            param="prompt", code="context_length_exceeded")
    if not limits.enable_chunked_prefill and n > limits.max_num_batched_tokens:
        raise InvalidRequestError(
            f"the prompt has {n} tokens, more than max_num_batched_tokens="
            f"{limits.max_num_batched_tokens}, and chunked prefill is disabled",
            param="prompt", code="context_length_exceeded")
    max_tokens = params.max_tokens or (limit - n)
    if n + max_tokens > limit:
        raise InvalidRequestError(
            f"this model's maximum context length is {limit} tokens, but {n} prompt tokens + "
            f"{max_tokens} max_tokens were requested",
            param="max_tokens", code="context_length_exceeded")
    return max_tokens
