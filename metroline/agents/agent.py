"""`Agent(model, tools).run(task)`: the agent runtime in two lines.

    from metroline.agents import Agent
    result = Agent(tools=["calculator"]).run("What is 17 * 23 + 4?")   # the default model
    print(result.output, result.status, result.usage)

`model`: a ChatModel (anything with `async complete(messages, tools, max_tokens=, hints=)`),
an AsyncEngine, an `LLM`, a model path, or None for the default model. `tools`: a
ToolRegistry, or names of built-in tools and plain functions (registered as tools).
Runs go to `store` (default: an in-memory store; pass SQLiteRunStore(path) to keep them).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterable

from metroline.agents.model import ChatModel, EngineChatModel
from metroline.agents.runtime import AgentRuntime, Budgets, GuardConfig, RunResult
from metroline.agents.store import MemoryRunStore, RunStore
from metroline.agents.tools import ToolRegistry, builtin_tools

__all__ = ["Agent", "resolve_tools", "engine_model"]


def resolve_tools(tools: ToolRegistry | Iterable[str | Callable] | None, *, sandbox: str | None = None) -> ToolRegistry:
    """A registry from a registry, or from built-in tool names and functions."""
    if isinstance(tools, ToolRegistry):
        return tools
    builtins = builtin_tools(sandbox=sandbox)
    reg = ToolRegistry()
    for t in tools if tools is not None else ["calculator", "clock", "notebook_set", "notebook_get", "notebook_list"]:
        if callable(t):
            reg.tool(t)
        elif t == "notebook":
            for n in ("notebook_set", "notebook_get", "notebook_list"):
                reg.add(builtins[n])
        elif t in builtins:
            reg.add(builtins[t])
        elif t == "read_file":
            raise ValueError("the read_file tool needs a sandbox folder (sandbox=... / --sandbox)")
        else:
            raise ValueError(f"unknown tool {t!r}; built in: {', '.join(builtins.names())}, notebook")
    return reg


def engine_model(model: Any = None, **engine_kw) -> ChatModel:
    """A ChatModel from what the caller has: a ChatModel, AsyncEngine, LLM, path or None."""
    from metroline.engine.async_engine import AsyncEngine

    if hasattr(model, "complete"):
        return model
    if isinstance(model, AsyncEngine):
        return EngineChatModel(model)
    from metroline.engine.llm import LLM

    if isinstance(model, LLM):
        return EngineChatModel(AsyncEngine(model.engine))
    llm = LLM(model, show_progress=False, **engine_kw)
    return EngineChatModel(AsyncEngine(llm.engine), name=llm.loaded.source.name)


class Agent:
    def __init__(self, model: Any = None, tools: ToolRegistry | Iterable[str | Callable] | None = None, *,
                 store: RunStore | None = None, budgets: Budgets | dict | None = None,
                 guards: GuardConfig | None = None, system: str | None = None, sandbox: str | None = None):
        self._model_arg = model
        self._model: ChatModel | None = model if hasattr(model, "complete") else None
        self.tools = resolve_tools(tools, sandbox=sandbox)
        self.store = store or MemoryRunStore()
        self.budgets = budgets if isinstance(budgets, Budgets) else Budgets.from_dict(budgets)
        self.guards = guards or GuardConfig()
        self.system = system

    @property
    def model(self) -> ChatModel:
        if self._model is None:
            self._model = engine_model(self._model_arg)
        return self._model

    def runtime(self, **kw) -> AgentRuntime:
        return AgentRuntime(self.model, self.tools, self.store, budgets=self.budgets, guards=self.guards, **kw)

    async def arun(self, task: str, **kw) -> RunResult:
        kw.setdefault("system", self.system)
        return await self.runtime().run(task, **kw)

    def run(self, task: str, **kw) -> RunResult:
        """Run to the end (blocking). Inside a running event loop, use `await agent.arun(...)`."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(task, **kw))
        raise RuntimeError("Agent.run() was called inside a running event loop: use await agent.arun(...)")
