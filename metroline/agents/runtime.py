"""The agent loop: ask the model, run the tools it calls, feed the results back, until it
answers, a guard ends the run, or it is cancelled. Every step is written to the run store as
it happens, and a run read back from the store continues where it stopped.

One choke point. Every model call and every tool call passes the run's `Governor` before it
happens and reports to it after: steps, tool calls (total and per tool), tokens, cost, the
wall-clock deadline, the circuit breaker of each tool and the loop detector. The governor's
state is a function of the run's events (`Governor.apply`), applied the same way live and
when a run is replayed after a restart, so a resumed run has the counters it had.

When a budget runs out (or the loop detector's last escalation), the model is asked once more,
without tools, for a final answer; the run is `stopped`, and records which guard ended it and
why. A run whose model answers by itself is `completed`.

Restart safety: the transcript and the counters come from the events alone. A tool call is
recorded before it runs and after; on resume, a call with a start and no end was cut off by
the crash: an idempotent tool runs again, any other is reported to the model as of unknown
outcome and never retried. Model calls have no side effects: one in flight at the crash is
simply made again.

    runtime = AgentRuntime(model, builtin_tools(), SQLiteRunStore(path))
    result = await runtime.run("What is 17 * 23 + 4?")
    handle = await runtime.start(task); async for ev in runtime.stream(handle.run_id): ...
    await runtime.resume_unfinished()        # after a restart
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import AsyncIterator, Callable

from metroline.agents.guards import CircuitBreaker, BreakerState, Escalation, LoopDetector
from metroline.agents.model import CallHints, ChatModel, ModelCall, ModelTurn
from metroline.agents.serving import ToolLatencyTracker
from metroline.agents.store import FINISHED_STATUSES, RunEvent, RunRecord, RunStore, new_run_id
from metroline.agents.tools import ToolRegistry, ToolResult, replay_notebook, run_notebook

__all__ = ["Budgets", "GuardConfig", "Governor", "GuardStop", "AgentRuntime", "RunResult", "transcript",
           "DEFAULT_SYSTEM_PROMPT"]

logger = logging.getLogger("metroline.agents")

DEFAULT_SYSTEM_PROMPT = ("You are a helpful assistant that solves the user's task step by step. "
                         "Use the tools when they help: call one, read its result, then continue. "
                         "When you have the answer, reply with it in plain text.")
# With tool_choice "required" every turn is a tool call, and this one ends the run: a small model
# that never stops to answer in free text still says when it is done, in a form that parses.
FINAL_ANSWER_TOOL = "final_answer"
FINAL_ANSWER_SPEC = {"type": "function", "function": {
    "name": FINAL_ANSWER_TOOL, "description": "Give the final answer to the task; this ends the run.",
    "parameters": {"type": "object", "properties": {"answer": {"type": "string", "description": "the answer",
                                                               "minLength": 1, "maxLength": 500}},
                   "required": ["answer"], "additionalProperties": False}}}
TOOL_CHOICES = ("auto", "required")
REQUIRED_SYSTEM_PROMPT = (
    "You solve the user's task step by step with tools. Each reply is exactly one tool call. "
    "Read each tool result, then make the next call. When the last result answers the task, call "
    "final_answer with it.")
# Shown as earlier turns of the conversation (small models follow turns better than prose).
_EXAMPLE = [("What is 6 * 7?", [("calculator", {"expression": "6 * 7"}, "42")], "42"),
            ("What is (3 + 4) * 5, minus 6?", [("calculator", {"expression": "(3 + 4) * 5"}, "35"),
                                               ("calculator", {"expression": "35 - 6"}, "29")], "29")]


def _example_turns() -> list[dict]:
    out, n = [], 0
    for task, calls, answer in _EXAMPLE:
        out.append({"role": "user", "content": task})
        for name, args, result in calls + [(FINAL_ANSWER_TOOL, {"answer": answer}, None)]:
            n += 1
            out.append({"role": "assistant", "content": "",
                        "tool_calls": [ModelCall(f"example_{n}", name, args).to_openai()]})
            if result is not None:
                out.append({"role": "tool", "tool_call_id": f"example_{n}", "content": result})
    return out


FINAL_ANSWER_PROMPT = ("The run has to end now ({reason}). Do not call any tool. Give your final "
                       "answer to the task with what you know so far.")


@dataclass(frozen=True)
class Budgets:
    """Limits of one run. None: no limit."""
    max_steps: int | None = 20  # model calls (the final answer after a guard not counted)
    max_tool_calls: int | None = 50
    max_calls_per_tool: int | None = None  # the same limit for every tool
    per_tool: dict = field(default_factory=dict)  # tool name -> its own limit
    max_tokens: int | None = None  # input + output tokens over the whole run
    max_cost: float | None = None  # in the price unit below
    price_per_million_input: float = 0.0
    price_per_million_output: float = 0.0
    deadline_s: float | None = 600.0  # wall clock, from the run's creation
    model_call_timeout_s: float = 300.0
    max_tokens_per_call: int = 512
    final_answer_max_tokens: int = 256
    final_answer_timeout_s: float = 60.0

    def __post_init__(self):
        for f in ("max_steps", "max_tool_calls", "max_calls_per_tool", "max_tokens"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"budget {f} must be a non-negative integer or null")
        for f in ("max_cost", "deadline_s"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0
                                  or math.isinf(v)):
                raise ValueError(f"budget {f} must be a finite number >= 0 or null")
        for f in ("price_per_million_input", "price_per_million_output", "model_call_timeout_s",
                  "final_answer_timeout_s"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1e12:
                raise ValueError(f"budget {f} must be a finite number >= 0")
        for f in ("max_tokens_per_call", "final_answer_max_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 20:
                raise ValueError(f"budget {f} must be an integer in [1, {1 << 20}]")
        if not isinstance(self.per_tool, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in self.per_tool.items()):
            raise ValueError("budget per_tool must map tool names to non-negative integers")

    @classmethod
    def from_dict(cls, d: dict | None, base: "Budgets | None" = None) -> "Budgets":
        """A Budgets from a JSON object (unknown keys refused), over `base`'s values."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown budget fields: {sorted(bad)}; known: {sorted(known)}")
        return replace(base or cls(), **d)

    def to_dict(self) -> dict:
        return asdict(self)

    def limit_for(self, tool: str) -> int | None:
        return self.per_tool.get(tool, self.max_calls_per_tool)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.price_per_million_input + output_tokens * self.price_per_million_output) / 1e6


