"""Issue 12's coverage on the real default model: 20 JSON schemas and 20 tool sets, greedy and
sampled; every output parses and validates, every tool call names a given tool and its
arguments validate against that tool's schema."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from tests.server.test_structured import streamed_message  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
S, I, N, B = {"type": "string", "maxLength": 24}, {"type": "integer", "minimum": -1000, "maximum": 1000}, \
    {"type": "number", "minimum": 0, "maximum": 100}, {"type": "boolean"}


def obj(props: dict, required=None, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


SCHEMAS = [
    obj({"name": S}),
    obj({"name": S, "age": I}),
    obj({"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}}),
    obj({"ok": B}),
    obj({"score": N}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    obj({"point": obj({"x": I, "y": I})}),
    obj({"user": obj({"name": S, "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}})}),
    obj({"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}}),
    obj({"nickname": {"type": ["string", "null"], "maxLength": 12}, "level": I}),
    obj({"name": S, "middle": S}, required=["name"]),
    obj({"items": {"type": "array", "items": obj({"sku": S, "qty": {"type": "integer", "minimum": 1,
                                                                    "maximum": 9}}),
                   "minItems": 1, "maxItems": 2}}),
    obj({"matrix": {"type": "array", "items": {"type": "array", "items": I, "minItems": 2, "maxItems": 2},
                    "minItems": 2, "maxItems": 2}}),
    obj({"status": {"const": "done"}, "count": I}),
    obj({"answer": {"anyOf": [I, {"enum": ["unknown"]}]}}),
    obj({"city": S, "country": {"type": "string", "pattern": "^[A-Z]{2}$"}, "population": I}),
    obj({"flags": {"type": "array", "items": B, "minItems": 0, "maxItems": 4}}),
    obj({"meta": obj({"version": {"type": "string", "pattern": "^[0-9]\\.[0-9]$"}, "stable": B})}),
    {"type": "array", "items": obj({"k": S, "v": I}), "minItems": 1, "maxItems": 2},
]
assert len(SCHEMAS) == 20


def tool(name: str, params: dict | None, description: str = "") -> dict:
    f = {"name": name, "description": description or name.replace("_", " ")}
    if params is not None:
        f["parameters"] = params
    return {"type": "function", "function": f}


TOOL_SETS = [
    [tool("get_weather", obj({"city": S}))],
    [tool("get_weather", obj({"city": S, "unit": {"enum": ["c", "f"]}})), tool("get_time", None)],
    [tool("search", obj({"query": S, "limit": {"type": "integer", "minimum": 1, "maximum": 10}}))],
    [tool("add", obj({"a": I, "b": I})), tool("mul", obj({"a": I, "b": I}))],
    [tool("send_email", obj({"to": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}, "subject": S}))],
    [tool("ping", None)],
    [tool("book_flight", obj({"from": {"type": "string", "pattern": "^[A-Z]{3}$"},
                              "to": {"type": "string", "pattern": "^[A-Z]{3}$"}}))],
    [tool("set_light", obj({"room": S, "on": B}))],
    [tool("convert", obj({"amount": N, "currency": {"enum": ["USD", "EUR", "JPY"]}}))],
    [tool("create_todo", obj({"title": S, "priority": {"enum": ["low", "high"]}}, required=["title"]))],
    [tool("lookup", obj({"ids": {"type": "array", "items": I, "minItems": 1, "maxItems": 3}}))],
    [tool("get_stock", obj({"ticker": {"type": "string", "pattern": "^[A-Z]{1,4}$"}})), tool("get_news", obj({"topic": S}))],
    [tool("translate", obj({"text": S, "lang": {"enum": ["fr", "de", "es"]}}))],
    [tool("move", obj({"to": obj({"x": I, "y": I})}))],
    [tool("rate", obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": S}))],
    [tool("a", None), tool("b", None), tool("c", None)],
    [tool("schedule", obj({"day": {"enum": ["mon", "tue", "wed"]}, "hour": {"type": "integer", "minimum": 0,
                                                                          "maximum": 23}}))],
    [tool("nullable", obj({"note": {"type": ["string", "null"], "maxLength": 10}}))],
    [tool("calc", obj({"expr": {"type": "string", "pattern": "^[0-9+*-]{1,10}$"}}))],
    [tool("get_weather", obj({"city": S})), tool("get_time", obj({"tz": S})), tool("get_date", None)],
]
assert len(TOOL_SETS) == 20


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_twenty_schemas(client, temperature):
    bad = []
    for i, schema in enumerate(SCHEMAS):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Reply with JSON for: " + json.dumps(schema)[:200]}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
            max_tokens=160, temperature=temperature, seed=i)
        c = r.choices[0]
        try:
            assert c.finish_reason == "stop", c.finish_reason
            jsonschema.validate(json.loads(c.message.content), schema)
        except Exception as e:  # collect: the report names every failing schema
            bad.append((i, repr(e)[:120], c.message.content))
    assert not bad, bad


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_twenty_tool_sets(client, temperature):
    bad = []
    for i, tools in enumerate(TOOL_SETS):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Use a tool."}], tools=tools, tool_choice="required",
            parallel_tool_calls=False, max_tokens=120, temperature=temperature, seed=i)
        c = r.choices[0]
        try:
            assert c.finish_reason == "tool_calls", c.finish_reason
            (call,) = c.message.tool_calls
            spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
            params = spec.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
            jsonschema.validate(json.loads(call.function.arguments), params)
            # The same request streamed: the client assembles the same call from the deltas.
            message, _, finish = streamed_message(
                client, model=MODEL, messages=[{"role": "user", "content": "Use a tool."}], tools=tools,
                tool_choice="required", parallel_tool_calls=False, max_tokens=120, temperature=temperature, seed=i)
            assert finish == "tool_calls"
            assert [(t.function.name, t.function.arguments) for t in message.tool_calls] == [
                (call.function.name, call.function.arguments)]
        except Exception as e:
            bad.append((i, repr(e)[:120], c.message))
    assert not bad, bad
