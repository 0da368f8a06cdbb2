"""`metroline agent run | show | list | resume` (registered by metroline/cli.py).

`agent run "task" --tools calculator,notebook` runs an agent on the model (the default one
unless --model says otherwise) and prints each step as it happens; the run is kept in the
agent store (--store, default under $METROLINE_DATA_DIR), where `agent show RUN_ID` reads its
trace back and `agent resume RUN_ID` continues it if it was interrupted. `--mcp` adds the tools
of MCP servers (stdio), each named SERVER__tool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from metroline.errors import MetrolineError

_BUDGET_FLAGS = (("--max-steps", "max_steps", int, "model calls at most"),
                 ("--max-tool-calls", "max_tool_calls", int, "tool calls at most"),
                 ("--max-total-tokens", "max_tokens", int, "input + output tokens over the run at most"),
                 ("--deadline", "deadline_s", float, "seconds of wall clock at most"),
                 ("--max-tokens-per-call", "max_tokens_per_call", int, "output tokens per model call at most"))


_MCP_HELP = ("tools from an MCP server over stdio: 'mcp:[NAME=]COMMAND ARGS...', or a JSON config "
             "file in Claude Desktop's shape ({\"mcpServers\": {NAME: {command, args, env}}}); each "
             "tool is named NAME__tool; repeatable (needs pip install 'metroline[mcp]')")


def add_agent_parser(sub, add_model_args, make_llm) -> None:
    """`add_model_args(parser)` adds the engine flags, `make_llm(args, command)` builds the LLM
    from them (both metroline/cli.py's, passed in so this module does not import it)."""
    a = sub.add_parser("agent", help="run an agent (tools, guards, budgets) and read its traces",
                       description="Agent runs on the model: each step printed as it happens, every step "
                                   "kept in the agent store.")
    asub = a.add_subparsers(dest="agent_command", required=True, metavar="WHAT")
    r = asub.add_parser("run", help="run an agent on a task, showing each step",
                        description="Run an agent on TASK with the given tools; each model call, tool call "
                                    "and guard is printed as it happens, then the answer.")
    r.add_argument("task", help="what the agent should do")
    r.add_argument("--tools", default="calculator",
                   help="comma-separated built-in tools: calculator, clock, notebook, fetch_url (loopback "
                        "only), read_file (needs "
                        "--sandbox)")
    r.add_argument("--sandbox", default=None, help="the folder read_file may read")
    r.add_argument("--mcp", action="append", default=[], metavar="SERVER",
                   help=_MCP_HELP)
    r.add_argument("--tool-choice", default="required", choices=["auto", "required"],
                   help="required: every turn is a tool call and the run ends with final_answer (suits "
                        "small models such as the default one); auto: the model may answer in text")
    r.add_argument("--system", default=None, help="system prompt (default: the runtime's)")
    for flag, _, kind, text in _BUDGET_FLAGS:
        r.add_argument(flag, type=kind, default=None, help=text)
    r.add_argument("--store", default=None, help="the agent store's SQLite file (default: under $METROLINE_DATA_DIR)")
    r.add_argument("--json", action="store_true", help="print the finished run as JSON instead of the steps")
    add_model_args(r)
    r.set_defaults(func=cmd_agent_run, make_llm=make_llm)

    s = asub.add_parser("show", help="print a stored run and its trace",
                        description="Print a run from the agent store with every step of its trace.")
    s.add_argument("run_id", help="the run's id")
    s.add_argument("--store", default=None, help="the agent store's SQLite file")
    s.add_argument("--json", action="store_true", help="as JSON")
    s.set_defaults(func=cmd_agent_show)

    ls = asub.add_parser("list", help="the latest runs in the agent store",
                         description="List the latest runs in the agent store.")
    ls.add_argument("--store", default=None, help="the agent store's SQLite file")
    ls.add_argument("--limit", type=int, default=20, help="runs to show")
    ls.set_defaults(func=cmd_agent_list)

    rs = asub.add_parser("resume", help="continue an interrupted run from its last recorded step",
                         description="Continue a run the store has as queued or running (its process "
                                     "died) from its last recorded step.")
    rs.add_argument("run_id", help="the run's id")
    rs.add_argument("--store", default=None, help="the agent store's SQLite file")
    rs.add_argument("--sandbox", default=None, help="the folder read_file may read")
    rs.add_argument("--mcp", action="append", default=[], metavar="SERVER",
                    help="the MCP servers the run was started with (as for agent run)")
    add_model_args(rs)
    rs.set_defaults(func=cmd_agent_resume, make_llm=make_llm)


def _store(path):
    from metroline.agents.store import SQLiteRunStore

    try:
        return SQLiteRunStore(path)
    except Exception as e:
        raise MetrolineError(f"cannot open the agent store {path or '(default)'}: {e}") from None


def _short(value, n: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def format_event(e: dict) -> str | None:
    """One line (or two) for a step of the trace; None for bookkeeping events."""
    k = e["kind"]
    if k == "model_call":
        calls = ", ".join(f"{c['name']}({_short(c['arguments'], 100)})" for c in e.get("tool_calls") or [])
        what = calls or _short(e.get("content") or "")
        return f"step {e['step']:>2}  model  {what}   [{e['output_tokens']} tokens, {e['duration_s']:.2f} s]"
    if k == "tool_finished":
        mark = "->" if e.get("ok") else "!!"
        t = f", {e['duration_s']:.3f} s" if "duration_s" in e else ""
        return f"         {mark} {e['name']}: {_short(e.get('content', ''))}{t}"
    if k == "tool_unknown":
        return f"         ?? {e['name']}: {_short(e['content'])}"
    if k == "guard":
        return f"   guard  {e['guard']} {e['action']}: {_short(e.get('reason', ''))}"
    if k == "breaker":
        return f"   breaker  {e['tool']}: {e['from']} -> {e['to']}"
    if k == "final":
        how = f" (ended by {e['ended_by']})" if e.get("ended_by") else ""
        return f"   final{how}: {e.get('content')}"
    if k in ("error", "cancelled", "resumed"):
        return f"   {k}: {_short(e.get('message') or e.get('reason') or '')}"
    return None


def _tools(args, names: list[str], strict: bool = True):
    """A registry of the MCP servers' tools (--mcp, opened now) plus the built-in `names` not
    among them, and the opened sources (closed by the caller). Not strict (resume): a name that
    is neither is left out with a warning, and the runtime refuses its calls."""
    from metroline.agents.agent import resolve_tools
    from metroline.agents.mcp import McpConfigError, McpSourceError, mcp_specs
    from metroline.agents.tools import ToolError, ToolRegistry, builtin_tools

    reg, sources = ToolRegistry(), []
    try:
        for value in args.mcp:
            for spec in mcp_specs(value):
                src = spec.source()
                asyncio.run(src.open())
                sources.append(src)
                src.register(reg, prefix=spec.name)
        wanted = [n for n in names if n not in reg]
        if not strict:
            known = set(builtin_tools(sandbox=args.sandbox).names())
            for n in wanted:
                if n not in known:
                    print(f"warning: the run's tool {n!r} is not available here (an MCP tool needs its "
                          "--mcp server); its calls will be refused", file=sys.stderr)
            wanted = [n for n in wanted if n in known]
        builtin = resolve_tools(wanted, sandbox=args.sandbox)
        for name in builtin.names():
            reg.add(builtin[name])
    except (McpConfigError, McpSourceError, ToolError, ImportError, ValueError) as e:
        _close(sources)
        raise MetrolineError(str(e)) from None
    return reg, sources


def _close(sources) -> None:
    for src in sources:
        try:
            src.close()
        except Exception as e:  # a server that will not stop: say so, the run's result stands
            print(f"warning: {e}", file=sys.stderr)


def _model(args):
    from metroline.agents.model import EngineChatModel
    from metroline.engine.async_engine import AsyncEngine

    args.speculative = getattr(args, "speculative", None)
    llm = args.make_llm(args, "agent")
    return EngineChatModel(AsyncEngine(llm.engine), name=llm.loaded.source.name)


def _print_result(rec, as_json: bool, events=None) -> None:
    if as_json:
        print(json.dumps(rec.to_json(events), ensure_ascii=False, indent=2))
        return
    u = rec.usage or {}
    print(f"run {rec.id}: {rec.status}" + (f" (ended by {rec.ended_by}: {rec.reason})" if rec.ended_by else "")
          + f"; {u.get('model_calls', 0)} model calls, {u.get('tool_calls', 0)} tool calls, "
            f"{u.get('total_tokens', 0)} tokens", file=sys.stderr)
    if rec.result is not None:
        print(rec.result)


def cmd_agent_run(args) -> int:
    from metroline.agents.runtime import AgentRuntime, Budgets

    budgets = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _, _ in _BUDGET_FLAGS
               if getattr(args, flag[2:].replace("-", "_")) is not None}
    try:
        b = Budgets.from_dict(budgets)
    except ValueError as e:
        raise MetrolineError(str(e)) from None
    names = [t.strip() for t in (args.tools or "").split(",") if t.strip()]
    store = _store(args.store)
    reg, sources = _tools(args, names)
    try:
        model = _model(args)
    except BaseException:
        _close(sources)
        raise

    async def body(reg):
        rt = AgentRuntime(model, reg, store, budgets=b)
        try:
            run_id = await rt.start(args.task, tools=reg.names(), system=args.system, tool_choice=args.tool_choice)
        except ValueError as e:
            raise MetrolineError(str(e)) from None
        if not args.json:
            print(f"run {run_id}", file=sys.stderr)
            async for ev in rt.stream(run_id):
                line = format_event(ev.to_dict())
                if line:
                    print(line, file=sys.stderr, flush=True)
        await rt.wait(run_id)
        return run_id

    try:
        run_id = asyncio.run(body(reg))
    finally:
        model.engine.shutdown()
        _close(sources)
    rec = store.get_run(run_id)
    _print_result(rec, args.json, store.events(run_id) if args.json else None)
    return 0 if rec.status in ("completed", "stopped") else 1


def cmd_agent_show(args) -> int:
    store = _store(args.store)
    rec = store.get_run(args.run_id)
    if rec is None:
        raise MetrolineError(f"no run {args.run_id!r} in {store.path}")
    events = store.events(rec.id)
    if args.json:
        _print_result(rec, True, events)
        return 0
    print(f"task: {rec.task}", file=sys.stderr)
    for ev in events:
        line = format_event(ev.to_dict())
        if line:
            print(line, file=sys.stderr)
    _print_result(rec, False)
    return 0


def cmd_agent_list(args) -> int:
    store = _store(args.store)
    runs = store.list_runs(limit=args.limit)
    if not runs:
        print(f"no runs in {store.path}", file=sys.stderr)
    for r in runs:
        print(f"{r.id}  {r.status:<9}  {(r.ended_by or ''):<14}  {_short(r.task, 70)}")
    return 0


def cmd_agent_resume(args) -> int:
    from metroline.agents.runtime import AgentRuntime

    store = _store(args.store)
    rec = store.get_run(args.run_id)
    if rec is None:
        raise MetrolineError(f"no run {args.run_id!r} in {store.path}")
    if rec.finished:
        raise MetrolineError(f"run {rec.id} already ended ({rec.status})")
    reg, sources = _tools(args, rec.tools, strict=False)
    try:
        model = _model(args)
    except BaseException:
        _close(sources)
        raise

    async def body(reg):
        rt = AgentRuntime(model, reg, store)
        await rt.resume(rec.id)
        async for ev in rt.stream(rec.id):
            line = format_event(ev.to_dict())
            if line:
                print(line, file=sys.stderr, flush=True)
        await rt.wait(rec.id)

    try:
        asyncio.run(body(reg))
    finally:
        model.engine.shutdown()
        _close(sources)
    rec = store.get_run(rec.id)
    _print_result(rec, False)
    return 0 if rec.status in ("completed", "stopped") else 1
