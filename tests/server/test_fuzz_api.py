"""Schemathesis against metroline's own /openapi.json (issue 16): requests generated from the
documented schemas, positive (valid shapes, which reach the model) and negative (every way to
break them), bounded in examples. Checks: no server error, and every answer's status, content
type and body are ones the document declares (the OpenAI error shape for each 4xx/5xx).

The generated bodies are narrowed where the schema allows work no test can afford: at most a
few output tokens, few samples, agent runs of one short model call."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install metroline[test])")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

MODEL = "SmolLM2-135M-Instruct"
REPAIR = {"task": "Say hi", "prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "input": "Hi", "tokens": [1, 2],
          "model": MODEL, "max_tokens": 3, "max_completion_tokens": 3, "max_output_tokens": 3}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CHEAP = {"max_tokens": 3, "max_completion_tokens": 3, "max_output_tokens": 3, "n": 1, "best_of": None,
         "min_tokens": 0}


OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models/{model}"),
              ("GET", "/v1/responses/{response_id}"), ("DELETE", "/v1/sessions/{session_id}"),
              ("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/agents/runs"),
              ("GET", "/v1/agents/runs/{run_id}"), ("POST", "/v1/agents/runs/{run_id}/cancel"),
              ("POST", "/v1/agents/runs"), ("GET", "/v1/agents/runs/{run_id}/events")]
WITH_BODY = {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize",
             "/v1/agents/runs"}
# An agent run goes on after its 201: one model call of a few tokens, whatever the body asks.
CHEAP_RUN = {"max_steps": 1, "max_tokens_per_call": 4, "final_answer_max_tokens": 4, "deadline_s": 30}


def narrow(case) -> None:
    """Keep a valid body valid but cheap: a handful of tokens (also when the body asks for no
    limit, which means up to the context length), one sample."""
    body = case.body
    if isinstance(body, dict):
        path = case.operation.path
        if path == "/v1/agents/runs":
            budgets = body.get("budgets")
            if budgets is None or isinstance(budgets, dict):
                body["budgets"] = {**(budgets or {}), **CHEAP_RUN}
        elif path == "/v1/responses":  # its limit is max_output_tokens (max_tokens is not read)
            if not isinstance(body.get("max_output_tokens"), int) or isinstance(body["max_output_tokens"], bool):
                body["max_output_tokens"] = 3
        elif path in ("/v1/completions", "/v1/chat/completions") and \
                not any(isinstance(body.get(k), int) for k in ("max_tokens", "max_completion_tokens")):
            body["max_tokens"] = 3
        for key, value in CHEAP.items():
            if key in body and isinstance(body[key], (int, float)) and not isinstance(body[key], bool):
                if value is None:
                    body.pop(key)
                elif body[key] > value:
                    body[key] = value


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_the_document_covers_the_routes(api_schema):
    ops = {(o.ok().method.upper(), o.ok().path) for o in api_schema.get_all_operations()}
    assert set(OPERATIONS) <= ops, sorted(set(OPERATIONS) - ops)


def test_the_document_declares_bodies_and_errors(server):
    """What the conformance checks validate against: the 200 bodies' shapes and the OpenAI
    error shape for every 4xx/5xx; no 422, which the server never sends."""
    with server.http() as http:
        spec = http.get("/openapi.json").json()
    comp = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert comp["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Completion"}
    runs = spec["paths"]["/v1/agents/runs"]["post"]["responses"]
    assert runs["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AgentRun"}
    assert "Tokenized" in spec["components"]["schemas"]
    assert "text/event-stream" in comp["200"]["content"]
    for code in ("400", "401", "404", "413", "429", "500", "503"):
        assert comp[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
    assert "ChatCompletion" in spec["components"]["schemas"] and "HTTPValidationError" not in spec["components"]["schemas"]


# Negative cases need something to break: the bodies (a bare string path parameter has no
# invalid value).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + \
        [(m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if p in WITH_BODY]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_the_api_answers_what_its_document_says(api_schema, server, method, path, mode):
    from hypothesis import HealthCheck, given, settings

    op = next(o.ok() for o in api_schema.get_all_operations()
              if o.ok().method.upper() == method and o.ok().path == path)
    statuses = []

    @settings(max_examples=10, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(op.as_strategy(generation_mode=mode))
    def check(case):
        # Repair loop (positive mode): each 400 names the field it refused; drop that field and
        # send again, so the other fuzzed fields reach the model. Every answer is checked.
        for _ in range(8):
            narrow(case)
            r = case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)
            statuses.append(r.status_code)
            if mode is not GenerationMode.POSITIVE or not isinstance(case.body, dict):
                return
            if r.status_code == 404 and case.body.get("model") != MODEL:
                case.body["model"] = MODEL
                continue
            if r.status_code != 400:
                return
            param = (r.json()["error"].get("param") or "").split(".")[0]
            if param in REPAIR and case.body.get(param) != REPAIR[param]:
                case.body[param] = REPAIR[param]  # a required field: a valid value instead
            elif param in case.body and param not in REPAIR:
                case.body.pop(param)  # (a refused "budgets": narrow() puts a cheap valid one back)
            else:
                return

    try:
        check()
    finally:
        if path == "/v1/agents/runs":  # end the runs the fuzzing started
            with server.http() as http:
                for run in http.get("/v1/agents/runs", params={"limit": 1000}).json()["data"]:
                    if run["status"] in ("queued", "running"):
                        http.post(f"/v1/agents/runs/{run['id']}/cancel")
    assert statuses and all(c < 500 for c in statuses), statuses
    reached.setdefault((path, mode.value), []).extend(statuses)


reached: dict = {}


def test_positive_fuzzing_reached_the_model():
    """The repaired positive cases were answered 200 by every generation endpoint (they ran
    on the model), not only refused."""
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize",
                 "/v1/agents/runs"):
        got = reached.get((path, "positive"))
        if got is None:
            pytest.skip("runs after the fuzzing test in the same session")
        assert {200, 201} & set(got), (path, got)
