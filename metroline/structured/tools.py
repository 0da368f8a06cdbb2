"""Tool calling for models whose chat template knows no tools (the default model's does not).

The documented format:
- the tools are described in the system turn (`tool_system_prompt`), with the instruction
  to call one as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- an assistant turn that called tools is rendered back in that form, and a `tool` message's
  content is wrapped in `<tool_response>...</tool_response>` (`render_messages`);
- the grammar (`tool_call_grammar`) constrains a call to one of the tools and its parameter
  schema: from the first token for tool_choice `required` or a named function; for `auto`,
  text is free until the model writes `<tool_call>` (a lazy trigger), then the call is
  constrained;
- `parse_tool_calls` reads a finished output, and `ToolCallStreamParser` does the same
  incrementally, so that any split of the text into deltas gives the same result.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from metroline.structured import GrammarError
from metroline.structured.grammar_llguidance import JSON_OPTIONS, prepare_json_schema

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


def parse_tools(tools: list[dict] | None) -> list[Tool]:
    """OpenAI `tools` -> Tool list; GrammarError naming what is wrong."""
    out: list[Tool] = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise GrammarError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise GrammarError(f"tools[{i}].function.name must be a non-empty string of at most 64 characters",
                               "tools")
        params = f.get("parameters")
        if params is None:  # a function without parameters takes exactly {}
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, dict):
            raise GrammarError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        if any(x.name == name for x in out):
            raise GrammarError(f"tools[{i}]: duplicate function name {name!r}", "tools")
        out.append(Tool(name, str(f.get("description") or ""), params))
    return out


def resolve_tool_choice(choice: Any, tools: list[Tool]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", function name or None)."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise GrammarError("tool_choice 'required' needs tools", "tool_choice")
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not any(t.name == name for t in tools):
            raise GrammarError(f"tool_choice names function {name!r}, which is not among the tools", "tool_choice")
        return "named", name
    raise GrammarError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                       "\"function\": {\"name\": ...}}", "tool_choice")


def tool_system_prompt(tools: list[Tool]) -> str:
    lines = ["You can call functions. To call one, reply with exactly",
             f'{OPEN}{{"name": <function name>, "arguments": <arguments as a JSON object>}}{CLOSE}',
             "and nothing else. The functions:"]
    for t in tools:
        lines.append(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}))
    return "\n".join(lines)


def render_messages(messages: list[dict], tools: list[Tool], use_tools: bool) -> list[dict]:
    """Messages in the documented format: the tool description joined to the system turn,
    assistant tool_calls written as tags, tool results wrapped."""
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m.pop("tool_calls"):
                f = (c or {}).get("function") or {}
                args = f.get("arguments")
                try:
                    args = json.loads(args) if isinstance(args, str) else (args or {})
                except json.JSONDecodeError:
                    pass  # kept as the string the client sent
                calls.append(OPEN + json.dumps({"name": f.get("name"), "arguments": args}) + CLOSE)
            m["content"] = ((m.get("content") or "") + "".join(calls)).strip()
        elif m.get("role") == "tool":
            m["content"] = f"<tool_response>{m.get('content') or ''}</tool_response>"
            m.pop("tool_call_id", None)
        out.append(m)
    if use_tools and tools:
        prompt = tool_system_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".strip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def tool_call_grammar(tools: list[Tool], mode: str, name: str | None, parallel: bool) -> str:
    """A Lark grammar (llguidance dialect, JSON schemas inline) for the mode's output."""
    chosen = [t for t in tools if name is None or t.name == name]
    variants = [{"type": "object", "properties": {"name": {"const": t.name},
                                                  "arguments": prepare_json_schema(t.parameters)},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    schema = {"anyOf": variants} if len(variants) > 1 else variants[0]
    schema = {**schema, "x-guidance": JSON_OPTIONS}  # as response_format's schemas are compiled
    more = ' ("\\n" call)*' if parallel else ""
    if mode == "auto":
        # Free text until the model writes the opening tag (a lazy lexeme: it ends at the first
        # tag), then the call's body is constrained; after the calls, only the end.
        rules = [f"start: TEXT | head body_end{more}", f'head[lazy]: TEXT "{OPEN}"', "TEXT: /(.|\\n)*/"]
    else:
        rules = [f"start: call{more}"]
    rules += [f'call: "{OPEN}" body_end', f'body_end: body "{CLOSE}"', f"body: %json {json.dumps(schema)}"]
    return "\n".join(rules)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


_CANONICAL = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')
_CANONICAL_WITHIN = 512  # body characters within which the canonical head must have appeared
_WS = " \t\r\n"


def _call_from(body: str) -> ToolCall | None:
    """A call from a whole body in any key order (`parameters` accepted for `arguments`)."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], json.dumps(args if args is not None else {}))


def _is_streamed_call(call: "_Call") -> bool:
    """Whether a closed body streamed from its canonical head is the JSON object it claimed:
    the scan only follows strings and nesting, so e.g. `{"name": "f", "arguments": 1 2}` or a
    trailing comma got through as a call, and a repeated "name" key went out as the first."""
    try:
        obj = json.loads(call.body[:call.body_end])
        args = json.loads(call.body[call.head.end():call.args_end])
    except json.JSONDecodeError:
        return False
    return (isinstance(obj, dict) and obj.get("name") == json.loads(call.head.group(1))
            and "arguments" in obj and json.dumps(obj["arguments"]) == json.dumps(args))


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content outside the calls, the calls) of a finished output. A call whose closing tag
    never came (output cut short by max_tokens), or that is not a JSON object with a name,
    stays in the content, never presented as a call."""
    p = ToolCallStreamParser(whole=True)
    content, _ = p.feed(text)
    rest, _ = p.finish()
    return content + rest, p.calls


@dataclass
class CallPiece:
    """One streamed piece of a tool call: the first carries its id and name, the others only
    more of its arguments (JSON text, exactly as the model wrote it)."""
    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self, base: int = 0) -> dict:
        fn: dict = {"arguments": self.arguments}
        d: dict = {"index": base + self.index, "function": fn}
        if self.id is not None:
            d["id"], d["type"] = self.id, "function"
            fn["name"] = self.name
        return d


class _Call:
    """The state of the call being read: its body (the text after the opening tag) scanned
    one character at a time, as JSON (strings, escapes and nesting depth), so that braces and
    tags inside strings are just characters."""

    def __init__(self, index: int):
        self.index = index
        self.body = ""
        self.pos = 0
        self.depth = 0
        self.in_str = self.esc = False
        self.body_end: int | None = None  # just after the top-level object
        self.head: re.Match | None = None  # the canonical `{"name": ..., "arguments": ` head
        self.args_end = 0  # arguments text is body[head.end():args_end]
        self.args_done = False
        self.sent = 0  # arguments characters already given out
        self.id = f"call_{uuid.uuid4().hex[:24]}"

    def scan(self) -> str | None:
        """Advance over the body; "fail" if it is not a JSON object, None otherwise."""
        body = self.body
        while self.body_end is None and self.pos < len(body):
            c, i = body[self.pos], self.pos
            in_str, depth = self.in_str, self.depth
            if in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
            elif depth == 0 and c not in _WS and c != "{":
                return "fail"
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.body_end = i + 1
            self.pos += 1
            if self.head is None and i < _CANONICAL_WITHIN and c not in _WS:
                self.head = _CANONICAL.match(body, 0, i + 1)
                if self.head is not None and self.head.end() != i:
                    self.head = None  # matched earlier text only: not the head's first argument char
            if self.head is not None and i >= self.head.end() and not self.args_done:
                if in_str or depth >= 2 or c not in _WS + ",}]":
                    self.args_end = i + 1
                elif c in ",}]":
                    self.args_done = True
        return None

    def new_arguments(self) -> str:
        if self.head is None:
            return ""
        start = self.head.end()
        piece = self.body[start + self.sent:self.args_end]
        self.sent += len(piece)
        return piece


class ToolCallStreamParser:
    """Incremental parser of the documented format: feed(delta) -> (content delta, call pieces).

    Text outside the tags is content; text that may be the start of a tag is held back until
    it is known not to be. A call in the canonical form (`{"name": ..., "arguments": ...}`,
    as the grammar writes it) is streamed as it arrives: a first piece with its id and name,
    then its arguments in pieces; a call with its keys in another order goes out whole once
    its body closes. The result (content, and every call's name and arguments) is the same
    for every split of the text into deltas. `calls` lists the completed calls; a call cut
    short (no closing tag) is never among them: its raw text is in `unfinished` (streamed) or
    in the content (`whole=True`, for a finished output read at once)."""

    def __init__(self, whole: bool = False):
        self.whole = whole
        self._buf = ""
        self._call: _Call | None = None
        self._after_call = False  # a "\n" right after a call separates calls: not content
        self._num_calls = 0
        self.calls: list[ToolCall] = []
        self.unfinished: list[str] = []  # raw text of calls that were started but never closed

    def feed(self, delta: str) -> tuple[str, list[CallPiece]]:
        content: list[str] = []
        pieces: list[CallPiece] = []
        self._buf += delta
        while True:
            if self._call is None:
                if self._after_call and self._buf:
                    self._after_call = False
                    if self._buf.startswith("\n"):
                        self._buf = self._buf[1:]
                i = self._buf.find(OPEN)
                if i < 0:
                    keep = _partial_suffix(self._buf, OPEN)
                    content.append(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._buf[:i])
                self._call = _Call(self._num_calls)
                self._call.body, self._buf = self._buf[i + len(OPEN):], ""
            else:
                self._call.body += self._buf
                self._buf = ""
            if not self._step_call(content, pieces):
                break
        return "".join(content), pieces

    def _step_call(self, content: list[str], pieces: list[CallPiece]) -> bool:
        """Advance the open call; True when it ended (the rest of the text is in _buf again)."""
        call = self._call
        had_head = call.head is not None
        failed = call.scan() == "fail"
        if call.head is not None and not had_head:
            pieces.append(CallPiece(call.index, "", call.id, json.loads(call.head.group(1))))
        if call.head is not None:
            more = call.new_arguments()
            if more:
                pieces.append(CallPiece(call.index, more))
        if not failed and call.body_end is None:
            return False  # the body goes on
        after = call.body[call.body_end:] if not failed else ""
        tail = after.lstrip(_WS)
        if not failed and len(tail) < len(CLOSE) and CLOSE.startswith(tail):
            return False  # the closing tag may still come
        ok = not failed and tail.startswith(CLOSE) and (call.head is None or _is_streamed_call(call))
        whole = None if call.head is not None or not ok else _call_from(call.body[:call.body_end])
        self._call = None
        if ok and (call.head is not None or whole is not None):
            if whole is not None:  # keys in another order: the whole call at once
                whole.id = call.id
                pieces.append(CallPiece(call.index, whole.arguments, whole.id, whole.name))
                self.calls.append(whole)
            else:
                self.calls.append(ToolCall(json.loads(call.head.group(1)),
                                           call.body[call.head.end():call.args_end], call.id))
            self._num_calls += 1
            self._buf = tail[len(CLOSE):]
            self._after_call = True
        elif call.head is not None:  # streamed, then broken: given out already, never complete
            self._unfinished(OPEN + call.body[:call.body_end], content)
            self._num_calls += 1
            self._buf = after
        else:  # not a call: its text is content, read again (it may hold another tag)
            content.append(OPEN)
            self._buf = call.body
        return True

    def _unfinished(self, raw: str, content: list[str]) -> None:
        if self.whole:
            content.append(raw)
        else:
            self.unfinished.append(raw)

    def finish(self) -> tuple[str, list[CallPiece]]:
        """End of output: held-back text is content; an open call is unfinished (its raw text
        in `unfinished`; if it was never streamed, it is content)."""
        rest = ""
        if self._call is not None:
            raw = OPEN + self._call.body
            if self._call.head is not None and not self.whole:
                self.unfinished.append(raw)
            else:
                rest = raw
        rest += self._buf
        self._buf, self._call, self._after_call = "", None, False
        return rest, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
