"""The model an agent talks to: one call takes the conversation and the tools it may use now,
and answers with text or tool calls.

* `EngineChatModel` runs on metroline's own AsyncEngine, in process: the chat template with the
  documented tool-call format (structured.tools), the tool calls constrained by a grammar of
  exactly the tools allowed at this step (a tool the loop detector removed cannot be called,
  and every call parses), and the run's hints for the scheduler (session id for KV retention,
  program id for program-level scheduling).
* `ScriptedModel` answers from a script: for tests and demos that need no model.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from metroline.errors import EngineDeadError

logger = logging.getLogger("metroline.agents")
# Times a model call whose engine was lost mid-call is made again, while the engine front
# (several replicas) still serves.
MODEL_CALL_RESENDS = 2

__all__ = ["ChatModel", "ModelTurn", "ModelCall", "CallHints", "EngineChatModel", "ScriptedModel"]


@dataclass
class ModelCall:
    """A tool call the model asked for."""
    id: str
    name: str
    arguments: Any  # a dict when it parsed as JSON, else the text the model wrote

    def to_openai(self) -> dict:
        args = self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}


@dataclass
class ModelTurn:
    content: str | None
    tool_calls: list[ModelCall] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = "stop"


@dataclass
class CallHints:
    """What the runtime tells the model layer about one call, for the scheduler."""
    session_id: str | None = None
    program_id: str | None = None
    kv_retention_s: float | None = None


class ChatModel(Protocol):
    name: str

    async def complete(self, messages: list[dict], tools: list[dict], *, max_tokens: int,
                       hints: CallHints | None = None, tool_choice: str = "auto") -> ModelTurn:
        """One assistant turn. `tools` are OpenAI tool entries; empty: answer in text only.
        tool_choice "required": the turn must be tool calls."""
        ...


class EngineChatModel:
    def __init__(self, engine, *, name: str = "metroline", temperature: float = 0.0,
                 parallel_tool_calls: bool = False, seed: int | None = 0, tokenizer=None):
        self.engine = engine  # an AsyncEngine
        self._tokenizer = tokenizer  # the engine's unless given (a server's chat template override)
        self.name = name
        self.temperature = temperature
        self.parallel_tool_calls = parallel_tool_calls
        self.seed = seed
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self._tokenizer or self.engine.tokenizer

    async def release_session(self, session_id: str) -> None:
        """Drop the KV a run kept pinned between its calls (the run ended)."""
        if self.engine.is_alive:
            await self.engine.release_session(session_id)

    async def complete(self, messages: list[dict], tools: list[dict], *, max_tokens: int,
                       hints: CallHints | None = None, tool_choice: str = "auto") -> ModelTurn:
        from metroline.engine.request import RequestHints, SamplingParams
        from metroline.structured import GrammarSpec, compile_grammar
        from metroline.structured.tools import (parse_tool_calls, parse_tools, render_messages,
                                                tool_call_grammar)

        specs = parse_tools(tools)
        chat = render_messages(messages, specs, bool(specs))
        text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        prompt = self.tokenizer.encode(text, add_special_tokens=False)
        params = SamplingParams(temperature=self.temperature, max_tokens=max_tokens, seed=self.seed)
        if specs:
            grammar = tool_call_grammar(specs, "required" if tool_choice == "required" else "auto", None,
                                        self.parallel_tool_calls)
            compiled = await asyncio.to_thread(compile_grammar, self.tokenizer, GrammarSpec.lark(grammar))
            params.logits_processors = [compiled.processor()]
        h = hints or CallHints()
        req_hints = RequestHints(session_id=h.session_id, program_id=h.program_id,
                                 kv_retention_s=h.kv_retention_s if h.session_id else None)
        rid = f"agent-{h.program_id or 'x'}-{next(self._ids)}"
        for attempt in range(1 + MODEL_CALL_RESENDS):
            pieces, finish, n_out = [], None, 0
            try:
                async for out in self.engine.generate(prompt, params, request_id=f"{rid}.{attempt}",
                                                      hints=req_hints):
                    for o in out.outputs:
                        pieces.append(o.text)
                        n_out += len(o.token_ids)
                        finish = o.finish_reason or finish
                    if out.error:
                        raise RuntimeError(f"model call failed: {out.error}")
                break
            except EngineDeadError:
                # An engine replica lost mid-call (serve --replicas) while the front still
                # serves: the call holds no state of the run, so it is made again.
                if attempt == MODEL_CALL_RESENDS or not self.engine.is_alive:
                    raise
                logger.warning("model call %s: its engine was lost; making it again", rid)
                await asyncio.sleep(0.2 * (attempt + 1))
        content = "".join(pieces)
        calls = []
        if specs:
            content, parsed = parse_tool_calls(content)
            for c in parsed:
                try:
                    args = json.loads(c.arguments)
                except json.JSONDecodeError:
                    args = c.arguments
                calls.append(ModelCall(c.id, c.name, args))
        return ModelTurn(content.strip() or None, calls, len(prompt), n_out,
                         "tool_calls" if calls else finish)


class ScriptedModel:
    """Answers turn after turn from `script`. Each entry is a ModelTurn, a str (a text answer),
    a dict {"tool": name, "arguments": {...}} (one call) or {"calls": [...]}, or a callable
    (messages, tools) -> one of those. After the script: `then` (default: repeat the last
    entry). It records what it was asked (`calls`: messages and tool names per call) and counts
    tokens as whitespace-separated words, so budgets have something to count."""

    name = "scripted"

    def __init__(self, script: Sequence, *, then: Any = None, delay_s: float = 0.0):
        self.script = list(script)
        self.then = then
        self.delay_s = delay_s
        self.calls: list[dict] = []
        self._ids = itertools.count()

    async def complete(self, messages: list[dict], tools: list[dict], *, max_tokens: int,
                       hints: CallHints | None = None, tool_choice: str = "auto") -> ModelTurn:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        i = len(self.calls)
        names = [t["function"]["name"] for t in tools]
        self.calls.append({"messages": [dict(m) for m in messages], "tools": names, "hints": hints,
                           "tool_choice": tool_choice, "max_tokens": max_tokens})
        if i < len(self.script):
            entry = self.script[i]
        elif self.then is not None:
            entry = self.then
        else:
            entry = self.script[-1]
        if callable(entry) and not isinstance(entry, ModelTurn):
            entry = entry(messages, tools)
        turn = self._turn(entry)
        if not tools:  # a model without tools can only answer in text
            turn = ModelTurn(turn.content or "(no answer)", [], 0, 0, "stop")
        turn.input_tokens = turn.input_tokens or sum(len(str(m.get("content") or "").split()) for m in messages)
        turn.output_tokens = turn.output_tokens or max(1, len((turn.content or "").split()) + 8 * len(turn.tool_calls))
        return turn

    def _turn(self, entry) -> ModelTurn:
        if isinstance(entry, ModelTurn):
            return ModelTurn(entry.content, list(entry.tool_calls), entry.input_tokens, entry.output_tokens,
                             entry.finish_reason)
        if isinstance(entry, str):
            return ModelTurn(entry)
        if isinstance(entry, dict):
            calls = entry.get("calls") or [{"tool": entry["tool"], "arguments": entry.get("arguments", {})}]
            return ModelTurn(entry.get("content"),
                             [ModelCall(f"call_{next(self._ids)}", c["tool"], c.get("arguments", {})) for c in calls],
                             finish_reason="tool_calls")
        raise TypeError(f"a script entry must be a ModelTurn, str, dict or callable, not {type(entry).__name__}")
