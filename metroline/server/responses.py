"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A request's `input` (a string, or a list of items: messages, function calls and their outputs)
becomes the same chat as /v1/chat/completions renders (tools in the documented format of
structured/tools.py, the call grammar at admission); the output is read back into items, a
message (`output_text`) and/or `function_call`s, by one `_Output` state machine that the
streaming and the non-streaming paths share, so both give the same response.

With `store` (the default) the response is saved with its input items in the RunStore
(SQLite), so `previous_response_id` rebuilds the conversation, also after a restart. When the
server has several API keys (tenants), stored ids are scoped by the caller's tenant: one
tenant can neither read nor continue another's responses.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from metroline.structured import GrammarError
from metroline.structured.tools import OPEN, ToolCallStreamParser, parse_tools, resolve_tool_choice, tool_call_grammar
from metroline.server.openai import (_SSEResponse, _check_model, _constrain, _encode, _hints,
                                     _render_chat, _state, tenant_scoped)
from metroline.server.protocol import APIError, ChatMessage, _SamplingRequest, bad_request, to_sampling_params
from metroline.server.runs import ClientDisconnected, Run

__all__ = ["ResponsesRequest", "add_routes"]

_MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
# Fields of OpenAI's request that would change what is generated and that cannot be honoured.
_UNSUPPORTED = {"background": "background responses are not supported",
                "conversation": "conversations are not supported; use previous_response_id",
                "prompt": "prompt templates are not supported"}
_PARAM_NAMES = {"max_tokens": "max_output_tokens", "prompt": "input"}


class ResponsesRequest(_SamplingRequest):
    """The body of POST /v1/responses (OpenAI's fields; the extensions of the chat endpoint,
    e.g. top_k, seed, stop, session_id, also apply)."""

    input: Any = None  # a string or a list of items: checked by _normalize_input
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    max_output_tokens: int | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    truncation: str | None = None
    # Accepted and ignored: they ask for nothing the output depends on here.
    include: list[Any] | None = None
    reasoning: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    # Refused (see _UNSUPPORTED) when set.
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------- the store

async def _in_store(state, method: str, *args):
    """Call a store method off the event loop (SQLite commits with synchronous=FULL)."""
    def call():
        return getattr(state.store, method)(*args)
    return await asyncio.to_thread(call)


def _key(request: Request, response_id: str) -> str:
    return tenant_scoped(request, response_id)


async def _load(state, request: Request, response_id: str) -> dict | None:
    data = await _in_store(state, "get_response", _key(request, response_id))
    if not isinstance(data, dict) or "response" not in data:
        return None  # not one of ours (or another tenant's: its key differs)
    return data


# ---------------------------------------------------------------------------- input items

def _text_of(content, where: str) -> tuple[str, list[dict]]:
    """(text, normalized parts) of a message's content: a string or text parts."""
    if isinstance(content, str):
        return content, [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts, parts = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            parts.append({"type": "output_text", "text": part["refusal"], "annotations": []})
            continue
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}]: only text content parts (input_text, output_text) are "
                              f"supported, got {kind!r}", f"{where}.content", "unsupported_content")
        texts.append(part["text"])
        parts.append({"type": "output_text", "text": part["text"], "annotations": []} if kind == "output_text"
                     else {"type": "input_text", "text": part["text"]})
    return "\n".join(texts), parts


