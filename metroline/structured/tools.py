"""Tool calling for models whose chat template knows no tools (the default model's does not).

The documented format:
- the tools are described in the system turn (`tool_system_prompt`), with the instruction
  to call one as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- an assistant turn that called tools is rendered back in that form, and a `tool` message's
  content is wrapped in `<tool_response>...</tool_response>` (`render_messages`);
- the grammar (`tool_call_grammar`) constrains a call to one of the tools and its parameter
  schema: from the first token for tool_choice `required` or a named function, and for `auto`
  either free text (not starting with `<`) or calls;
- `parse_tool_calls` reads a finished output, and `ToolCallStreamParser` does the same
  incrementally, so that any split of the text into deltas gives the same result.
"""

from __future__ import annotations

import json
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
    calls = 'call ("\\n" call)*' if parallel else "call"
    head = "start: TEXT | calls" if mode == "auto" else "start: calls"
    rules = [head, f"calls: {calls}", f'call: "{OPEN}" body "{CLOSE}"', f"body: %json {json.dumps(schema)}"]
    if mode == "auto":
        rules.append("TEXT: /[^<](.|\\n)*/")
    return "\n".join(rules)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


def _call_from(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], json.dumps(args if args is not None else {}))


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content outside the calls, the calls) of a finished output. A call whose closing tag
    never came (output cut short by max_tokens) or whose body is not a JSON object with a
    name stays in the content, never presented as a call."""
    p = ToolCallStreamParser()
    content, calls = p.feed(text)
    rest, more = p.finish()
    return content + rest, calls + more


class ToolCallStreamParser:
    """Incremental twin of parse_tool_calls: feed(delta) -> (content delta, completed calls).
    Text that may be the start of a tag is held back until it is known not to be; a call is
    emitted whole once its closing tag arrives."""

    def __init__(self):
        self._buf = ""
        self._in_call = False
        self._after_call = False  # a "\n" right after a call separates calls: not content

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        content, calls = [], []
        while True:
            if not self._in_call:
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
                self._buf = self._buf[i + len(OPEN):]
                self._in_call = True
            j = self._buf.find(CLOSE)
            if j < 0:
                break
            body, self._buf = self._buf[:j], self._buf[j + len(CLOSE):]
            self._in_call = False
            call = _call_from(body)
            if call is None:  # not a call after all: its text goes out as content
                content.append(OPEN + body + CLOSE)
            else:
                calls.append(call)
                self._after_call = True
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of output: whatever is held back is content (an unfinished call included)."""
        rest = (OPEN if self._in_call else "") + self._buf
        self._buf, self._in_call, self._after_call = "", False, False
        return rest, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
