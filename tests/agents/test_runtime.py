"""Scenario tests of the agent runtime with a scripted model (no real model): each run ends the
way its guard says, and the store holds the whole trace."""

from __future__ import annotations

import asyncio
import time

import pytest

from metroline.agents import AgentRuntime, Budgets, GuardConfig, ScriptedModel, SQLiteRunStore, ToolRegistry
from metroline.agents.runtime import transcript
from metroline.agents.tools import builtin_tools


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def store(tmp_path):
    s = SQLiteRunStore(str(tmp_path / "runs.sqlite3"))
    yield s
    s.close()


def kinds(result) -> list[str]:
    return [e["kind"] for e in result.events]


def guards(result) -> list[tuple]:
    return [(e["guard"], e["action"], e.get("pattern")) for e in result.events if e["kind"] == "guard"]


def test_a_calculator_task_completes_and_the_store_holds_the_trace(store):
    model = ScriptedModel([{"tool": "calculator", "arguments": {"expression": "17 * 23"}},
                           {"tool": "calculator", "arguments": {"expression": "391 + 4"}},
                           "The answer is 395."])
    rt = AgentRuntime(model, builtin_tools(), store)
    res = _run(rt.run("What is 17 * 23 + 4?", tools=["calculator"]))
    assert res.status == "completed" and res.output == "The answer is 395." and res.ended_by is None
    assert kinds(res) == ["model_call", "tool_started", "tool_finished"] * 2 + ["model_call", "final"]
    results = [e["content"] for e in res.events if e["kind"] == "tool_finished"]
    assert results == ["391", "395"]
    # The second model call saw the first result; only the run's tools were offered.
    seen = model.calls[1]["messages"]
    assert seen[-1] == {"role": "tool", "tool_call_id": res.events[0]["tool_calls"][0]["id"], "content": "391"}
    assert model.calls[0]["tools"] == ["calculator"]
    assert model.calls[0]["hints"].program_id == res.run_id == model.calls[0]["hints"].session_id
    # The KV is retained across the tool pause for about the tool's expected latency: the prior
    # before any call, then what the calculator was seen to take (well under the prior).
    first, later = model.calls[0]["hints"].kv_retention_s, model.calls[2]["hints"].kv_retention_s
    assert first > 0 and 0 < later < first
    assert rt.latency.num_observations("calculator") == 2
    # Read back from the file, the record and trace are the same.
    rec = store.get_run(res.run_id)
    assert rec.status == "completed" and rec.usage["tool_calls"] == 2 and rec.usage["model_calls"] == 3
    assert [e.kind for e in store.events(res.run_id)] == kinds(res)


def test_an_endless_tool_loop_escalates_hint_then_remove_then_stop(store):
    model = ScriptedModel([{"tool": "calculator", "arguments": {"expression": "1+1"}}], then=None)
    model.then = lambda msgs, tools: (
        "final words" if not tools else {"tool": "calculator", "arguments": {"expression": "1+1"}})
    rt = AgentRuntime(model, builtin_tools(), store, budgets=Budgets(max_steps=30))
    res = _run(rt.run("loop forever", tools=["calculator", "clock"]))
    assert res.status == "stopped" and res.ended_by == "loop", res
    assert [g[1] for g in guards(res) if g[0] == "loop"] == ["hint", "remove", "stop"]
    # After the removal the grammar no longer offered the tool, and the repeated attempts were refused.
    removed_at = next(i for i, e in enumerate(res.events) if e["kind"] == "guard" and e["action"] == "remove")
    later_calls = [m for m in model.calls if "calculator" not in m["tools"]]
    assert later_calls, "calculator was never taken out of the offered tools"
    assert any(e["kind"] == "tool_finished" and e.get("error") == "tool_removed" for e in res.events[removed_at:])
    # The final answer was asked for without tools.
    assert model.calls[-1]["tools"] == [] and res.output == "final words"
    assert res.events[-1]["kind"] == "final" and res.events[-1]["ended_by"] == "loop"
    assert res.usage["model_calls"] < 30


def test_an_a_b_cycle_is_detected_as_a_cycle(store):
    script = [{"tool": "calculator", "arguments": {"expression": "2*3"}}, {"tool": "clock"}] * 20
    model = ScriptedModel(script)
    rt = AgentRuntime(model, builtin_tools(), store, budgets=Budgets(max_steps=40))
    res = _run(rt.run("cycle", tools=["calculator", "clock"]))
    loop = [g for g in guards(res) if g[0] == "loop"]
    assert loop[0] == ("loop", "hint", "cycle")
    assert res.status == "stopped" and res.ended_by == "loop"
    # The cycle was caught at its 4th call, long before the step budget.
    first_guard = next(i for i, e in enumerate(res.events) if e["kind"] == "guard")
    assert sum(e["kind"] == "tool_finished" for e in res.events[:first_guard]) == 4