def _normalize_input(raw, param: str = "input") -> list[dict]:
    """The request's input as stored items (ids given to those without one); 400 for a shape
    this server does not take."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"type": "message", "id": _new_id("msg"), "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": raw}]}]
    if not isinstance(raw, list):
        raise bad_request(f"{param} must be a string or a list of input items", param)
    items = []
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", param)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise bad_request(f"{where}.role must be one of {sorted(_MESSAGE_ROLES)}, got {role!r}",
                                  f"{where}.role", "invalid_role")
            _, parts = _text_of(item.get("content"), where)
            if role == "assistant":
                parts = [{"type": "output_text", "text": p["text"], "annotations": []} for p in parts]
            items.append({"type": "message", "id": item.get("id") or _new_id("msg"), "role": role,
                          "status": "completed", "content": parts})
        elif kind == "function_call":
            call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
            if not (isinstance(call_id, str) and call_id and isinstance(name, str) and name
                    and isinstance(args, str)):
                raise bad_request(f"{where}: a function_call needs call_id, name and arguments (strings)", param)
            items.append({"type": "function_call", "id": item.get("id") or _new_id("fc"), "call_id": call_id,
                          "name": name, "arguments": args, "status": "completed"})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise bad_request(f"{where}: a function_call_output needs a call_id", param)
            if isinstance(output, list):
                output, _ = _text_of(output, where)
            elif not isinstance(output, str):
                raise bad_request(f"{where}.output must be a string or a list of text parts", f"{where}.output")
            items.append({"type": "function_call_output", "id": item.get("id") or _new_id("fco"),
                          "call_id": call_id, "output": output, "status": "completed"})
        elif kind == "reasoning":
            continue  # reasoning items of another model: nothing this one can use
        else:
            raise bad_request(f"{where}: input items of type {kind!r} are not supported (message, function_call, "
                              f"function_call_output are)", param, "unsupported_input_item")
    return items


def _messages(items: list[dict]) -> list[dict]:
    """Items -> chat messages (function calls as the assistant's tool_calls, outputs as tool
    messages), in the form _render_chat takes."""
    out: list[dict] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = "\n".join(p.get("text", "") for p in item["content"])
            out.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return out


# ---------------------------------------------------------------------------- tools, format

def _tools(raw) -> tuple[list[dict], list[dict]]:
    """(the tools as the response echoes them, the same in the chat shape parse_tools takes)."""
    echo, chat = [], []
    for i, t in enumerate(raw or []):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise bad_request(f"tools[{i}]: tools of type {kind!r} are not supported; only function tools are",
                              "tools", "unsupported_tool")
        echo.append({"type": "function", "name": t.get("name"), "description": t.get("description"),
                     "parameters": t.get("parameters"), "strict": t.get("strict", True)})
        chat.append({"type": "function", "function": {"name": t.get("name"), "description": t.get("description"),
                                                      "parameters": t.get("parameters")}})
    return echo, chat


def _tool_choice(raw) -> Any:
    """Responses' tool_choice -> the chat shape (a named function nests its name)."""
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function":
        return {"type": "function", "function": {"name": raw.get("name")}}
    kind = raw.get("type") if isinstance(raw, dict) else raw
    raise bad_request(f"tool_choice {kind!r} is not supported: use 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"name\": ...}", "tool_choice")


def _text_format(text: dict | None) -> tuple[dict, dict | None]:
    """(text.format as echoed, the chat endpoint's response_format for it or None)."""
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return fmt, None
    if kind == "json_object":
        return fmt, {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request("text.format json_schema needs a schema (a JSON schema object)", "text.format")
        return fmt, {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt["schema"]}}
    raise bad_request("text.format.type must be one of text, json_object, json_schema", "text.format")


def _renamed(e: APIError) -> APIError:
    if e.param == "response_format":
        return APIError(e.status, e.message.replace("response_format", "text.format"), e.type, "text.format",
                        e.code, e.headers)
    return e


# ---------------------------------------------------------------------------- output items

