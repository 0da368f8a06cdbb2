"""The Responses API (/v1/responses), driven by the official `openai` client and by the OpenAI
Agents SDK against a real server whose store is a SQLite file of the test's own."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from tests.server.conftest import ServerThread, TIMEOUT

MODEL = "SmolLM2-135M-Instruct"
ADD = {"type": "function", "name": "add", "description": "Add two integers.", "strict": True,
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "required": ["a", "b"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("responses") / "store.sqlite3")


@pytest.fixture(scope="module")
def rs(aux_server, store_path) -> ServerThread:
    return aux_server(agent_store_path=store_path)


@pytest.fixture(scope="module")
def rc(rs) -> openai.OpenAI:
    return rs.client()


def _strict():
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter
    return Response, TypeAdapter(ResponseStreamEvent)


# The client builds its models without validating: these check the wire format strictly.
_RESPONSE, _STREAM_EVENT = _strict()


def _error(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_plain_text_response(rc):
    r = rc.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=8,
                            temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.error is None
    assert r.output_text.strip()
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    u = r.usage
    assert 1 <= u.output_tokens <= 8 and u.input_tokens > 5
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens <= u.input_tokens
    assert u.output_tokens_details.reasoning_tokens == 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and u.output_tokens == 8
        assert msg.status == "incomplete"
    # max_output_tokens reached: incomplete, with its reason
    r = rc.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=3,
                            extra_body={"ignore_eos": True})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_instructions_and_message_items(rc):
    short = rc.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    long = rc.responses.create(
        model=MODEL, instructions="You are a pirate.", max_output_tokens=2,
        input=[{"role": "developer", "content": "Answer briefly."},
               {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Ahoy"}]},
               {"role": "user", "content": "Hi"}])
    assert long.instructions == "You are a pirate."
    assert long.usage.input_tokens > short.usage.input_tokens + 10


def test_function_call_then_output_continues_stored_chain(rc):
    first = rc.responses.create(model=MODEL, input="What is 2 + 3? Use the add tool.", tools=[ADD],
                                tool_choice="required", parallel_tool_calls=False, temperature=0,
                                max_output_tokens=40)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and first.status == "completed"
    call = calls[0]
    assert call.name == "add" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), ADD["parameters"])
    assert first.tools[0].name == "add" and first.tool_choice == "required"

    second = rc.responses.create(model=MODEL, previous_response_id=first.id, tools=[ADD], temperature=0,
                                 max_output_tokens=8,
                                 input=[{"type": "function_call_output", "call_id": call.call_id,
                                         "output": "5"}])
    assert second.previous_response_id == first.id
    # The stored chain is in the prompt: the first's prompt, its call, then the call's output.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first's prompt, cached
    alone = rc.responses.create(model=MODEL, tools=[ADD], temperature=0, max_output_tokens=1, store=False,
                                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "5"}])
    assert second.usage.input_tokens > alone.usage.input_tokens + 20
    # Stored input items of the second: just its own
    items = rc.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]


def test_named_tool_choice_and_parallel(rc):
    r = rc.responses.create(model=MODEL, input="Add 1 and 2.", tools=[ADD], max_output_tokens=40,
                            tool_choice={"type": "function", "name": "add"}, parallel_tool_calls=False,
                            temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "add" and r.status == "completed"
    assert r.parallel_tool_calls is False and r.tool_choice.name == "add"
    # parallel calls (the default): this model repeats its call until the budget ends; the
    # finished calls are items, the one cut short is none (and no text either)
    r = rc.responses.create(model=MODEL, input="Add 1 and 2.", tools=[ADD], max_output_tokens=40,
                            tool_choice="required", temperature=0)
    assert r.parallel_tool_calls is True
    assert r.output and all(o.type == "function_call" and o.status == "completed" for o in r.output)


def test_stream_events_and_stored_response(rc, rs):
    stream = rc.responses.create(model=MODEL, input="Name three colors.", max_output_tokens=10, temperature=0,
                                 stream=True)
    events = list(stream)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for a, b in [("response.output_item.added", "response.content_part.added"),
                 ("response.content_part.added", "response.output_text.delta"),
                 ("response.output_text.delta", "response.output_text.done"),
                 ("response.output_text.done", "response.content_part.done"),
                 ("response.content_part.done", "response.output_item.done")]:
        assert types.index(a) < types.index(b), (a, b)
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text and deltas
    done = [e for e in events if e.type == "response.output_text.done"]
    assert done[0].text == deltas
    stored = rc.responses.retrieve(final.id)
    assert stored.model_dump() == final.model_dump()
    # the same text as without streaming
    plain = rc.responses.create(model=MODEL, input="Name three colors.", max_output_tokens=10, temperature=0)
    assert plain.output_text == final.output_text and plain.status == final.status

    # the client's helper: accumulates the same response
    with rc.responses.stream(model=MODEL, input="Name three colors.", max_output_tokens=10, temperature=0,
                             extra_body={"ignore_eos": True, "max_output_tokens": 10}) as s:
        texts = [e.delta for e in s if e.type == "response.output_text.delta"]
    assert "".join(texts)


def test_stream_function_call_events(rc):
    with rc.responses.stream(model=MODEL, input="What is 4 + 4?", tools=[ADD], tool_choice="required",
                             parallel_tool_calls=False,
                             max_output_tokens=40, temperature=0) as s:
        events = list(s)
        final = s.get_final_response()
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                   and e.item_id == done[0].item_id)
    assert args == done[0].arguments
    [call, *_] = [o for o in final.output if o.type == "function_call"]
    assert call.arguments == done[0].arguments and call.id == done[0].item_id
    jsonschema.validate(json.loads(call.arguments), ADD["parameters"])


def test_json_schema_text_format(rc):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = rc.responses.create(model=MODEL, input="Give a person as JSON.", max_output_tokens=40, temperature=0,
                            text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                             "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"
    r = rc.responses.create(model=MODEL, input="Any JSON object.", max_output_tokens=30, temperature=0,
                            text={"format": {"type": "json_object"}})
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)


def test_retrieve_delete_and_store_false(rc, rs):
    r = rc.responses.create(model=MODEL, input="Hello", max_output_tokens=2, metadata={"k": "v"})
    got = rc.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"k": "v"}
    rc.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        rc.responses.retrieve(r.id)
    with rs.http() as h:
        assert _error(h.delete(f"/v1/responses/{r.id}"))["code"] == "response_not_found"

    r = rc.responses.create(model=MODEL, input="Hello", max_output_tokens=2, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError) as e:
        rc.responses.retrieve(r.id)
    assert e.value.code == "response_not_found"


def test_unknown_previous_response_is_404(rs):
    with rs.http() as h:
        resp = h.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_nope"})
        assert resp.status_code == 404
        err = _error(resp)
        assert err["code"] == "previous_response_not_found" and err["param"] == "previous_response_id"
        resp = h.get("/v1/responses/resp_nope")
        assert resp.status_code == 404 and _error(resp)["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"input": 5}, "input"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [{"type": "function", "name": ""}]}, "tools"),
    ({"input": "x", "tools": [ADD], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "middle"}, "truncation"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({}, "input"),
    ({"input": []}, "input"),
])
def test_invalid_input_is_400(rs, body, param):
    with rs.http() as h:
        resp = h.post("/v1/responses", json={"model": MODEL, **body})
    assert resp.status_code == 400, resp.text
    err = _error(resp)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_wire_format_validates_strictly(rs):
    """Every response and stream event as OpenAI's own (pydantic) types accept them."""
    bodies = [{"input": "Hi", "max_output_tokens": 4},
              {"input": "Add 2 and 2.", "tools": [ADD], "tool_choice": "required", "max_output_tokens": 40,
               "parallel_tool_calls": False},
              {"input": "JSON please", "max_output_tokens": 20, "text": {"format": {"type": "json_object"}}}]
    with rs.http() as h:
        for body in bodies:
            r = h.post("/v1/responses", json={"model": MODEL, "temperature": 0, **body})
            assert r.status_code == 200, r.text
            _RESPONSE.model_validate(r.json())
            _RESPONSE.model_validate(h.get(f"/v1/responses/{r.json()['id']}").json())
            with h.stream("POST", "/v1/responses", json={"model": MODEL, "temperature": 0, "stream": True,
                                                         **body}) as resp:
                datas = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
            for d in datas:
                _STREAM_EVENT.validate_python(d)
            final = datas[-1]["response"]
            same = r.json()  # greedy: the same output, other ids and times
            assert [o["type"] for o in final["output"]] == [o["type"] for o in same["output"]]
            assert final["usage"]["output_tokens"] == same["usage"]["output_tokens"]