@dataclass(frozen=True)
class GuardConfig:
    breaker_failures: int = 3
    breaker_cooldown_s: float = 30.0
    loop_window: int = 8
    loop_repeat: int = 3
    loop_stale: int = 4


@dataclass
class GuardStop:
    guard: str  # max_steps | max_tool_calls | token_budget | cost_budget | deadline | loop | ...
    reason: str


class Governor:
    """The run's guards and counters: asked before each call, told (through the run's events)
    after. Its state is a function of the events it was given (`apply`)."""

    def __init__(self, budgets: Budgets, guards: GuardConfig, started_at: float, *,
                 clock: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic):
        self.budgets = budgets
        self.guards = guards
        self.started_at = started_at
        self.clock = clock
        self.mono = mono
        self.steps = 0
        self.tool_calls = 0
        self.per_tool: dict[str, int] = {}
        self.input_tokens = 0
        self.output_tokens = 0
        self.breakers: dict[str, CircuitBreaker] = {}
        self.loop = LoopDetector(guards.loop_window, guards.loop_repeat, guards.loop_stale)
        self.removed: set[str] = set()
        self._started: set[str] = set()  # call ids counted (a retried call counts once)
        self.stop: GuardStop | None = None  # set by a loop STOP or a recorded guard stop

    @property
    def cost(self) -> float:
        return self.budgets.cost(self.input_tokens, self.output_tokens)

    def usage(self) -> dict:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens, "cost": round(self.cost, 9),
                "model_calls": self.steps, "tool_calls": self.tool_calls, "tool_calls_by_name": dict(self.per_tool)}

    def breaker(self, name: str) -> CircuitBreaker:
        b = self.breakers.get(name)
        if b is None:
            b = self.breakers[name] = CircuitBreaker(self.guards.breaker_failures, self.guards.breaker_cooldown_s,
                                                     clock=self.mono)
        return b

    def time_left(self) -> float:
        if self.budgets.deadline_s is None:
            return math.inf
        return self.started_at + self.budgets.deadline_s - self.clock()

    # ---- before ----

    def check_model_call(self) -> GuardStop | None:
        b = self.budgets
        if self.stop is not None:
            return self.stop
        if b.max_steps is not None and self.steps >= b.max_steps:
            return GuardStop("max_steps", f"{self.steps} model calls, the limit is {b.max_steps}")
        if b.max_tokens is not None and self.input_tokens + self.output_tokens >= b.max_tokens:
            return GuardStop("token_budget", f"{self.input_tokens + self.output_tokens} tokens used, "
                                             f"the budget is {b.max_tokens}")
        if b.max_cost is not None and self.cost >= b.max_cost:
            return GuardStop("cost_budget", f"cost {self.cost:.6g} reached the budget {b.max_cost:g}")
        return self._tool_calls_or_time_spent()

    def _tool_calls_or_time_spent(self) -> GuardStop | None:
        """The limits that stop both the next model call and the next tool call."""
        b = self.budgets
        if b.max_tool_calls is not None and self.tool_calls >= b.max_tool_calls:
            return GuardStop("max_tool_calls", f"{self.tool_calls} tool calls, the limit is {b.max_tool_calls}")
        if self.time_left() <= 0:
            return GuardStop("deadline", f"the run's deadline of {b.deadline_s:g} s passed")
        return None

    def _tool_spent(self, name: str) -> int | None:
        """The tool's own limit when the run has used it up, else None."""
        limit = self.budgets.limit_for(name)
        return limit if limit is not None and self.per_tool.get(name, 0) >= limit else None

    def max_tokens_now(self) -> int:
        """Output tokens the next call may use: per call, within what the token budget leaves."""
        n = self.budgets.max_tokens_per_call
        if self.budgets.max_tokens is not None:
            n = min(n, max(1, self.budgets.max_tokens - self.input_tokens - self.output_tokens))
        return n

    def allowed_tools(self, names: list[str]) -> list[str]:
        """The tools the model may call at the next step (in the grammar): not removed by the
        loop detector, not over their own budget, breaker not open."""
        out = []
        for n in names:
            if n in self.removed or self._tool_spent(n) is not None:
                continue
            b = self.breakers.get(n)
            if b is not None and b.state is BreakerState.OPEN and b.retry_in() > 0:
                continue
            out.append(n)
        return out

    def check_tool_call(self, name: str) -> tuple[str, str] | GuardStop | None:
        """None: the call may run. (kind, message): refused, the message is the model's
        observation. GuardStop: the run must end."""
        stop = self._tool_calls_or_time_spent()
        if stop is not None:
            return stop
        if name in self.removed:
            return ("tool_removed", f"error: {name} was taken away because the run kept repeating it")
        limit = self._tool_spent(name)
        if limit is not None:
            return ("tool_budget", f"error: {name} may be called at most {limit} times in this run")
        br = self.breaker(name)
        if not br.allow():
            return ("circuit_open", f"error: {name} is failing and is unavailable for "
                                    f"{br.retry_in():.0f} s more (circuit breaker open)")
        return None

    # ---- after: the events ----

    def apply(self, ev: RunEvent):
        """Update the counters from one event; for a tool's end, the loop detector's verdict."""
        d = ev.data
        if ev.kind == "model_call":
            self.steps += 1
            self.input_tokens += d.get("input_tokens", 0)
            self.output_tokens += d.get("output_tokens", 0)
        elif ev.kind == "final":
            self.input_tokens += d.get("input_tokens", 0)
            self.output_tokens += d.get("output_tokens", 0)
        elif ev.kind == "tool_started":
            if d["call_id"] in self._started:
                return None
            self._started.add(d["call_id"])
            self.tool_calls += 1
            self.per_tool[d["name"]] = self.per_tool.get(d["name"], 0) + 1
        elif ev.kind == "tool_finished":
            # A refused call did not reach the tool (its breaker learns nothing), but a model that
            # keeps making it is looping all the same.
            if not d.get("refused"):
                self.breaker(d["name"]).record(bool(d["ok"]))
            return self.loop.observe(d["name"], d.get("arguments"), d.get("content", ""))
        elif ev.kind == "tool_unknown":
            self.breaker(d["name"]).record(False)
        elif ev.kind == "guard":
            if d.get("action") == "remove":
                self.removed.add(d["tool"])
            elif d.get("action") == "stop":
                self.stop = GuardStop(d["guard"], d["reason"])
        return None


