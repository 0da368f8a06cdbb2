"""The OpenAI wire format: request bodies (pydantic), the error shape, and the mapping of a
request's sampling fields onto the engine's SamplingParams.

Responses are built as plain dicts where they are produced (openai.py): on the streaming path
that is one dict per token, and pydantic models would only add cost there.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from metroline.engine.request import SamplingParams
from metroline.errors import InvalidRequestError

MAX_PROMPTS = 64  # prompts in one /v1/completions request
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def _reject_surrogates(value: Any, depth: int = 0) -> None:
    # JSON may spell lone UTF-16 surrogates ("\ud800"), which are not text: nothing downstream
    # (tokenizer, UTF-8 output) can handle them, so they are refused at the door.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("invalid_unicode",
                                      "string is not valid Unicode (lone surrogate)") from None
    elif depth < 64 and isinstance(value, dict):
        for k, v in value.items():
            _reject_surrogates(k, depth + 1)
            _reject_surrogates(v, depth + 1)
    elif depth < 64 and isinstance(value, list):
        for v in value:
            _reject_surrogates(v, depth + 1)


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


class _Body(BaseModel):
    # Unknown fields are ignored, as vLLM does: clients send provider-specific extras.
    # NaN and +-Infinity (which Python's JSON parser reads) are refused in every float field.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        _reject_surrogates(data)
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, value: Any) -> Any:
        """Every integer (alone or in a list) fits a signed 64-bit integer: none past that is
        meaningful anywhere, and the engine's tensors and seeds could not hold it."""
        stack = [value]
        while stack:  # lists of lists too (a batch of token-id prompts)
            v = stack.pop()
            if isinstance(v, list):
                stack.extend(v)
            elif type(v) is int and not INT64_MIN <= v <= INT64_MAX:
                raise PydanticCustomError("int64", "must fit in a signed 64-bit integer")
        return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then extensions)."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM's names): every engine sampling parameter is reachable.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Scheduling hints passed through to the engine: lower priority value is served first
    # (with --scheduling-policy priority); cache_salt scopes the prefix cache; with a
    # session_id, kv_retention_s keeps this turn's KV pinned for the next one (seconds);
    # program_id groups an agent program's calls (--scheduling-policy plas serves the program
    # with the least service so far first).
    priority: int = 0
    session_id: str | None = None
    program_id: str | None = None
    cache_salt: str | None = None
    kv_retention_s: float | None = None
    # Structured outputs: OpenAI's response_format, and extensions constraining the output to
    # a regex, a Lark grammar or one of a list of strings (at most one of the four).
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for the legacy endpoint
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    # Extra keys (name, tool_calls, tool_call_id, ...) reach the chat template.
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name for the prompt
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------- sampling parameters

def _or(value, default):
    return default if value is None else value


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        try:
            tid = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}",
                              "logit_bias") from None
        if not math.isfinite(value):
            raise bad_request("logit_bias values must be finite", "logit_bias")
        out[tid] = value
    return out


def to_sampling_params(req: _SamplingRequest, *, max_tokens: int | None,
                       logprobs: int | None, vocab_size: int,
                       param_names: dict[str, str] | None = None) -> SamplingParams:
    """The engine's SamplingParams for a request; raises APIError(400) naming the bad field
    (`param_names` maps engine names onto the request's, e.g. logprobs -> top_logprobs)."""
    params = SamplingParams(
        n=req.n,
        temperature=_or(req.temperature, 1.0),
        top_p=_or(req.top_p, 1.0),
        top_k=_or(req.top_k, 0),
        min_p=_or(req.min_p, 0.0),
        repetition_penalty=_or(req.repetition_penalty, 1.0),
        presence_penalty=_or(req.presence_penalty, 0.0),
        frequency_penalty=_or(req.frequency_penalty, 0.0),
        logit_bias=_logit_bias(req.logit_bias),
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        include_stop_str_in_output=req.include_stop_str_in_output,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )
    if params.top_k < 0:
        raise bad_request("top_k must be >= 0 (or -1 to disable)", "top_k")
    try:
        params.validate(vocab_size)
    except InvalidRequestError as e:
        param, message = renamed_param(e, param_names)
        raise bad_request(message, param, e.code) from None
    return params


def grammar_spec(req: _SamplingRequest):
    """The request's structured-output constraint (metroline.structured.GrammarSpec) or None;
    APIError(400) for a malformed or ambiguous one."""
    from metroline.structured import GrammarError, GrammarSpec

    given = [name for name in ("regex", "grammar", "choice") if getattr(req, name) is not None]
    rf = req.response_format
    kind = rf.get("type") if isinstance(rf, dict) else None
    if rf is not None and (not isinstance(rf, dict) or kind not in ("text", "json_object", "json_schema")):
        raise bad_request("response_format.type must be one of text, json_object, json_schema", "response_format")
    if kind in ("json_object", "json_schema"):
        given.insert(0, "response_format")
    if len(given) > 1:
        raise bad_request(f"give at most one of response_format (json), regex, grammar, choice; got "
                          f"{', '.join(given)}", given[1])
    try:
        if kind == "json_object":
            return GrammarSpec.json_object()
        if kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
            return GrammarSpec.json_schema(js["schema"])
        if req.regex is not None:
            return GrammarSpec.regex(req.regex)
        if req.grammar is not None:
            return GrammarSpec.lark(req.grammar)
        if req.choice is not None:
            return GrammarSpec.choice(req.choice)
    except GrammarError as e:
        raise bad_request(str(e), given[0]) from None
    return None


def renamed_param(e: InvalidRequestError, param_names: dict[str, str] | None) -> tuple[str | None, str]:
    """The engine's error in the request's own words: its parameter renamed (engine names
    such as `prompt`, `max_tokens`, `logprobs` onto e.g. `messages`, `max_completion_tokens`,
    `top_logprobs`), in `param` and in the message."""
    new = (param_names or {}).get(e.param)
    if not new:
        return e.param, str(e)
    if e.param == "prompt":  # also a plain word in the engine's messages: keep them as they are
        return new, str(e)
    return new, re.sub(rf"\b{re.escape(e.param)}\b", new, str(e))

