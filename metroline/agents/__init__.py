"""Agents on metroline: runs that keep their state in a store, tools, guards, and the loop.

    from metroline.agents import Agent
    Agent(tools=["calculator"]).run("What is 17 * 23 + 4?")
"""

from metroline.agents.agent import Agent
from metroline.agents.model import ChatModel, EngineChatModel, ModelCall, ModelTurn, ScriptedModel
from metroline.agents.runtime import AgentRuntime, Budgets, GuardConfig, RunResult
from metroline.agents.store import MemoryRunStore, RunStore, SQLiteRunStore
from metroline.agents.tools import Tool, ToolRegistry, ToolResult, builtin_tools

__all__ = ["Agent", "AgentRuntime", "Budgets", "GuardConfig", "RunResult", "ChatModel", "EngineChatModel",
           "ModelCall", "ModelTurn", "ScriptedModel", "RunStore", "SQLiteRunStore", "MemoryRunStore", "Tool",
           "ToolRegistry", "ToolResult", "builtin_tools"]