def test_an_always_failing_tool_opens_its_breaker_then_half_opens_and_closes(store):
    now = [0.0]
    failing = [True]
    reg = ToolRegistry()

    @reg.tool
    def flaky(x: int) -> str:
        """A tool that fails while `failing` says so."""
        if failing[0]:
            raise ConnectionError("backend down")
        return f"ok {x}"

    @reg.tool
    def status() -> str:
        """Always works."""
        return "fine"

    def advance(dt):
        def entry(msgs, tools):
            now[0] += dt
            if now[0] > 40:
                failing[0] = False  # the backend came back
            return {"tool": "flaky", "arguments": {"x": int(now[0])}}
        return entry

    model = ScriptedModel([advance(1), advance(1), advance(1), advance(1), advance(40), "done"])
    rt = AgentRuntime(model, reg, store, guards=GuardConfig(breaker_failures=2, breaker_cooldown_s=30),
                      mono=lambda: now[0])
    res = _run(rt.run("use flaky"))
    assert res.status == "completed" and res.output == "done"
    ends = [e for e in res.events if e["kind"] == "tool_finished"]
    assert [e["error"] for e in ends] == ["exception", "exception", "circuit_open", "circuit_open", None]
    assert "backend down" in ends[0]["content"] and "circuit breaker open" in ends[2]["content"]
    transitions = [(e["from"], e["to"]) for e in res.events if e["kind"] == "breaker"]
    assert transitions == [("closed", "open"), ("half_open", "closed")]
    # While open the tool was out of the grammar; once the cool-down passed it was offered again.
    assert [m["tools"] for m in model.calls[:6]] == [["flaky", "status"]] * 2 + [["status"]] * 3 + [["flaky", "status"]]
    # Calls refused by the open breaker never reached the tool.
    assert sum(e["kind"] == "tool_started" for e in res.events) == 3


def test_a_slow_tool_is_cut_off_by_the_deadline(store):
    reg = ToolRegistry()

    @reg.tool(timeout_s=60)
    async def slow() -> str:
        """Takes a minute."""
        await asyncio.sleep(60)
        return "late"

    model = ScriptedModel([{"tool": "slow"}, "never"], then="summary after the deadline")
    rt = AgentRuntime(model, reg, store, budgets=Budgets(deadline_s=0.5))
    t0 = time.monotonic()
    res = _run(rt.run("be slow"))
    assert time.monotonic() - t0 < 10
    assert res.status == "stopped" and res.ended_by == "deadline"
    assert [e.get("error") for e in res.events if e["kind"] == "tool_finished"] == ["deadline"]
    assert res.output == "never"  # the final answer (without tools) is the model's next turn
    assert model.calls[-1]["tools"] == []


@pytest.mark.parametrize("budget, guard", [
    (Budgets(max_steps=3), "max_steps"),
    (Budgets(max_tool_calls=2), "max_tool_calls"),
    (Budgets(max_tokens=120), "token_budget"),
    (Budgets(max_cost=0.0005, price_per_million_input=10, price_per_million_output=30), "cost_budget"),
])
def test_budget_exhaustion_ends_the_run_with_a_final_answer(store, budget, guard):
    n = iter(range(1000))
    model = ScriptedModel([lambda m, t: {"tool": "calculator", "arguments": {"expression": f"{next(n)} + 1"}}],
                          then=lambda m, t: ("my best answer" if not t
                                             else {"tool": "calculator", "arguments": {"expression": f"{next(n)} + 1"}}))
    rt = AgentRuntime(model, builtin_tools(), store)
    res = _run(rt.run("count up", tools=["calculator"], budgets=budget))
    assert res.status == "stopped" and res.ended_by == guard, (res.ended_by, res.reason)
    assert res.output == "my best answer" and model.calls[-1]["tools"] == []
    rec = store.get_run(res.run_id)
    assert rec.ended_by == guard and rec.reason and rec.result == "my best answer"
    u = res.usage
    if guard == "max_tool_calls":
        assert u["tool_calls"] == 2
    if guard == "token_budget":
        assert u["input_tokens"] + u["output_tokens"] >= 120


def test_a_spent_per_tool_budget_takes_the_tool_out_and_refuses_it(store):
    model = ScriptedModel([{"tool": "calculator", "arguments": {"expression": f"{i} + 1"}} for i in range(4)]
                          + ["done"])
    rt = AgentRuntime(model, builtin_tools(), store)
    res = _run(rt.run("count", tools=["calculator", "clock"], budgets={"per_tool": {"calculator": 2}}))
    assert res.status == "completed" and res.output == "done"
    errors = [e.get("error") for e in res.events if e["kind"] == "tool_finished"]
    assert errors == [None, None, "tool_budget", "tool_budget"]
    assert [m["tools"] for m in model.calls] == [["calculator", "clock"]] * 2 + [["clock"]] * 3