def test_harmless_extras_are_accepted(rc):
    r = rc.responses.create(model=MODEL, input="Hi", max_output_tokens=2, include=[], truncation="auto",
                            user="u1", reasoning={"effort": "low"}, service_tier="auto", top_p=0.9)
    assert r.user == "u1" and r.truncation == "auto" and r.top_p == 0.9


def test_store_survives_restart_and_tenants_are_scoped(rs, aux_server, store_path):
    first = rs.client().responses.create(model=MODEL, input="Remember: 42.", max_output_tokens=2)
    # Another server (a new store over the same file): the response is there, and continues.
    again = aux_server(agent_store_path=store_path, request_timeout=300.0)
    c2 = again.client()
    assert c2.responses.retrieve(first.id).output_text == first.output_text
    nxt = c2.responses.create(model=MODEL, input="And?", previous_response_id=first.id, max_output_tokens=2)
    assert nxt.usage.input_tokens > first.usage.input_tokens

    multi = aux_server(agent_store_path=store_path, api_key="key-a,key-b")
    a, b = multi.client(api_key="key-a"), multi.client(api_key="key-b")
    ra = a.responses.create(model=MODEL, input="secret", max_output_tokens=2)
    assert a.responses.retrieve(ra.id).id == ra.id
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(ra.id)
    with pytest.raises(openai.NotFoundError) as e:
        b.responses.create(model=MODEL, input="x", previous_response_id=ra.id, max_output_tokens=2)
    assert e.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):  # nor the unscoped server's
        b.responses.retrieve(first.id)


