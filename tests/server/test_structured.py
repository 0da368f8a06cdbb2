"""Structured outputs through the official openai client on the real default model:
response_format json_schema / json_object, and the regex / grammar / choice extensions, on
both endpoints, streamed and not, greedy and sampled; bad grammars are 400s and the server
keeps serving."""

from __future__ import annotations

import json
import re

import openai
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "SmolLM2-135M-Instruct"

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"], "additionalProperties": False},
    "colors": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}},
        "required": ["colors"], "additionalProperties": False},
    "city": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24}, "population": {"type": ["integer", "null"]},
        "country_code": {"type": "string", "pattern": "^[A-Z]{2}$"}},
        "required": ["city", "country_code"], "additionalProperties": False},
}


def _format(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_chat_json_schema_always_validates(client, name, temperature):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Give me a {name} as JSON."}],
        response_format=_format(name), max_tokens=120, temperature=temperature, seed=7)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_streamed_equals_non_streamed_and_completions_endpoint(client):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "A person, please."}],
                response_format=_format("person"), max_tokens=80, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), SCHEMAS["person"])
    r = client.completions.create(model=MODEL, prompt="Colors:", max_tokens=60, temperature=0,
                                  extra_body={"response_format": _format("colors")})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["colors"])


def test_json_object_regex_grammar_choice(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                       response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="A date:", max_tokens=20, temperature=0.8, seed=1,
                                  extra_body={"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].text)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       max_tokens=10, temperature=0, extra_body={"choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick"}], max_tokens=10,
                                       n=3, temperature=1.0, seed=3,
                                       extra_body={"grammar": 'start: "alpha" | "beta" | "gamma"'})
    assert all(c.message.content in ("alpha", "beta", "gamma") for c in r.choices)


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "patternProperties": {"^a": {"type": "string"}}}}}}, "response_format"),
    ({"regex": "a(b"}, "regex"),
    ({"grammar": "start: nothing_defined"}, "grammar"),
    ({"choice": []}, "choice"),
    ({"choice": ["a", 3]}, "choice.1"),
])
def test_bad_grammars_are_400_and_the_server_keeps_serving(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       extra_body=extra)
    assert e.value.param == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content is not None