def test_cancel_stops_a_run_in_a_slow_tool(store):
    reg = ToolRegistry()
    started = asyncio.Event()

    @reg.tool(timeout_s=60)
    async def wait_forever() -> str:
        """Never answers."""
        started.set()
        await asyncio.sleep(60)
        return "never"

    async def scenario():
        rt = AgentRuntime(ScriptedModel([{"tool": "wait_forever"}]), reg, store)
        run_id = await rt.start("wait")
        await asyncio.wait_for(started.wait(), 10)
        t0 = time.monotonic()
        assert await rt.cancel(run_id) is True
        assert time.monotonic() - t0 < 5
        assert await rt.cancel(run_id) is False  # already ended
        return await rt.wait(run_id)

    res = _run(scenario())
    assert res.status == "cancelled"
    assert kinds(res)[-2:] == ["tool_started", "cancelled"]


def test_stream_yields_stored_then_live_events_until_the_end(store):
    async def scenario():
        model = ScriptedModel([{"tool": "calculator", "arguments": {"expression": "1+2"}}, "3"], delay_s=0.05)
        rt = AgentRuntime(model, builtin_tools(), store)
        run_id = await rt.start("add")
        seen = [ev.kind async for ev in rt.stream(run_id)]
        return seen, (await rt.wait(run_id))

    seen, res = _run(scenario())
    assert seen == kinds(res) and seen[-1] == "final"


def test_a_failing_model_fails_the_run_alone(store):
    class Broken:
        name = "broken"

        async def complete(self, *a, **k):
            raise RuntimeError("model exploded")

    async def scenario():
        bad = AgentRuntime(Broken(), builtin_tools(), store)
        good = AgentRuntime(ScriptedModel(["fine"]), builtin_tools(), store)
        return await asyncio.gather(bad.run("x"), good.run("y"))

    bad, good = _run(scenario())
    assert bad.status == "failed" and "model exploded" in bad.reason and bad.events[-1]["kind"] == "error"
    assert good.status == "completed" and good.output == "fine"


def test_bad_run_arguments_are_refused_before_anything_is_stored(store):
    rt = AgentRuntime(ScriptedModel(["x"]), builtin_tools(), store)
    with pytest.raises(ValueError, match="unknown tools"):
        _run(rt.start("t", tools=["nope"]))
    with pytest.raises(ValueError, match="unknown budget fields"):
        _run(rt.start("t", budgets={"max_stepz": 3}))
    with pytest.raises(ValueError, match="max_steps"):
        _run(rt.start("t", budgets={"max_steps": -1}))
    with pytest.raises(ValueError, match="non-empty"):
        _run(rt.start("  "))
    assert store.list_runs() == []


def test_transcript_is_rebuilt_from_events_alone(store):
    model = ScriptedModel([{"tool": "calculator", "arguments": {"expression": "2**10"}}, "1024"])
    rt = AgentRuntime(model, builtin_tools(), store)
    res = _run(rt.run("2^10?", system="be terse"))
    rec = store.get_run(res.run_id)
    msgs = transcript(rec, store.events(res.run_id))
    assert msgs[0] == {"role": "system", "content": "be terse"} and msgs[1]["content"] == "2^10?"
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "2**10"}'}
    assert msgs[3]["content"] == "1024" and msgs[4] == {"role": "assistant", "content": "1024"}


def test_a_run_cancelled_while_it_waits_for_a_slot_ends_cancelled(store):
    reg = ToolRegistry()
    started = asyncio.Event()

    @reg.tool(timeout_s=60)
    async def hold() -> str:
        """Holds the only slot."""
        started.set()
        await asyncio.sleep(60)
        return "never"

    async def scenario():
        rt = AgentRuntime(ScriptedModel([{"tool": "hold"}]), reg, store, max_concurrent_runs=1)
        first = await rt.start("hold the slot")
        await asyncio.wait_for(started.wait(), 10)
        second = await rt.start("wait for it")
        await asyncio.sleep(0.05)
        assert store.get_run(second).status == "queued"
        assert await rt.cancel(second) is True
        assert await rt.cancel(first) is True
        return await rt.wait(first), await rt.wait(second)

    first, second = _run(scenario())
    assert first.status == second.status == "cancelled"
    assert kinds(second) == ["cancelled"]