def test_queue_full_is_429(tiny):
    """The one-deep queue of `tiny`: a response while it is busy is a 429 in OpenAI's shape."""
    import threading

    c = tiny.client()
    results: list = []

    def go():
        try:
            results.append(c.responses.create(model=MODEL, input="Count to twenty.", max_output_tokens=30,
                                              store=False, extra_body={"ignore_eos": True}))
        except openai.APIError as e:
            results.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    errors = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert errors and errors[0].code == "queue_full"
    assert any(not isinstance(r, Exception) and r.usage.output_tokens == 30 for r in results)


def test_draining_is_503(aux_server, store_path):
    st = aux_server(agent_store_path=store_path, served_model_names=(MODEL,))
    st.state.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as e:
            st.client().responses.create(model=MODEL, input="x", max_output_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "server_draining"
    finally:
        st.state.draining = False


def test_failure_midway_ends_the_stream_with_response_failed(aux_server, store_path):
    """The request timeout fires while the response streams: an `error` event, then
    `response.failed`; nothing is stored; the engine is left clean (the autouse check)."""
    st = aux_server(agent_store_path=store_path, request_timeout=1.0)
    events = []
    with st.http() as h, h.stream("POST", "/v1/responses", json={
            "model": MODEL, "input": "Count.", "stream": True, "max_output_tokens": 4000,
            "ignore_eos": True}) as resp:
        assert resp.status_code == 200
        kind = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == kind
                events.append(data)
    types = [e["type"] for e in events]
    assert types[0] == "response.created" and types[-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "request_timeout"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"]
    for e in events:
        _STREAM_EVENT.validate_python(e)
    with st.http() as h:
        assert h.get(f"/v1/responses/{failed['id']}").status_code == 404


# ---------------------------------------------------------------------------- Agents SDK

def _agents():
    return pytest.importorskip("agents", reason="openai-agents is not installed (pip install openai-agents)")


def _run_agent(rs, model_cls, **run_kw):
    agents = _agents()
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    calls: list[str] = []

    @agents.function_tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression such as '12 * 7 + 3'."""
        calls.append(expression)
        from metroline.agents.tools import calculate  # the runtime's AST evaluator, no eval
        try:
            return str(calculate(expression))
        except Exception as e:  # the model's expression may be malformed: an observation
            return f"error: {e}"

    async def main(streamed: bool = False):
        client = AsyncOpenAI(base_url=f"{rs.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
        # The default model is tiny: the first turn must call a tool (the SDK resets tool_choice
        # after a call, so the next turn may answer), one call per turn, greedy, short turns.
        agent = agents.Agent(
            name="calc", instructions="You are a calculator assistant. Use the calculator tool.",
            tools=[calculator], model=model_cls(model=MODEL, openai_client=client),
            model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                temperature=0, max_tokens=64))
        task = "What is 12 * 7 + 3? Use the calculator."
        try:
            if streamed:
                result = agents.Runner.run_streamed(agent, task, max_turns=6, **run_kw)
                kinds = [e.type async for e in result.stream_events()]
                assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
                return result
            return await agents.Runner.run(agent, task, max_turns=6, **run_kw)
        finally:
            await client.close()

    streamed = run_kw.pop("streamed", False)
    result = asyncio.run(main(streamed))
    return result, calls


@pytest.mark.parametrize("variant", ["responses", "responses-chained", "responses-streamed", "chat"])
def test_agents_sdk_runs_with_tool(rs, rc, variant):
    """The OpenAI Agents SDK, unchanged, against this server: over the Responses API (sending
    the whole history each turn, chaining by previous_response_id, streaming) and over chat
    completions. The calls must be real and valid; the arithmetic is the tiny model's."""
    agents = _agents()
    cls = agents.OpenAIChatCompletionsModel if variant == "chat" else agents.OpenAIResponsesModel
    kw = {"auto_previous_response_id": True} if variant == "responses-chained" else {}
    if variant == "responses-streamed":
        kw["streamed"] = True
    result, calls = _run_agent(rs, cls, **kw)
    assert calls, "the calculator was never called"
    assert all(isinstance(c, str) and c for c in calls)
    assert isinstance(result.final_output, str)
    kinds = [type(i).__name__ for i in result.new_items]
    assert "ToolCallItem" in kinds and "ToolCallOutputItem" in kinds
    assert kinds[-1] == "MessageOutputItem"
    for item in result.new_items:
        if type(item).__name__ == "ToolCallItem":  # what the model sent, as the SDK received it
            raw = item.raw_item if isinstance(item.raw_item, dict) else item.raw_item.model_dump()
            assert raw["name"] == "calculator"
            assert isinstance(json.loads(raw["arguments"])["expression"], str)
    if variant == "responses-chained":
        ids = [r.response_id for r in result.raw_responses]
        assert len(ids) >= 2 and all(ids)
        second = rc.responses.retrieve(ids[1])
        assert second.previous_response_id == ids[0]
        # only the new items were sent: the tool's output
        assert [i.type for i in rc.responses.input_items.list(ids[1]).data] == ["function_call_output"]