class _Output:
    """Output deltas -> output items, and the stream events that build them (each an event
    type and its payload, without sequence numbers). Text outside tool calls is one message
    item per stretch of text; each call is a function_call item whose arguments stream as
    the model writes them; a call cut short ends `incomplete`."""

    def __init__(self, use_tools: bool):
        self.items: list[dict] = []
        self.parser = ToolCallStreamParser() if use_tools else None
        self._msg: dict | None = None  # the open message item
        self._pending_ws = ""  # whitespace not yet known to start a message
        self._calls: dict[int, dict] = {}  # parser call index -> its open item
        self._done_calls = 0

    def feed(self, text: str) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        if self.parser is None:
            self._text(text, events)
            return events
        content, pieces = self.parser.feed(text)
        self._text(content, events)  # the grammar allows no text after a call
        for p in pieces:
            if p.id is not None:
                self._close_message(events, "completed")
                self._pending_ws = ""
                item = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                        "call_id": p.id, "name": p.name}
                self._calls[p.index] = item
                self._open(item, events)
            item = self._calls.get(p.index)
            if item is not None and p.arguments:
                item["arguments"] += p.arguments
                events.append(("response.function_call_arguments.delta",
                               {"item_id": item["id"], "output_index": self._index(item), "delta": p.arguments}))
        for call in self.parser.calls[self._done_calls:]:
            self._done_calls += 1
            item = next((it for it in self._calls.values() if it["call_id"] == call.id), None)
            if item is None:
                continue
            item["arguments"] = call.arguments
            item["status"] = "completed"
            events.append(("response.function_call_arguments.done",
                           {"item_id": item["id"], "output_index": self._index(item), "arguments": call.arguments}))
            events.append(("response.output_item.done", {"output_index": self._index(item), "item": dict(item)}))
            self._calls = {k: v for k, v in self._calls.items() if v is not item}
        return events

    def finish(self, truncated: bool) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        if self.parser is not None:
            rest, _ = self.parser.finish()
            head = rest.lstrip()[:len(OPEN)]
            if not (head and OPEN.startswith(head)):  # else a call cut short before its name: no text
                self._text(rest, events)
            for item in self._calls.values():  # cut short: never a call to run
                item["status"] = "incomplete"
                events.append(("response.output_item.done", {"output_index": self._index(item), "item": dict(item)}))
            self._calls = {}
        if not self.items:  # an output of nothing (or only whitespace) is one message
            self._text(self._pending_ws, events, force=True)
        self._close_message(events, "incomplete" if truncated else "completed")
        return events

    # ------------------------------------------------------------------ internals

    def _index(self, item: dict) -> int:
        return next(i for i, it in enumerate(self.items) if it is item)

    def _open(self, item: dict, events) -> None:
        self.items.append(item)
        events.append(("response.output_item.added", {"output_index": len(self.items) - 1, "item": dict(item)}))

    def _text(self, text: str, events, force: bool = False) -> None:
        if not text and not force:
            return
        if self._msg is None:
            if not text.strip() and not force:
                self._pending_ws += text
                return
            text, self._pending_ws = self._pending_ws + text, ""
            self._msg = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "content": [],
                         "role": "assistant"}
            self._open(self._msg, events)
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
            self._msg["content"].append(part)
            events.append(("response.content_part.added", {"item_id": self._msg["id"],
                                                           "output_index": self._index(self._msg),
                                                           "content_index": 0, "part": dict(part)}))
        if text:
            self._msg["content"][0]["text"] += text
            events.append(("response.output_text.delta", {"item_id": self._msg["id"],
                                                          "output_index": self._index(self._msg),
                                                          "content_index": 0, "delta": text, "logprobs": []}))

    def _close_message(self, events, status: str) -> None:
        msg = self._msg
        if msg is None:
            return
        self._msg = None
        where = {"item_id": msg["id"], "output_index": self._index(msg), "content_index": 0}
        part = msg["content"][0]
        events.append(("response.output_text.done", {**where, "text": part["text"], "logprobs": []}))
        events.append(("response.content_part.done", {**where, "part": dict(part)}))
        msg["status"] = status
        events.append(("response.output_item.done", {"output_index": where["output_index"], "item": _copy(msg)}))


def _copy(item: dict) -> dict:
    return json.loads(json.dumps(item))


# ---------------------------------------------------------------------------- the route

