"""Every numeric request field of every generation endpoint at its type's extremes (issue 16):
0, -1, 2**31, 2**63, 2**64, 1e308, NaN, +-Infinity, a string where a number belongs. Each
request gets a clear answer, 200 or an OpenAI-shaped 400, never a server error or a hang,
and a greedy stream running on the same engine meanwhile comes out exactly as it does alone.

The fields are read from the request models themselves (every int / float field, including
those added later), so a new field is covered without editing this file."""

from __future__ import annotations

import concurrent.futures
import json
import typing

import pytest

from metroline.server.protocol import ChatCompletionRequest, CompletionRequest
from metroline.server.responses import ResponsesRequest

MODEL = "SmolLM2-135M-Instruct"

# Python's json writes NaN / Infinity as the bare tokens that JSON parsers in the wild accept.
EXTREMES = [0, -1, 2**31, 2**63 - 1, -2**63, 2**63, 2**64, 1e308, float("nan"), float("inf"), float("-inf"), "12"]

ENDPOINTS = {
    "/v1/completions": (CompletionRequest, {"prompt": "Hi", "max_tokens": 1}),
    "/v1/chat/completions": (ChatCompletionRequest, {"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 1}),
    "/v1/responses": (ResponsesRequest, {"input": "Hi", "max_output_tokens": 1, "store": False}),
}


def _numeric(annotation) -> bool:
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(annotation)
               if a is not type(None) and typing.get_origin(a) is None)


def numeric_fields(model) -> list[str]:
    return sorted(name for name, f in model.model_fields.items() if _numeric(f.annotation))


def cases():
    for path, (model, _) in ENDPOINTS.items():
        for name in numeric_fields(model):
            yield path, name


def error_of(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"], err
    return err


def test_the_field_lists_are_read_from_the_models():
    fields = numeric_fields(ChatCompletionRequest)
    assert {"temperature", "top_p", "max_tokens", "n", "seed", "top_k", "kv_retention_s", "priority",
            "top_logprobs", "max_completion_tokens", "min_tokens"} <= set(fields)
    assert "logprobs" not in fields  # a bool for chat; an int for completions
    assert "logprobs" in numeric_fields(CompletionRequest)
    assert {"max_output_tokens", "max_tool_calls"} <= set(numeric_fields(ResponsesRequest))


@pytest.mark.parametrize("path,field", list(cases()))
def test_a_numeric_field_at_its_extremes_is_answered_cleanly(server, path, field):
    _, base = ENDPOINTS[path]
    answers = {}
    with server.http() as http:
        for value in EXTREMES:
            body = {**base, field: value}
            r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            answers[repr(value)] = r.status_code
            assert r.status_code in (200, 400), (field, value, r.status_code, r.text[:300])
            if r.status_code == 400:
                err = error_of(r)
                assert err["type"] == "invalid_request_error", (field, value, err)
            elif path == "/v1/responses":
                assert r.json()["object"] == "response", r.text[:300]
            else:
                assert r.json()["choices"], r.text[:300]
    # Non-finite floats and numbers past any sensible bound are never taken as they are.
    for value in ("nan", "inf", "-inf"):
        assert answers[value] == 400, (field, answers)
    for big in (2**63, 2**64):  # no signed 64-bit integer holds them
        assert answers[repr(big)] == 400, (field, answers)


def test_extremes_while_a_stream_runs_leave_it_untouched(server, client):
    """A greedy stream decodes while every extreme of every field hits the same engine: its
    text is the one it has alone."""
    def story():
        return "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0,
            stream=True, extra_body={"ignore_eos": True}) if c.choices)

    ref = story()
    bodies = [(path, {**base, field: value}) for path, (model, base) in ENDPOINTS.items()
              for field in numeric_fields(model) for value in EXTREMES]

    def send(item):
        path, body = item
        with server.http() as http:
            return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"}).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        fut = pool.submit(story)
        statuses = list(pool.map(send, bodies))
        assert fut.result(timeout=120) == ref
    assert set(statuses) <= {200, 400}, sorted(set(statuses))
