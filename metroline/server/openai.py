"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, and
vLLM's /tokenize and /detokenize.

Each generation request: validate (400 before anything reaches the engine) -> tokenize ->
Run.start() (submission errors still become an HTTP status) -> one JSON body, or SSE chunks
ending in `data: [DONE]` (or an error event, then [DONE], when the run fails midway).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from metroline.engine.request import RequestHints
from metroline.errors import InvalidRequestError
from metroline.structured import GrammarError, GrammarSpec, available, compile_grammar
from metroline.structured.tools import (ToolCallStreamParser, parse_tool_calls, parse_tools, render_messages,
                                        resolve_tool_choice, tool_call_grammar)
from metroline.server.protocol import (CHAT_ROLES, MAX_PROMPTS, APIError, ChatCompletionRequest,
                                       ChatMessage, CompletionRequest, DetokenizeRequest,
                                       TokenizeRequest, bad_request, grammar_spec, to_sampling_params)
from metroline.server.runs import ClientDisconnected, Run

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"
_LONG_TEXT = 16384  # characters: tokenize longer texts off the event loop
_MIN_LOGPROB = -9999.0  # JSON has no -inf (a masked token's logprob)


class _SSEResponse(StreamingResponse):
    """An SSE stream that releases its Run however the response ends, even when the body
    iterator never started (a client gone before the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], run: Run):
        super().__init__(content, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.close()


def _state(request: Request):
    return request.app.state.metroline


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _constrain(state, body, params, tool_grammar: str | None = None) -> None:
    """Compile the request's grammar, if any, at admission (off the event loop; cached by
    text) and hand the engine its logits processor. A bad grammar is a 400 here, never an
    error inside the engine loop."""
    spec = grammar_spec(body)
    if tool_grammar is not None:
        if spec is not None:
            raise bad_request("tools (with tool_choice other than none) cannot be combined with "
                              "response_format, regex, grammar or choice", "tool_choice")
        spec = GrammarSpec.lark(tool_grammar)
    if spec is None:
        return

    ok, why = available()
    if not ok:
        raise bad_request(f"structured outputs are not available: {why}", "response_format")
    param = ("tools" if tool_grammar is not None else "response_format" if spec.kind.startswith("json")
             else {"lark": "grammar"}.get(spec.kind, spec.kind))
    try:
        compiled = await asyncio.to_thread(compile_grammar, state.tokenizer, spec)
    except GrammarError as e:
        raise bad_request(str(e), param) from None
    params.logits_processors = [*params.logits_processors, compiled.processor()]


def _check_model(state, model: str | None) -> str:
    if model is None or model in state.model_names:
        return model or state.model_names[0]
    raise APIError(404, f"the model {model!r} does not exist; served: {list(state.model_names)}",
                   "invalid_request_error", "model", "model_not_found")


async def _encode(state, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) > _LONG_TEXT:
        return await asyncio.to_thread(state.tokenizer.encode, text, add_special_tokens)
    return state.tokenizer.encode(text, add_special_tokens)


def tenant_scoped(request: Request, name: str | None) -> str | None:
    """Prefix a cache salt or session id with the caller's tenant (its API key), so one
    tenant can never hit, pin or release another's cached KV."""
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:
        return name
    return f"{tenant}/{name or ''}"


def _hints(body, request: Request) -> RequestHints:
    return RequestHints(
        priority=body.priority,
        session_id=tenant_scoped(request, body.session_id) if body.session_id else None,
        program_id=tenant_scoped(request, body.program_id) if body.program_id else None,
        cache_salt=tenant_scoped(request, body.cache_salt),
        kv_retention_s=body.kv_retention_s)


def _usage(run: Run, prompts: list[list[int]]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(run.num_output_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(run.num_cached_tokens)},
            # Output tokens that were speculative drafts the model accepted (OpenAI's field for
            # predicted outputs; drafts rejected are not billed, so their count is 0).
            "completion_tokens_details": {"accepted_prediction_tokens": sum(run.num_accepted_draft_tokens),
                                          "rejected_prediction_tokens": 0}}


# ---------------------------------------------------------------------------- logprobs

