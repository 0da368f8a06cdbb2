"""/v1/agents/runs: agent runs over HTTP, on the server's own engine.

    POST /v1/agents/runs                  {"task", "tools"?, "budgets"?, "system"?, "metadata"?,
                                           "stream"?}: 201 with the run, or (stream) its events as SSE
    GET  /v1/agents/runs                  the latest runs (?status=, ?limit=)
    GET  /v1/agents/runs/{id}             the run with its whole trace
    GET  /v1/agents/runs/{id}/events      SSE: the events after ?after=N, live until the run ends
    POST /v1/agents/runs/{id}/cancel      cancel it

Runs live in the agent store (SQLite under the data dir), so a restarted server resumes the
runs it left unfinished. Each run is scoped to the tenant (API key) that created it: another
tenant gets 404. The tools are the built-in ones (read_file only with --agent-sandbox).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from metroline.agents.metrics import AgentMetrics
from metroline.agents.model import EngineChatModel
from metroline.agents.runtime import AgentRuntime, Budgets
from metroline.agents.store import RUN_STATUSES, RunRecord
from metroline.agents.tools import builtin_tools
from metroline.server.protocol import APIError, bad_request

logger = logging.getLogger("metroline.server")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, max_length=200_000)
    tools: list[str] | None = Field(default=None, max_length=256)
    budgets: dict[str, Any] | None = None
    system: str | None = Field(default=None, max_length=200_000)
    metadata: dict[str, str] | None = Field(default=None, max_length=64)
    stream: bool = False
    model: str | None = None
    tool_choice: Literal["auto", "required"] = "auto"


def agents_of(state):
    """The server's agent runtime (created on first use: store, tools, metrics)."""
    rt = getattr(state, "agent_runtime", None)
    if rt is None:
        cfg = state.config
        model = EngineChatModel(state.engine, name=state.model_names[0], tokenizer=state.tokenizer)
        rt = AgentRuntime(model, builtin_tools(sandbox=cfg.agent_sandbox), state.store,
                          max_concurrent_runs=cfg.agent_max_runs, metrics=AgentMetrics(state.metrics.registry))
        state.agent_runtime = rt
    return rt


def _tenant(request: Request) -> str | None:
    return getattr(request.state, "tenant", None)


def _get_run(request: Request, run_id: str) -> RunRecord:
    rec = agents_of(request.app.state.metroline).store.get_run(run_id)
    if rec is None or rec.metadata.get("tenant") != _tenant(request):
        raise APIError(404, f"no agent run {run_id!r}", "invalid_request_error", "run_id", "run_not_found")
    return rec


def _sse(kind: str, obj) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _event_stream(rt: AgentRuntime, run_id: str, after: int = 0):
    async def gen():
        async for ev in rt.stream(run_id, after):
            yield _sse(ev.kind, ev.to_dict())
        yield _sse("done", rt.store.get_run(run_id).to_json())
    return StreamingResponse(gen(), media_type="text/event-stream", headers=_SSE_HEADERS)


async def create_run(body: RunRequest, request: Request):
    state = request.app.state.metroline
    state.check_admitting()
    if body.model is not None and body.model not in state.model_names:
        raise APIError(404, f"the model {body.model!r} does not exist; served: {list(state.model_names)}",
                       "invalid_request_error", "model", "model_not_found")
    rt = agents_of(state)
    try:
        budgets = Budgets.from_dict(body.budgets, rt.budgets)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e), "budgets", "invalid_budgets") from None
    meta = dict(body.metadata or {})
    meta["tenant"] = _tenant(request)
    try:
        run_id = await rt.start(body.task, tools=body.tools, budgets=budgets, system=body.system, metadata=meta,
                                tool_choice=body.tool_choice)
    except ValueError as e:
        raise bad_request(str(e), "tools" if "tool" in str(e) else "task") from None
    if body.stream:
        return _event_stream(rt, run_id)
    return JSONResponse(rt.store.get_run(run_id).to_json(), status_code=201)


async def list_runs(request: Request, status: str | None = None, limit: int = 20) -> dict:
    if status is not None and status not in RUN_STATUSES:
        raise bad_request(f"status must be one of {', '.join(RUN_STATUSES)}", "status")
    if not 1 <= limit <= 1000:
        raise bad_request("limit must be in [1, 1000]", "limit")
    store = agents_of(request.app.state.metroline).store
    tenant = _tenant(request)
    runs = [r for r in store.list_runs(status, limit=10 * limit) if r.metadata.get("tenant") == tenant][:limit]
    return {"object": "list", "data": [r.to_json() for r in runs]}


async def get_run(run_id: str, request: Request) -> dict:
    rec = _get_run(request, run_id)
    return rec.to_json(agents_of(request.app.state.metroline).store.events(run_id))


async def run_events(run_id: str, request: Request, after: int = 0):
    _get_run(request, run_id)
    if after < 0:
        raise bad_request("after must be >= 0", "after")
    return _event_stream(agents_of(request.app.state.metroline), run_id, after)


async def cancel_run(run_id: str, request: Request) -> dict:
    _get_run(request, run_id)
    rt = agents_of(request.app.state.metroline)
    await rt.cancel(run_id)
    return rt.store.get_run(run_id).to_json()


async def startup(state) -> None:
    """Resume the runs a previous server left unfinished."""
    rt = agents_of(state)
    ids = await rt.resume_unfinished()
    if ids:
        logger.info("resumed %d unfinished agent run(s)", len(ids))


async def shutdown(state) -> None:
    """Active runs stop but stay `running` in the store: the next server resumes them."""
    rt = getattr(state, "agent_runtime", None)
    if rt is not None:
        await rt.aclose()


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/agents/runs", create_run, methods=["POST"], status_code=201)
    app.add_api_route("/v1/agents/runs", list_runs, methods=["GET"])
    app.add_api_route("/v1/agents/runs/{run_id}", get_run, methods=["GET"])
    app.add_api_route("/v1/agents/runs/{run_id}/events", run_events, methods=["GET"])
    app.add_api_route("/v1/agents/runs/{run_id}/cancel", cancel_run, methods=["POST"])