def transcript(run: RunRecord, events: list[RunEvent]) -> list[dict]:
    """The conversation the model sees next, rebuilt from the run's events."""
    required = run.metadata.get("tool_choice") == "required"
    msgs: list[dict] = [{"role": "system", "content": run.metadata.get("system") or (
        REQUIRED_SYSTEM_PROMPT if required else DEFAULT_SYSTEM_PROMPT)}]
    if required and not run.metadata.get("system") and "calculator" in run.tools:
        msgs += _example_turns()
    msgs.append({"role": "user", "content": run.task})
    for ev in events:
        d = ev.data
        if ev.kind == "model_call":
            m = {"role": "assistant", "content": d.get("content") or ""}
            if d.get("tool_calls"):
                m["tool_calls"] = [ModelCall(c["id"], c["name"], c["arguments"]).to_openai()
                                   for c in d["tool_calls"]]
            msgs.append(m)
        elif ev.kind in ("tool_finished", "tool_unknown"):
            msgs.append({"role": "tool", "tool_call_id": d["call_id"], "content": d["content"]})
        elif ev.kind == "guard" and d.get("action") in ("hint", "remove") and msgs[-1]["role"] == "tool":
            msgs[-1] = {**msgs[-1], "content": f"{msgs[-1]['content']}\n(runtime note: {d['reason']}; "
                                               f"{d.get('advice') or 'try something else'})"}
    return msgs