def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (each byte shown as a printable character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _byte_decoder()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """Per token id: its text (as logprobs show it) and its exact bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, tid: int) -> tuple[str, list[int]]:
        hit = self._cache.get(tid)
        if hit is None:
            text = self.tokenizer.decode([tid], skip_special_tokens=False)
            raw = text.encode()
            if "\ufffd" in text:  # part of a multi-byte character: recover the token's bytes
                piece = self.tokenizer.id_to_token(tid)
                m = _BYTE_PIECE.fullmatch(piece)
                if m:
                    raw = bytes([int(m.group(1), 16)])
                elif all(ch in _BYTE_DECODER for ch in piece):
                    raw = bytes(_BYTE_DECODER[ch] for ch in piece)
            hit = self._cache[tid] = (text, list(raw))
        return hit


def _lp(x: float) -> float:
    return x if x > _MIN_LOGPROB else _MIN_LOGPROB  # also maps NaN


def _chat_logprobs(texts: TokenTexts, entries) -> dict:
    content = []
    for tid, lp, top in entries:
        text, raw = texts.get(tid)
        content.append({"token": text, "logprob": _lp(lp), "bytes": raw,
                        "top_logprobs": [{"token": (t := texts.get(i))[0], "logprob": _lp(v),
                                          "bytes": t[1]} for i, v in top]})
    return {"content": content, "refusal": None}


def _completion_logprobs(texts: TokenTexts, entries, offset: int) -> tuple[dict, int]:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp, top in entries:
        text = texts.get(tid)[0]
        tokens.append(text)
        token_lps.append(_lp(lp))
        alts = {texts.get(i)[0]: _lp(v) for i, v in top}
        alts.setdefault(text, _lp(lp))  # OpenAI: the sampled token is always among them
        tops.append(alts)
        offsets.append(offset)
        offset += len(text)
    return ({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
             "text_offset": offsets}, offset)


def _merge_completion_logprobs(acc: dict | None, new: dict) -> dict:
    if acc is None:
        return new
    for k in acc:
        acc[k].extend(new[k])
    return acc


def _texts(state) -> TokenTexts:
    texts = getattr(state, "token_texts", None)
    if texts is None:
        texts = state.token_texts = TokenTexts(state.tokenizer)
    return texts


# ---------------------------------------------------------------------------- models

def _model_card(state, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "metroline",
            "root": state.source_name, "parent": None, "max_model_len": state.max_model_len}


async def list_models(request: Request) -> dict:
    state = _state(request)
    return {"object": "list", "data": [_model_card(state, n) for n in state.model_names]}


async def retrieve_model(model: str, request: Request) -> dict:
    state = _state(request)
    return _model_card(state, _check_model(state, model))


# ---------------------------------------------------------------------------- tokenizer

def _render_chat(state, messages: list[ChatMessage], add_generation_prompt: bool,
                 extra: dict | None = None, tools: list | None = None, use_tools: bool = False) -> str:
    if not messages:
        raise bad_request("messages must contain at least one message", "messages")
    chat = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role {m.role!r} is not supported; use one of "
                              f"{sorted(CHAT_ROLES)}", f"messages.{i}.role", "invalid_role")
        msg = m.model_dump(exclude_none=True)
        if m.role == "developer":  # OpenAI's newer name for the system role
            msg["role"] = "system"
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}]: only text content parts are supported",
                                      f"messages.{i}.content", "unsupported_content")
                parts.append(part["text"])
            msg["content"] = "\n".join(parts)
        chat.append(msg)
    if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in chat):
        chat = render_messages(chat, tools or [], use_tools)  # the documented tool-call format
    kwargs = dict(extra or {})
    clash = {"messages", "add_generation_prompt", "tools"} & kwargs.keys()
    if clash:
        raise bad_request(f"chat_template_kwargs may not set {sorted(clash)}",
                          "chat_template_kwargs")
    try:
        return state.tokenizer.apply_chat_template(
            chat, add_generation_prompt=add_generation_prompt, **kwargs)
    except InvalidRequestError as e:  # ChatTemplateError: a role or message it cannot render
        raise bad_request(f"the chat template cannot render these messages: {e}",
                          e.param or "messages", e.code or "invalid_chat_template") from None


async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = _state(request)
    _check_model(state, body.model)
    if body.messages is not None:
        text = _render_chat(state, body.messages, body.add_generation_prompt)
        ids = await _encode(state, text, False)
    else:
        text = body.prompt if body.prompt is not None else body.content
        if text is None:
            raise bad_request("give 'prompt' (or 'content') or 'messages'", "prompt")
        ids = await _encode(state, text, body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}


async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = _state(request)
    _check_model(state, body.model)
    vocab = state.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": state.tokenizer.decode(body.tokens)}


# ---------------------------------------------------------------------------- completions

async def _completion_prompts(state, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    out = []
    for p in prompt:
        out.append(await _encode(state, p, True) if isinstance(p, str) else list(p))
    return out


async def create_completion(body: CompletionRequest, request: Request):
    arrival = time.monotonic()
    state = _state(request)
    try:
        state.check_admitting()
        model = _check_model(state, body.model)
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        if body.echo and body.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (no prompt logprobs)", "echo")
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        params = to_sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs,
                                    vocab_size=state.vocab_size)
        await _constrain(state, body, params)
        prompts = await _completion_prompts(state, body.prompt)
        if len(prompts) * params.n > 128:
            raise bad_request("len(prompt) * n must be at most 128", "n")
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        want_lp = body.logprobs is not None
        texts = _texts(state) if want_lp else None
        run = Run(state, request, prompts, params, _hints(body, request), arrival=arrival, prefix="cmpl")
        await run.start()
        # After the engine admitted the prompts: their ids are checked there, before any decode.
        echo = [state.tokenizer.decode(p) for p in prompts] if body.echo else None
    except APIError as e:
        state.metrics.count_error(e.code)
        raise
    if body.stream:
        gen = _completion_stream(state, run, prompts, rid, created, model, n, echo, texts,
                                 body.stream_options is not None
                                 and body.stream_options.include_usage)
        return _SSEResponse(gen, run)

    k = len(prompts) * n
    pieces: list[list[str]] = [[] for _ in range(k)]
    finish: list[str | None] = [None] * k
    stop_reason: list = [None] * k
    logprobs: list[dict | None] = [None] * k
    offsets = [len(echo[c // n]) if echo else 0 for c in range(k)]
    try:
        async for i, out in run.events():
            for o in out.outputs:
                c = i * n + o.index
                pieces[c].append(o.text)
                if o.finish_reason:
                    finish[c], stop_reason[c] = o.finish_reason, o.stop_reason
                if want_lp and o.logprobs is not None:
                    lp, offsets[c] = _completion_logprobs(texts, o.logprobs, offsets[c])
                    logprobs[c] = _merge_completion_logprobs(logprobs[c], lp)
    except APIError as e:
        state.metrics.count_error(e.code)
        raise
    finally:
        run.close()
    if want_lp:  # an empty completion still has the (empty) structure
        logprobs = [lp or {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                           "text_offset": []} for lp in logprobs]
    choices = [{"index": c, "text": (echo[c // n] if echo else "") + "".join(pieces[c]),
                "logprobs": logprobs[c], "finish_reason": finish[c],
                "stop_reason": stop_reason[c]} for c in range(k)]
    return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                         "model": model, "choices": choices, "usage": _usage(run, prompts)})


async def _sse_stream(state, run: Run, prompts, base: dict, include_usage: bool,
                      choices: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """The SSE framing both endpoints share: one chunk per choice delta, the usage chunk,
    [DONE]; an error after the headers went out becomes an error event; the run always ends."""
    if include_usage:
        base = {**base, "usage": None}
    try:
        async for choice in choices:
            yield _sse({**base, "choices": [choice]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(run, prompts)})
        yield _DONE
    except ClientDisconnected:
        return
    except APIError as e:
        state.metrics.count_error(e.code)
        yield _sse(e.body())
        yield _DONE
    finally:
        run.close()


def _with_stop_reason(choice: dict, o) -> dict:
    if o.finish_reason:
        choice["stop_reason"] = o.stop_reason
    return choice


async def _completion_choices(run: Run, n: int, echo, texts: TokenTexts | None,
                              num_choices: int) -> AsyncIterator[dict]:
    offsets = [len(echo[c // n]) if echo else 0 for c in range(num_choices)]
    if echo:
        for c in range(num_choices):
            yield {"index": c, "text": echo[c // n], "logprobs": None, "finish_reason": None}
    async for i, out in run.events():
        for o in out.outputs:
            if not (o.text or o.finish_reason or o.logprobs):
                continue
            c = i * n + o.index
            lp = None
            if texts is not None and o.logprobs is not None:
                lp, offsets[c] = _completion_logprobs(texts, o.logprobs, offsets[c])
            yield _with_stop_reason({"index": c, "text": o.text, "logprobs": lp,
                                     "finish_reason": o.finish_reason}, o)


def _completion_stream(state, run: Run, prompts, rid, created, model, n, echo,
                       texts: TokenTexts | None, include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    return _sse_stream(state, run, prompts, base, include_usage,
                       _completion_choices(run, n, echo, texts, len(prompts) * n))


# ---------------------------------------------------------------------------- chat

async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    arrival = time.monotonic()
    state = _state(request)
    try:
        state.check_admitting()
        model = _check_model(state, body.model)
        try:
            tools = parse_tools(body.tools)
            tool_mode, tool_name = resolve_tool_choice(body.tool_choice, tools)
        except GrammarError as e:
            raise bad_request(str(e), e.param) from None
        use_tools = bool(tools) and tool_mode != "none"
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        param_names = {"logprobs": "top_logprobs", "prompt": "messages"} | (
            {"max_tokens": "max_completion_tokens"} if body.max_completion_tokens is not None
            else {})
        params = to_sampling_params(body, max_tokens=max_tokens, logprobs=logprobs,
                                    vocab_size=state.vocab_size, param_names=param_names)
        await _constrain(state, body, params, tool_grammar=(
            tool_call_grammar(tools, tool_mode, tool_name, body.parallel_tool_calls is not False)
            if use_tools else None))
        text = _render_chat(state, body.messages, body.add_generation_prompt,
                            body.chat_template_kwargs, tools, use_tools)
        prompt = await _encode(state, text, False)
        rid, created, n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        texts = _texts(state) if body.logprobs else None
        run = Run(state, request, [prompt], params, _hints(body, request), arrival=arrival,
                  prefix="chatcmpl", param_names=param_names)
        await run.start()
    except APIError as e:
        state.metrics.count_error(e.code)
        raise
    if body.stream:
        gen = _chat_stream(state, run, [prompt], rid, created, model, n, texts,
                           body.stream_options is not None and body.stream_options.include_usage, use_tools)
        return _SSEResponse(gen, run)

    pieces: list[list[str]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    stop_reason: list = [None] * n
    entries: list[list] = [[] for _ in range(n)]
    try:
        async for _, out in run.events():
            for o in out.outputs:
                pieces[o.index].append(o.text)
                if o.finish_reason:
                    finish[o.index], stop_reason[o.index] = o.finish_reason, o.stop_reason
                if o.logprobs:
                    entries[o.index].extend(o.logprobs)
    except APIError as e:
        state.metrics.count_error(e.code)
        raise
    finally:
        run.close()
    choices = []
    for c in range(n):
        message = {"role": "assistant", "content": "".join(pieces[c])}
        if use_tools:
            content, calls = parse_tool_calls(message["content"])
            if calls:  # only whole calls: one cut short by max_tokens stays text
                message = {"role": "assistant", "content": content or None,
                           "tool_calls": [call.to_openai() for call in calls]}
                if finish[c] == "stop":
                    finish[c] = "tool_calls"
        choices.append({"index": c, "message": message,
                        "logprobs": _chat_logprobs(texts, entries[c]) if texts is not None else None,
                        "finish_reason": finish[c], "stop_reason": stop_reason[c]})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                         "model": model, "choices": choices, "usage": _usage(run, [prompt])})


async def _chat_choices(run: Run, n: int, texts: TokenTexts | None, use_tools: bool = False) -> AsyncIterator[dict]:
    for c in range(n):
        yield {"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
               "finish_reason": None}
    parsers = [ToolCallStreamParser() for _ in range(n)] if use_tools else None
    async for _, out in run.events():
        for o in out.outputs:
            if not (o.text or o.finish_reason or o.logprobs):
                continue
            lp = _chat_logprobs(texts, o.logprobs) if texts is not None and o.logprobs else None
            if parsers is None:
                yield _with_stop_reason({"index": o.index, "delta": {"content": o.text} if o.text else {},
                                         "logprobs": lp, "finish_reason": o.finish_reason}, o)
                continue
            # Tool calls: text outside the tags streams as content; a call as OpenAI deltas, its
            # id and name first, then its arguments in pieces as the model writes them.
            parser = parsers[o.index]
            content, pieces = parser.feed(o.text)
            if o.finish_reason:
                rest, _ = parser.finish()  # text held back; a call cut short stays unfinished
                content += rest
            delta: dict = {}
            if content:
                delta["content"] = content
            if pieces:  # one entry per call in a delta: its pieces joined
                merged: dict[int, dict] = {}
                for p in pieces:
                    d = p.to_openai()
                    if p.index in merged:
                        merged[p.index]["function"]["arguments"] += p.arguments
                    else:
                        merged[p.index] = d
                delta["tool_calls"] = list(merged.values())
            finish = o.finish_reason
            if finish == "stop" and parser.calls:
                finish = "tool_calls"
            if delta or finish or lp:
                yield _with_stop_reason({"index": o.index, "delta": delta, "logprobs": lp,
                                         "finish_reason": finish}, o)


def _chat_stream(state, run: Run, prompts, rid, created, model, n,
                 texts: TokenTexts | None, include_usage: bool, use_tools: bool = False) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    return _sse_stream(state, run, prompts, base, include_usage, _chat_choices(run, n, texts, use_tools))


async def delete_session(session_id: str, request: Request) -> dict:
    """Release the KV a session keeps pinned between turns (see kv_retention_s)."""
    state = _state(request)
    if not await state.engine.release_session(tenant_scoped(request, session_id)):
        raise APIError(404, f"no retained KV for session {session_id!r}", "invalid_request_error",
                       "session_id", "session_not_found")
    return {"id": session_id, "object": "session", "deleted": True}


def add_routes(app: FastAPI) -> None:
    """Register the routes directly on the app, so app.routes is the whole, flat route table
    (the auth test walks it)."""
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", retrieve_model, methods=["GET"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    app.add_api_route("/v1/sessions/{session_id}", delete_session, methods=["DELETE"])