class _Ctx:
    """What one request's response object is built from."""

    def __init__(self, body: ResponsesRequest, model: str, tools_echo: list[dict], fmt: dict):
        self.id = _new_id("resp")
        self.created = int(time.time())
        self.body, self.model, self.tools, self.fmt = body, model, tools_echo, fmt
        self.prompt: list[int] = []
        self.run: Run | None = None
        self.input_items: list[dict] = []

    def response(self, status: str, output: list[dict], usage: dict | None = None,
                 incomplete: dict | None = None, error: dict | None = None) -> dict:
        b = self.body
        tc = b.tool_choice if b.tool_choice is not None else "auto"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": error, "incomplete_details": incomplete,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "max_tool_calls": None,
                "model": self.model, "output": output,
                "parallel_tool_calls": b.parallel_tool_calls is not False,
                "previous_response_id": b.previous_response_id,
                "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
                "store": b.store is not False,
                "temperature": b.temperature if b.temperature is not None else 1.0,
                "text": {"format": self.fmt}, "tool_choice": tc, "tools": self.tools,
                "top_p": b.top_p if b.top_p is not None else 1.0,
                "truncation": b.truncation or "disabled", "usage": usage, "user": b.user,
                "metadata": b.metadata or {}}

    def usage(self) -> dict:
        run = self.run
        out = sum(run.num_output_tokens)
        return {"input_tokens": len(self.prompt), "output_tokens": out, "total_tokens": len(self.prompt) + out,
                "input_tokens_details": {"cached_tokens": sum(run.num_cached_tokens), "cache_write_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}}

    def final(self, output: _Output, truncated: bool) -> dict:
        status = "incomplete" if truncated else "completed"
        incomplete = {"reason": "max_output_tokens"} if truncated else None
        resp = self.response(status, _copy(output.items), self.usage(), incomplete)
        if status == "completed":
            resp["completed_at"] = int(time.time())
        return resp


async def _save(state, request: Request, ctx: _Ctx, resp: dict) -> None:
    if ctx.body.store is False:
        return
    prev = ctx.body.previous_response_id
    prev_key = _key(request, prev) if prev else None
    data = {"previous_response_id": prev_key, "response": resp, "input": ctx.input_items}
    await _in_store(state, "save_response", _key(request, ctx.id), prev_key, data)


async def _conversation(state, request: Request, body: ResponsesRequest) -> tuple[list[dict], list[dict]]:
    """(this request's input items, the chat messages of the whole conversation)."""
    items = _normalize_input(body.input)
    history: list[dict] = []
    if body.previous_response_id is not None:
        prev = await _load(state, request, body.previous_response_id)
        if prev is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           "invalid_request_error", "previous_response_id", "previous_response_not_found")
        chain = await _in_store(state, "response_chain", _key(request, body.previous_response_id))
        for data in chain:
            history += data.get("input") or []
            history += [it for it in data["response"].get("output") or []
                        if it.get("type") != "function_call" or it.get("status") == "completed"]
    messages = _messages(history + items)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    if not any(m["role"] != "system" for m in messages):
        raise bad_request("input must contain at least one message or item", "input")
    return items, messages


async def _prompt(state, body: ResponsesRequest, messages: list[dict], tools, use_tools: bool) -> list[int]:
    """The rendered, tokenized conversation; with truncation 'auto', its oldest turns are
    dropped (system turns kept) until it fits the context with room for the output."""
    room = state.max_model_len - (body.max_output_tokens or 1)
    while True:
        text = _render_chat(state, [ChatMessage(**m) for m in messages], True, None, tools, use_tools)
        prompt = await _encode(state, text, False)
        if body.truncation != "auto" or len(prompt) < room:
            return prompt
        drop = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
        if drop is None or sum(m["role"] != "system" for m in messages) <= 1:
            return prompt  # nothing left to drop: the engine answers 400
        messages = messages[:drop] + messages[drop + 1:]
        while drop < len(messages) and messages[drop]["role"] == "tool":  # no output without its call
            messages.pop(drop)


async def create_response(body: ResponsesRequest, request: Request):
    arrival = time.monotonic()
    state = _state(request)
    try:
        state.check_admitting()
        model = _check_model(state, body.model)
        for name, why in _UNSUPPORTED.items():
            if getattr(body, name):
                raise bad_request(why, name, "unsupported_parameter")
        if body.n != 1:
            raise bad_request("n is not a Responses API parameter; only n=1 is supported", "n")
        if body.truncation not in (None, "auto", "disabled"):
            raise bad_request("truncation must be 'auto' or 'disabled'", "truncation")
        if body.input is None and body.previous_response_id is None:
            raise bad_request("input is required", "input")
        tools_echo, chat_tools = _tools(body.tools)
        try:
            tools = parse_tools(chat_tools)
            tool_mode, tool_name = resolve_tool_choice(_tool_choice(body.tool_choice), tools)
        except GrammarError as e:
            raise bad_request(str(e).replace(".function.", "."), e.param) from None
        use_tools = bool(tools) and tool_mode != "none"
        fmt, response_format = _text_format(body.text)
        params = to_sampling_params(body, max_tokens=body.max_output_tokens, logprobs=None,
                                    vocab_size=state.vocab_size, param_names=_PARAM_NAMES)
        grammar = (tool_call_grammar(tools, tool_mode, tool_name, body.parallel_tool_calls is not False)
                   if use_tools else None)
        try:
            await _constrain(state, body.model_copy(update={"response_format": response_format}), params, grammar)
        except APIError as e:
            raise _renamed(e) from None
        ctx = _Ctx(body, model, tools_echo, fmt)
        ctx.input_items, messages = await _conversation(state, request, body)
        ctx.prompt = await _prompt(state, body, messages, tools, use_tools)
        ctx.run = run = Run(state, request, [ctx.prompt], params, _hints(body, request), arrival=arrival,
                            prefix="resp", param_names=_PARAM_NAMES)
        await run.start()
    except APIError as e:
        state.metrics.count_error(e.code)
        raise
    output = _Output(use_tools)
    if body.stream:
        return _SSEResponse(_stream(state, request, ctx, output), run)
    truncated = False
    try:
        async for _, out in run.events():
            for o in out.outputs:
                output.feed(o.text)
                if o.finish_reason:
                    truncated = o.finish_reason == "length"
        output.finish(truncated)
        resp = ctx.final(output, truncated)
        await _save(state, request, ctx, resp)
    except APIError as e:
        state.metrics.count_error(e.code)
        raise
    finally:
        run.close()
    return JSONResponse(resp)


async def _stream(state, request: Request, ctx: _Ctx, output: _Output) -> AsyncIterator[bytes]:
    seq = 0

    def event(kind: str, payload: dict) -> bytes:
        nonlocal seq
        data = json.dumps({"type": kind, "sequence_number": seq, **payload}, ensure_ascii=False,
                          separators=(",", ":"))
        seq += 1
        return f"event: {kind}\ndata: {data}\n\n".encode()

    run = ctx.run
    try:
        start = ctx.response("in_progress", [])
        yield event("response.created", {"response": start})
        yield event("response.in_progress", {"response": start})
        truncated = False
        async for _, out in run.events():
            for o in out.outputs:
                for kind, payload in output.feed(o.text):
                    yield event(kind, payload)
                if o.finish_reason:
                    truncated = o.finish_reason == "length"
        for kind, payload in output.finish(truncated):
            yield event(kind, payload)
        resp = ctx.final(output, truncated)
        await _save(state, request, ctx, resp)
        yield event("response.incomplete" if truncated else "response.completed", {"response": resp})
    except ClientDisconnected:
        return
    except APIError as e:
        state.metrics.count_error(e.code)
        yield event("error", {"code": e.code, "message": e.message, "param": e.param})
        failed = ctx.response("failed", _copy(output.items),
                              error={"code": "rate_limit_exceeded" if e.status == 429 else "server_error",
                                     "message": e.message})
        yield event("response.failed", {"response": failed})
    finally:
        run.close()


async def retrieve_response(response_id: str, request: Request):
    state = _state(request)
    data = await _load(state, request, response_id)
    if data is None:
        raise _not_found(response_id)
    return JSONResponse(data["response"])


async def list_input_items(response_id: str, request: Request):
    state = _state(request)
    data = await _load(state, request, response_id)
    if data is None:
        raise _not_found(response_id)
    items = list(reversed(data.get("input") or []))  # OpenAI's default order: newest first
    if request.query_params.get("order") == "asc":
        items.reverse()
    return JSONResponse({"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                         "last_id": items[-1]["id"] if items else None, "has_more": False})


async def delete_response(response_id: str, request: Request):
    state = _state(request)
    if await _load(state, request, response_id) is None \
            or not await _in_store(state, "delete_response", _key(request, response_id)):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"No response found with id '{response_id}'.", "invalid_request_error", "response_id",
                    "response_not_found")


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/responses", create_response, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", retrieve_response, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}", delete_response, methods=["DELETE"])