def _pending_calls(events: list[RunEvent]) -> tuple[list[dict], dict[str, RunEvent]]:
    """The last model call's tool calls with no recorded end, and the starts among them."""
    last = None
    for i, ev in enumerate(events):
        if ev.kind == "model_call":
            last = i
    if last is None:
        return [], {}
    ended = {ev.data["call_id"] for ev in events[last:] if ev.kind in ("tool_finished", "tool_unknown")}
    started = {ev.data["call_id"]: ev for ev in events[last:] if ev.kind == "tool_started"}
    calls = [c for c in events[last].data.get("tool_calls") or [] if c["id"] not in ended]
    return calls, started


def _answer_of(call: ModelCall) -> str:
    if isinstance(call.arguments, dict):
        return str(call.arguments.get("answer", ""))
    return str(call.arguments)


@dataclass
class RunResult:
    run_id: str
    status: str
    output: str | None
    ended_by: str | None
    reason: str | None
    usage: dict
    events: list[dict]

    @classmethod
    def of(cls, rec: RunRecord, events: list[RunEvent]) -> "RunResult":
        return cls(rec.id, rec.status, rec.result, rec.ended_by, rec.reason, rec.usage,
                   [e.to_dict() for e in events])


class _Active:
    def __init__(self, run_id: str):
        self.run_id = run_id
        self.task: asyncio.Task | None = None
        self.events: list[RunEvent] = []  # the run's whole trace, as recorded (read once at start)
        self.subscribers: list[asyncio.Queue] = []
        self.done = asyncio.Event()
        self.notebook: dict = {}  # the run's notes (notebook tools), replayed from its trace