def test_the_notebook_is_the_runs_own_and_comes_back_with_it_after_a_restart(store):
    """Each run has its own notes (another run does not see them); they are kept in the run's
    trace, so a run resumed by a new runtime reads what it wrote before the restart."""
    tools = builtin_tools()

    @tools.tool(idempotent=False)
    async def wait_forever() -> str:
        """Never returns."""
        await asyncio.sleep(3600)
        return "never"

    first = ScriptedModel([{"tool": "notebook_set", "arguments": {"key": "plan", "value": "add 2 and 3"}},
                           {"tool": "wait_forever", "arguments": {}}])

    async def until_interrupted():
        rt = AgentRuntime(first, tools, store)
        run_id = await rt.start("take notes", tools=["notebook_set", "notebook_get", "notebook_list",
                                                     "wait_forever"])
        for _ in range(400):
            if any(e.kind == "tool_started" and e.data["name"] == "wait_forever" for e in store.events(run_id)):
                break
            await asyncio.sleep(0.01)
        await rt.aclose()  # a shutdown leaves the run `running` for the next runtime
        return run_id

    run_id = _run(until_interrupted())
    assert store.get_run(run_id).status == "running"

    other = ScriptedModel([{"tool": "notebook_list", "arguments": {}}, "nothing here"])
    res_other = _run(AgentRuntime(other, tools, store).run("look", tools=["notebook_list"]))
    listed = [e["content"] for e in res_other.events if e["kind"] == "tool_finished"]
    assert listed == ["[]"], listed  # not the first run's note

    second = ScriptedModel([{"tool": "notebook_get", "arguments": {"key": "plan"}}, "5"])

    async def resume():  # a new process: a fresh registry, whose notebook starts empty
        rt = AgentRuntime(second, builtin_tools(), store)
        await rt.resume(run_id)
        return await rt.wait(run_id)

    _run(resume())
    rec = store.get_run(run_id)
    assert rec.status == "completed" and rec.result == "5"
    done = [(e.data["name"], e.data["content"]) for e in store.events(run_id) if e.kind == "tool_finished"]
    assert ("notebook_get", "add 2 and 3") in done, done
    # The interrupted non-idempotent call was reported, not run again.
    assert any(e.kind == "tool_unknown" and e.data["name"] == "wait_forever" for e in store.events(run_id))
    assert _run(tools.call("notebook_list", {})).content == "[]"  # the registry's own was never written


def test_a_run_reads_the_same_over_http_and_from_the_cli(store):
    """RunRecord.to_json is the one public shape (GET /v1/agents/runs/{id}, agent show --json):
    the runtime's own metadata (tenant, system prompt) is left out; the caller's and the
    run's tool_choice are kept."""
    model = ScriptedModel(["done"])
    rt = AgentRuntime(model, builtin_tools(), store)
    res = _run(rt.run("say done", tools=["clock"], system="be brief", metadata={"tenant": "t1", "team": "x"}))
    rec = store.get_run(res.run_id)
    assert rec.metadata["tenant"] == "t1" and rec.metadata["system"] == "be brief"
    out = rec.to_json(store.events(rec.id))
    assert out["id"] == rec.id and out["object"] == "agent.run" and out["status"] == "completed"
    assert out["metadata"] == {"team": "x", "tool_choice": "auto"} and out["result"] == "done"
    assert [e["kind"] for e in out["events"]] == ["model_call", "final"]
    assert "events" not in rec.to_json()


class _FlakyFront:
    """An engine front whose first call dies after one delta (an engine replica lost
    mid-call, serve --replicas); `is_alive`: whether the front still serves."""

    def __init__(self, tokenizer, alive: bool):
        self.tokenizer, self.is_alive, self.calls = tokenizer, alive, []

    async def generate(self, prompt, params, request_id=None, hints=None):
        from metroline.engine.request import CompletionOutput, RequestOutput
        from metroline.errors import EngineDeadError

        self.calls.append(request_id)
        if len(self.calls) == 1:
            yield RequestOutput(request_id, prompt, [CompletionOutput(0, "half an ans", [1])], False)
            raise EngineDeadError("the engine replica serving this request was lost")
        yield RequestOutput(request_id, prompt, [CompletionOutput(0, "Paris.", [2, 3], "stop")], True)


@pytest.mark.parametrize("alive", [True, False])
def test_a_model_call_cut_by_a_lost_replica_is_made_again_while_the_front_serves(default_loaded, alive):
    from metroline.agents.model import EngineChatModel
    from metroline.errors import EngineDeadError

    front = _FlakyFront(default_loaded.tokenizer, alive)
    model = EngineChatModel(front)
    ask = model.complete([{"role": "user", "content": "Capital of France?"}], [], max_tokens=8)
    if not alive:  # one engine that died: nothing to try again on
        with pytest.raises(EngineDeadError):
            _run(ask)
        assert len(front.calls) == 1
        return
    turn = _run(ask)
    assert turn.content == "Paris." and turn.output_tokens == 2  # nothing of the cut call kept
    assert len(front.calls) == 2 and len(set(front.calls)) == 2
