"""/v1/agents/runs on a real server with the default model: a multi-step calculator task with
valid tool calls, SSE events per step, the trace, cancel, errors, tenants, resume at start."""

from __future__ import annotations

import json
import time

import pytest

from metroline.agents.store import RunRecord, SQLiteRunStore
from tests.server.conftest import wait_idle

TASK = "What is 12 * 7 + 3? Use the calculator."


def _wait_done(http, run_id, timeout=120.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/v1/agents/runs/{run_id}", headers=headers)
        assert r.status_code == 200, r.text
        run = r.json()
        if run["status"] not in ("queued", "running"):
            return run
        assert time.monotonic() < deadline, f"run still {run['status']} after {timeout} s"
        time.sleep(0.1)


def _sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_a_calculator_run_with_the_real_model_makes_valid_tool_calls(server, engine):
    with server.http() as http:
        r = http.post("/v1/agents/runs", json={"task": TASK, "tools": ["calculator"], "tool_choice": "required",
                                               "budgets": {"max_steps": 6, "max_tokens_per_call": 64}})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["object"] == "agent.run" and created["id"].startswith("run_")
        run = _wait_done(http, created["id"])
    assert run["status"] in ("completed", "stopped"), run
    if run["status"] == "stopped":
        assert run["ended_by"] and run["reason"]
    calls = [e for e in run["events"] if e["kind"] == "tool_finished"]
    assert calls, "the model made no tool call"
    # Every call the grammar let through parsed, matched the schema and evaluated.
    assert all(e["ok"] and e["name"] == "calculator" for e in calls), calls
    first = next(e for e in run["events"] if e["kind"] == "model_call")
    assert first["tool_calls"][0]["arguments"]["expression"].strip()
    assert run["events"][-1]["kind"] == "final" and run["result"]
    assert run["usage"]["tool_calls"] == len(calls) and run["usage"]["input_tokens"] > 0
    wait_idle(engine)  # the run's KV pin was released when it ended


def test_a_streamed_run_sends_one_event_per_step_then_done(server, engine):
    with server.http() as http:
        r = http.post("/v1/agents/runs", json={"task": "What is 2 + 2?", "tools": ["calculator"],
                                               "tool_choice": "required", "stream": True,
                                               "budgets": {"max_steps": 3, "max_tokens_per_call": 48}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.text)
        kinds = [k for k, _ in events]
        assert kinds[0] == "model_call" and kinds[-2] == "final" and kinds[-1] == "done"
        seqs = [d["seq"] for k, d in events[:-1]]
        assert seqs == list(range(1, len(seqs) + 1))
        done = events[-1][1]
        trace = http.get(f"/v1/agents/runs/{done['id']}").json()
        assert [e["kind"] for e in trace["events"]] == kinds[:-1]
    wait_idle(engine)


def test_cancel_ends_a_running_run_and_frees_its_kv(server, engine):
    with server.http() as http:
        r = http.post("/v1/agents/runs", json={"task": "Count to a million, one calculator call at a time.",
                                               "tools": ["calculator"], "tool_choice": "required",
                                               "budgets": {"max_steps": 50}})
        run_id = r.json()["id"]
        r = http.post(f"/v1/agents/runs/{run_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        again = http.post(f"/v1/agents/runs/{run_id}/cancel").json()
        assert again["status"] == "cancelled"
        assert http.get(f"/v1/agents/runs/{run_id}").json()["events"][-1]["kind"] == "cancelled"
    wait_idle(engine)


@pytest.mark.parametrize("body, status, param", [
    ({"task": "x", "tools": ["rm_rf"]}, 400, "tools"),
    ({"task": "x", "budgets": {"max_steps": -1}}, 400, "budgets"),
    ({"task": "x", "budgets": {"bogus": 1}}, 400, "budgets"),
    ({"task": ""}, 400, None),
    ({"task": "x", "surprise": True}, 400, None),
    ({"task": "x", "tool_choice": "sometimes"}, 400, None),
    ({"task": "x", "model": "not-served"}, 404, "model"),
])
def test_bad_run_requests_get_openai_errors(server, body, status, param):
    with server.http() as http:
        r = http.post("/v1/agents/runs", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["type"]
        if param:
            assert err["param"] == param
        assert http.get("/v1/agents/runs/run_doesnotexist").status_code == 404
        assert http.post("/v1/agents/runs/run_doesnotexist/cancel").status_code == 404
        assert http.get("/v1/agents/runs?status=weird").status_code == 400


def test_runs_are_scoped_to_their_tenant(aux_server):
    srv = aux_server(api_key="key-a,key-b")
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with srv.http() as http:
        assert http.post("/v1/agents/runs", json={"task": "x"}).status_code == 401
        r = http.post("/v1/agents/runs", headers=a, json={"task": "What is 1 + 1?", "tools": ["calculator"],
                                                          "tool_choice": "required", "budgets": {"max_steps": 2}})
        run_id = r.json()["id"]
        assert http.get(f"/v1/agents/runs/{run_id}", headers=b).status_code == 404
        assert http.post(f"/v1/agents/runs/{run_id}/cancel", headers=b).status_code == 404
        assert run_id not in [x["id"] for x in http.get("/v1/agents/runs", headers=b).json()["data"]]
        assert run_id in [x["id"] for x in http.get("/v1/agents/runs", headers=a).json()["data"]]
        _wait_done(http, run_id, headers=a)


def test_a_new_server_resumes_the_runs_left_unfinished(aux_server, tmp_path, engine):
    path = str(tmp_path / "agents.sqlite3")
    store = SQLiteRunStore(path)
    store.create_run(RunRecord("run_left_behind", "What is 5 * 5?", tools=["calculator"], status="running",
                               budgets={"max_steps": 2, "max_tokens_per_call": 48},
                               metadata={"tenant": None, "tool_choice": "required"}))
    store.close()
    srv = aux_server(agent_store_path=path)  # its start-up resumes the run
    with srv.http() as http:
        run = _wait_done(http, "run_left_behind")
    assert run["status"] in ("completed", "stopped")
    assert run["events"][0]["kind"] == "resumed"
    wait_idle(engine)


def test_agent_metrics_are_exported(server):
    with server.http() as http:
        r = http.post("/v1/agents/runs", json={"task": "What is 3 * 3?", "tools": ["calculator"],
                                               "tool_choice": "required", "budgets": {"max_steps": 2}})
        _wait_done(http, r.json()["id"])
        text = http.get("/metrics").text
    for name in ("metroline_agent_runs_active", "metroline_agent_steps_total",
                 "metroline_agent_tool_latency_seconds", "metroline_agent_job_completion_seconds"):
        assert name in text, name