class AgentRuntime:
    def __init__(self, model: ChatModel, tools: ToolRegistry, store: RunStore, *,
                 budgets: Budgets | None = None, guards: GuardConfig | None = None,
                 max_concurrent_runs: int = 64, metrics=None, retention=None,
                 mono: Callable[[], float] = time.monotonic,
                 on_tool_latency: Callable[[str, float], None] | None = None):
        """`metrics`: an agents.metrics.AgentMetrics (or None). `retention`: a callable
        (tool names allowed at this step) -> kv_retention_s for the model call; by default
        each tool's observed latency decides (agents/serving.py: the KV of a run waiting on a
        tool stays pinned about as long as the tool is expected to take, not longer)."""
        self.model = model
        self.tools = tools
        self.store = store
        self.budgets = budgets or Budgets()
        self.guards = guards or GuardConfig()
        self.metrics = metrics
        self.latency = ToolLatencyTracker()
        self.retention = retention if retention is not None else self.latency.retention_for
        self.mono = mono  # the breakers' clock (a fake one in tests)
        self.on_tool_latency = on_tool_latency or self.latency.observe  # each tool's latency
        self._slots = asyncio.Semaphore(max_concurrent_runs)
        self._active: dict[str, _Active] = {}

    # ---- starting, waiting, cancelling ----

    async def start(self, task: str, *, tools: list[str] | None = None, budgets: Budgets | dict | None = None,
                    system: str | None = None, run_id: str | None = None, metadata: dict | None = None,
                    tool_choice: str = "auto") -> str:
        """Create a run and start it in the background; returns its id. `tool_choice`
        "required": every turn must call a tool, and the run ends when the model calls
        `final_answer` (for small models that do not stop to answer by themselves)."""
        if not isinstance(task, str) or not task.strip():
            raise ValueError("the task must be a non-empty string")
        if tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)}")
        names = list(tools) if tools is not None else self.tools.names()
        unknown = [n for n in names if n not in self.tools]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; available: {self.tools.names()}")
        b = budgets if isinstance(budgets, Budgets) else Budgets.from_dict(budgets, self.budgets)
        meta = dict(metadata or {})
        if system is not None:
            meta["system"] = system
        meta["tool_choice"] = tool_choice
        rec = RunRecord(run_id or new_run_id(), task, getattr(self.model, "name", ""), names, b.to_dict(),
                        "queued", metadata=meta)
        self.store.create_run(rec)
        self._launch(rec.id)
        return rec.id

    async def run(self, task: str, **kw) -> RunResult:
        """Start a run and wait for its end."""
        run_id = await self.start(task, **kw)
        return await self.wait(run_id)

    async def wait(self, run_id: str) -> RunResult:
        a = self._active.get(run_id)
        if a is not None:
            await a.done.wait()
        rec = self.store.get_run(run_id)
        if rec is None:
            raise KeyError(run_id)
        return RunResult.of(rec, self.store.events(run_id))

    async def resume(self, run_id: str) -> str:
        """Continue an unfinished run from its last recorded step (no-op if it is active)."""
        rec = self.store.get_run(run_id)
        if rec is None:
            raise KeyError(run_id)
        if rec.finished:
            raise ValueError(f"run {run_id} already ended ({rec.status})")
        if run_id not in self._active:
            self._launch(run_id, resumed=True)
        return run_id

    async def resume_unfinished(self) -> list[str]:
        """Resume every run the store has as queued or running (call once, after a restart)."""
        ids = []
        for rec in self.store.unfinished_runs():
            if rec.id not in self._active:
                self._launch(rec.id, resumed=True)
                ids.append(rec.id)
        return ids

    async def cancel(self, run_id: str) -> bool:
        """Cancel a run; False if it had already ended."""
        a = self._active.get(run_id)
        if a is not None and a.task is not None and not a.task.done():
            a.task.cancel()
            await a.done.wait()
            return True
        rec = self.store.get_run(run_id)
        if rec is None:
            raise KeyError(run_id)
        if rec.finished:
            return False
        self._end(run_id, "cancelled", None, None, "cancelled")
        return True

    async def stream(self, run_id: str, after: int = 0) -> AsyncIterator[RunEvent]:
        """The run's events from seq `after` on: those stored, then live ones until it ends."""
        a = self._active.get(run_id)
        q: asyncio.Queue | None = None
        if a is not None:
            q = asyncio.Queue()
            a.subscribers.append(q)
        try:
            last = after
            for ev in self.store.events(run_id, after):
                last = ev.seq
                yield ev
            if q is None:
                return
            while True:
                ev = await q.get()
                if ev is None:
                    for ev in self.store.events(run_id, last):  # anything recorded after the last push
                        yield ev
                    return
                if ev.seq > last:
                    last = ev.seq
                    yield ev
        finally:
            if a is not None and q in a.subscribers:
                a.subscribers.remove(q)

    async def aclose(self) -> None:
        """Stop the active runs without ending them: they stay `running` in the store, and a
        later runtime resumes them (a server shutting down)."""
        tasks = [a.task for a in self._active.values() if a.task is not None]
        for t in tasks:
            t.cancel(msg="shutdown")
        for t in tasks:
            try:
                await t
            except BaseException:
                pass

    # ---- the loop ----

    def _launch(self, run_id: str, resumed: bool = False) -> None:
        a = _Active(run_id)
        self._active[run_id] = a
        a.task = asyncio.create_task(self._drive(a, resumed), name=f"agent-run-{run_id}")

    def _record(self, run_id: str, kind: str, data: dict) -> RunEvent:
        ev = self.store.append_event(run_id, kind, data)
        a = self._active.get(run_id)
        if a is not None:
            a.events.append(ev)
            for q in a.subscribers:
                q.put_nowait(ev)
        return ev

    async def _drive(self, a: _Active, resumed: bool) -> None:
        run_id = a.run_id
        t0 = time.monotonic()  # job completion time counts the wait for a slot
        started = shutdown = False
        try:
            async with self._slots:
                started = True
                if self.metrics is not None:
                    self.metrics.run_started()
                await self._loop(a, resumed)
        except asyncio.CancelledError as e:
            shutdown = bool(e.args) and e.args[0] == "shutdown"  # left `running` for the next runtime
            if not shutdown:
                self._end(run_id, "cancelled", None, None, "cancelled")
        except Exception as e:
            logger.exception("agent run %s failed", run_id)
            self._record(run_id, "error", {"message": f"{type(e).__name__}: {e}"})
            self._end(run_id, "failed", None, None, f"{type(e).__name__}: {e}")
        finally:
            if started and self.metrics is not None:
                rec = self.store.get_run(run_id)
                self.metrics.run_ended(rec.status if rec else "failed", time.monotonic() - t0,
                                       finished=not shutdown)
            release = getattr(self.model, "release_session", None)
            if release is not None and not shutdown:
                try:  # the run's KV pin (kv_retention_s between tool calls) is no longer needed
                    await release(run_id)
                except Exception:
                    logger.debug("releasing run %s's session failed", run_id, exc_info=True)
            for q in a.subscribers:
                q.put_nowait(None)
            self._active.pop(run_id, None)
            a.done.set()

    def _end(self, run_id: str, status: str, result: str | None, ended_by: str | None, reason: str | None,
             gov: Governor | None = None) -> None:
        fields_ = dict(status=status, result=result, ended_by=ended_by, reason=reason)
        if gov is not None:
            fields_["usage"] = gov.usage()
        if status == "cancelled":
            self._record(run_id, "cancelled", {"reason": reason})
        self.store.update_run(run_id, **fields_)

    async def _loop(self, a: _Active, resumed: bool) -> None:
        run_id = a.run_id
        rec = self.store.get_run(run_id)
        budgets = Budgets.from_dict(rec.budgets)
        gov = Governor(budgets, self.guards, rec.created_at, mono=self.mono)
        a.events = events = self.store.events(run_id)
        for ev in events:
            gov.apply(ev)
        a.notebook = replay_notebook((ev.data.get("name"), ev.data.get("arguments")) for ev in events
                                     if ev.kind == "tool_finished" and ev.data.get("ok"))
        self.store.update_run(run_id, status="running")
        calls, started = _pending_calls(events)
        if resumed:
            self._record(run_id, "resumed", {"after_seq": events[-1].seq if events else 0})
        stop = None
        required = rec.metadata.get("tool_choice") == "required"
        choice = {"tool_choice": "required"} if required else {}  # a ChatModel may not know the keyword
        if required and any(c["name"] == FINAL_ANSWER_TOOL for c in calls):  # the crash came before its end
            self._final_call(run_id, gov, [ModelCall(c["id"], c["name"], c["arguments"]) for c in calls])
            return
        if calls:
            stop = await self._run_calls(run_id, rec, gov, [ModelCall(c["id"], c["name"], c["arguments"]) for c in calls],
                                         started)
        while stop is None:
            stop = gov.check_model_call()
            if stop is not None:
                break
            allowed = gov.allowed_tools(rec.tools)
            specs = self.tools.specs(allowed) if allowed else []
            if required:
                specs.append(FINAL_ANSWER_SPEC)
            msgs = transcript(rec, a.events)
            hints = CallHints(session_id=run_id, program_id=run_id,
                              kv_retention_s=self.retention(allowed) if self.retention and allowed else None)
            timeout = min(budgets.model_call_timeout_s, max(0.0, gov.time_left()))
            t = time.monotonic()
            try:
                turn = await asyncio.wait_for(self.model.complete(
                    msgs, specs, max_tokens=gov.max_tokens_now(), hints=hints, **choice), timeout)
            except asyncio.TimeoutError:
                if gov.time_left() <= 0:
                    stop = GuardStop("deadline", f"the run's deadline of {budgets.deadline_s:g} s passed "
                                                 "during a model call")
                else:
                    stop = GuardStop("model_call_timeout", f"a model call took over {timeout:g} s")
                gov.apply(self._record(run_id, "guard", {"guard": stop.guard, "action": "stop",
                                                         "reason": stop.reason}))
                break
            calls = list(turn.tool_calls)
            ev = self._record(run_id, "model_call", {
                "step": gov.steps + 1, "content": turn.content, "finish_reason": turn.finish_reason,
                "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls],
                "tools_offered": allowed, "input_tokens": turn.input_tokens, "output_tokens": turn.output_tokens,
                "duration_s": round(time.monotonic() - t, 6)})
            gov.apply(ev)
            if self.metrics is not None:
                self.metrics.step("model_call")
            self.store.update_run(run_id, usage=gov.usage())
            if not calls:
                self._record(run_id, "final", {"content": turn.content, "ended_by": None})
                self._end(run_id, "completed", turn.content, None, None, gov)
                return
            if required and any(c.name == FINAL_ANSWER_TOOL for c in calls):
                self._final_call(run_id, gov, calls)
                return
            stop = await self._run_calls(run_id, rec, gov, calls, {})

        # A guard ended the run: one last call, without tools, for the final answer. With
        # tool_choice "required" the answer comes as a final_answer call, the only one the
        # grammar then allows: the form the run's model has answered in all along.
        if self.metrics is not None:
            self.metrics.guard_trip(stop.guard)
        answer, in_t, out_t = None, 0, 0
        msgs = transcript(rec, a.events)
        msgs.append({"role": "user", "content": FINAL_ANSWER_PROMPT.format(reason=stop.reason)})
        try:
            turn = await asyncio.wait_for(self.model.complete(
                msgs, [FINAL_ANSWER_SPEC] if required else [], max_tokens=budgets.final_answer_max_tokens,
                hints=CallHints(session_id=run_id, program_id=run_id), **choice), budgets.final_answer_timeout_s)
            answer, in_t, out_t = turn.content, turn.input_tokens, turn.output_tokens
            final = [c for c in turn.tool_calls if c.name == FINAL_ANSWER_TOOL]
            if final:
                answer = _answer_of(final[0])
        except asyncio.TimeoutError:
            logger.warning("run %s: no final answer within %g s", run_id, budgets.final_answer_timeout_s)
        ev = self._record(run_id, "final", {"content": answer, "ended_by": stop.guard, "reason": stop.reason,
                                            "input_tokens": in_t, "output_tokens": out_t})
        gov.apply(ev)
        self._end(run_id, "stopped", answer, stop.guard, stop.reason, gov)

    def _final_call(self, run_id: str, gov: Governor, calls: list[ModelCall]) -> None:
        answer = _answer_of(next(c for c in calls if c.name == FINAL_ANSWER_TOOL))
        self._record(run_id, "final", {"content": answer, "ended_by": None, "via": FINAL_ANSWER_TOOL})
        self._end(run_id, "completed", answer, None, None, gov)

    async def _run_calls(self, run_id: str, rec: RunRecord, gov: Governor, calls: list[ModelCall],
                         started: dict[str, RunEvent]) -> GuardStop | None:
        """Run one step's tool calls in order; a GuardStop when the run must end."""
        for call in calls:
            if call.id in started:
                # Started before a crash, never finished.
                tool = self.tools[call.name] if call.name in self.tools else None
                if tool is None or not tool.idempotent:
                    ev = self._record(run_id, "tool_unknown", {
                        "call_id": call.id, "name": call.name, "arguments": call.arguments,
                        "content": f"error: the outcome of this {call.name} call is unknown (the run was "
                                   "interrupted while it ran); it was not run again"})
                    gov.apply(ev)
                    continue
            stop = await self._one_call(run_id, rec, gov, call, retry=call.id in started)
            if stop is not None:
                return stop
        return gov.stop

    async def _one_call(self, run_id: str, rec: RunRecord, gov: Governor, call: ModelCall,
                        retry: bool = False) -> GuardStop | None:
        base = {"call_id": call.id, "name": call.name, "arguments": call.arguments}
        if call.name not in rec.tools or call.name not in self.tools:
            return self._finish_call(run_id, gov, {**base, "ok": False, "refused": True, "error": "unknown_tool",
                                                   "content": f"error: no tool named {call.name!r} in this run "
                                                              f"(tools: {', '.join(rec.tools)})"})
        verdict = gov.check_tool_call(call.name)
        if isinstance(verdict, GuardStop):
            self._record(run_id, "tool_finished", {**base, "ok": False, "refused": True, "error": verdict.guard,
                                                   "content": f"error: not run: {verdict.reason}"})
            gov.apply(self._record(run_id, "guard", {"guard": verdict.guard, "action": "stop",
                                                     "reason": verdict.reason}))
            return verdict
        if verdict is not None:
            kind, message = verdict
            self._record(run_id, "guard", {"guard": kind, "action": "refuse", "tool": call.name, "reason": message})
            if self.metrics is not None:
                self.metrics.guard_trip(kind)
            return self._finish_call(run_id, gov, {**base, "ok": False, "refused": True, "error": kind,
                                                   "content": message})
        tool = self.tools[call.name]
        gov.apply(self._record(run_id, "tool_started", {**base, "idempotent": tool.idempotent, "retry": retry}))
        before = gov.breaker(call.name).state
        left = gov.time_left()
        act = self._active.get(run_id)
        try:
            with run_notebook(act.notebook if act is not None else {}):
                result = await asyncio.wait_for(self.tools.call(call.name, call.arguments), left) \
                    if math.isfinite(left) else await self.tools.call(call.name, call.arguments)
        except asyncio.TimeoutError:
            result = ToolResult(call.name, False, f"error: {call.name} was cut off by the run's deadline",
                                "deadline", max(0.0, left))
        if self.metrics is not None:
            self.metrics.tool_call(call.name, result.duration_s, result.ok)
        if self.on_tool_latency is not None and result.error != "deadline":
            self.on_tool_latency(call.name, result.duration_s)
        stop = self._finish_call(run_id, gov, {**base, "ok": result.ok, "content": result.content,
                                               "error": result.error, "duration_s": round(result.duration_s, 6)})
        after = gov.breaker(call.name)
        if after.state is not before:
            self._record(run_id, "breaker", {"tool": call.name, "from": before.value, "to": after.state.value})
            if after.state is BreakerState.OPEN and self.metrics is not None:
                self.metrics.guard_trip("circuit_open")
        if result.error == "deadline":
            stop = GuardStop("deadline", f"the run's deadline of {gov.budgets.deadline_s:g} s passed during "
                                         f"a {call.name} call")
            gov.apply(self._record(run_id, "guard", {"guard": "deadline", "action": "stop", "reason": stop.reason}))
        return stop

    def _finish_call(self, run_id: str, gov: Governor, data: dict) -> GuardStop | None:
        """Record a call's end (run or refused) and act on the loop detector's verdict."""
        verdict = gov.apply(self._record(run_id, "tool_finished", data))
        self.store.update_run(run_id, usage=gov.usage())
        if verdict is None or verdict.level == Escalation.NONE:
            return None
        action = {Escalation.HINT: "hint", Escalation.REMOVE: "remove", Escalation.STOP: "stop"}[verdict.level]
        advice = {"hint": "do not repeat it; use the results you have or answer",
                  "remove": f"{verdict.tool} has been taken away; answer with what you have",
                  "stop": "the run is ending"}[action]
        gov.apply(self._record(run_id, "guard", {"guard": "loop", "action": action, "pattern": verdict.kind,
                                                 "tool": verdict.tool, "reason": verdict.reason, "advice": advice}))
        if self.metrics is not None:
            self.metrics.guard_trip(f"loop_{verdict.kind}")
        return gov.stop if action == "stop" else None
