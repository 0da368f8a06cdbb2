"""The tool-call format: rendering, the grammar (compiled against the default model's
tokenizer), and the parser, whose streamed result equals the whole-text result for every
split of the text into deltas (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metroline.structured import GrammarError
from metroline.structured.tools import (ToolCallStreamParser, parse_tool_calls, parse_tools, render_messages,
                                        resolve_tool_choice, tool_call_grammar)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20}}, "required": ["city"],
                                                "additionalProperties": False}}}
NOARGS = {"type": "function", "function": {"name": "now"}}


def stream(text: str, cuts: list[int]):
    """Feed the text in pieces cut at `cuts`: (content, [(name, arguments, complete)], unfinished
    raw text), the calls assembled from their streamed pieces as a client would."""
    p = ToolCallStreamParser()
    content, last = "", 0
    calls: dict[int, list] = {}
    for c in sorted(set(cuts)) + [len(text)]:
        d, pieces = p.feed(text[last:c])
        content, last = content + d, c
        for piece in pieces:
            if piece.id is not None:
                assert piece.index not in calls and piece.index == len(calls)
                calls[piece.index] = [piece.name, "", piece.id]
            calls[piece.index][1] += piece.arguments
    d, _ = p.finish()
    done = {c.id: c for c in p.calls}
    out = []
    for name, args, cid in calls.values():
        complete = cid in done
        if complete:
            assert (done[cid].name, done[cid].arguments) == (name, args)
        out.append((name, args, complete))
    return content + d, out, p.unfinished


def whole(text: str):
    return stream(text, [])


SAMPLES = [
    'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    '<tool_call>{"name": "a", "arguments": {"s": "</tool_call> inside a string? no: <tool_call>"}}</tool_call>',
    '<tool_call>{"name": "now", "arguments": {}}</tool_call>\n<tool_call>{"name": "get_weather", '
    '"arguments": {"city": "Oslo"}}</tool_call>',
    'just text with a < sign and <tool but no call',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Ro',  # cut by max_tokens
    '<tool_call>not json</tool_call> then text',
    '{"braces": "in text"} <tool_call>{"name": "x", "arguments": {"k": "{}}"}}</tool_call>tail',
    '<tool_call>{"arguments": {"x": [1, {"y": "}"}]}, "name": "f"}</tool_call>',  # keys reordered
    '<tool_call> {"name": "q\\"uote", "arguments": "str\\"ing"} </tool_call>x',  # escapes, spaces
    '<tool_call>{"name": "f", "arguments": {"a": 1}} garbage</tool_call>',  # streamed, then broken
    '<tool_call>{"name": "f", "arguments": {"é": "ü 漢"}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>',
]


@pytest.mark.parametrize("text", SAMPLES)
def test_every_split_gives_the_whole_text_result(text):
    want = whole(text)
    for a in range(len(text) + 1):
        assert stream(text, [a]) == want
    assert stream(text, list(range(len(text)))) == want  # one character at a time


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SAMPLES + ["x", "\n", "<", "<tool_", "</tool_call>", '{"a": 1}']),
                min_size=1, max_size=5), st.lists(st.integers(0, 400), max_size=12))
def test_property_streamed_equals_whole(parts, cuts):
    text = "".join(parts)
    assert stream(text, [c for c in cuts if c <= len(text)]) == whole(text)


def test_parse_results():
    content, calls = parse_tool_calls(SAMPLES[0])
    assert content == "Sure." and calls[0].name == "get_weather"
    assert calls[0].arguments == '{"city": "Paris"}'  # the model's own text, as streamed
    content, calls = parse_tool_calls(SAMPLES[1])  # a closing tag inside a JSON string is text
    assert content == "" and json.loads(calls[0].arguments) == {"s": "</tool_call> inside a string? no: <tool_call>"}
    content, calls = parse_tool_calls(SAMPLES[2])
    assert content == "" and [c.name for c in calls] == ["now", "get_weather"]
    content, calls = parse_tool_calls(SAMPLES[4])  # truncated: no call, text kept
    assert calls == [] and content == SAMPLES[4]
    content, calls = parse_tool_calls(SAMPLES[5])
    assert calls == [] and content == SAMPLES[5]
    content, calls = parse_tool_calls(SAMPLES[6])
    assert content == '{"braces": "in text"} tail' and json.loads(calls[0].arguments) == {"k": "{}}"}
    assert len({c.id for c in parse_tool_calls(SAMPLES[2])[1]}) == 2
    # Keys in another order, or `parameters`: still a call (sent whole, not streamed).
    content, calls = parse_tool_calls('<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>')
    assert content == "" and (calls[0].name, json.loads(calls[0].arguments)) == ("f", {"x": 1})
    # Streamed, then the closing tag never came: a piece of a call, never a complete one.
    text, calls, unfinished = stream(SAMPLES[4], [30])
    assert text == "" and calls == [("get_weather", '{"city": "Ro', False)] and unfinished == [SAMPLES[4]]


def test_arguments_stream_in_pieces():
    """Fed one character at a time, a call's name goes out as soon as its head is complete and
    its arguments in many pieces, before the closing tag."""
    text = SAMPLES[0]
    p = ToolCallStreamParser()
    pieces = []
    for ch in text:
        _, ps = p.feed(ch)
        pieces += ps
    assert pieces[0].name == "get_weather" and pieces[0].id and pieces[0].arguments == ""
    assert len(pieces) > 5 and "".join(x.arguments for x in pieces) == '{"city": "Paris"}'
    first = pieces[0].to_openai(base=2)
    assert first["index"] == 2 and first["type"] == "function" and first["function"]["name"] == "get_weather"
    assert pieces[1].to_openai() == {"index": 0, "function": {"arguments": pieces[1].arguments}}


def test_tools_and_choice_validation():
    tools = parse_tools([WEATHER, NOARGS])
    assert tools[1].parameters == {"type": "object", "properties": {}, "additionalProperties": False}
    assert resolve_tool_choice(None, tools) == ("auto", None)
    assert resolve_tool_choice(None, []) == ("none", None)
    assert resolve_tool_choice({"type": "function", "function": {"name": "now"}}, tools) == ("named", "now")
    for bad in ([{"type": "function"}], [{"type": "function", "function": {"name": ""}}], [WEATHER, WEATHER],
                [{"type": "retrieval"}]):
        with pytest.raises(GrammarError):
            parse_tools(bad)
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(GrammarError):
            resolve_tool_choice(bad, tools)
    with pytest.raises(GrammarError):
        resolve_tool_choice("required", [])


def test_render_messages():
    tools = parse_tools([WEATHER])
    msgs = render_messages([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], tools, True)
    assert msgs[0]["role"] == "system" and "get_weather" in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    assert msgs[3] == {"role": "tool", "content": "<tool_response>sunny</tool_response>"}


def test_grammars_compile_and_walks_parse(tmp_path):
    pytest.importorskip("llguidance")
    import torch

    from metroline.model.default import default_model_path
    from metroline.model.loader import load_tokenizer_from_gguf
    from metroline.structured import GrammarSpec, compile_grammar

    tok = load_tokenizer_from_gguf(default_model_path())
    tools = parse_tools([WEATHER, NOARGS])
    for mode, name in (("required", None), ("named", "get_weather")):
        grammar = tool_call_grammar(tools, mode, name, parallel=False)
        proc = compile_grammar(tok, GrammarSpec.lark(grammar)).processor().fork()
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(200):
            t = int(proc(out, torch.randn(tok.vocab_size, generator=g)).argmax())
            if t in tok.stop_token_ids:
                break
            proc.accept([t])
            out.append(t)
        content, calls = parse_tool_calls(tok.decode(out))
        assert content == "" and len(calls) == 1, tok.decode(out)
        assert calls[0].name in (["get_weather"] if name else ["get_weather", "now"])
        assert isinstance(json.loads(calls[0].arguments), dict)
    # auto: free text (any text, `<` included) until the opening tag, then only a valid call.
    for parallel in (False, True):
        auto = compile_grammar(tok, GrammarSpec.lark(tool_call_grammar(tools, "auto", None, parallel)))

        def accepts(text, whole=True):
            m = auto.matcher()
            ids = tok.encode(text, add_special_tokens=False)
            return m.try_consume_tokens(ids) == len(ids) and (m.is_accepting() or not whole)

        call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
        assert accepts("Plain text, with a < and a <b> tag.")
        assert accepts("Let me look that up. " + call)
        assert accepts("Let me look. <tool_call>", whole=False)
        assert not accepts("Let me look. <tool_call>{\"name\": \"nope\"", whole=False)
        assert not accepts(call + "and text after the call", whole=False)
        assert accepts(call + "\n" + call) == parallel
    # Arguments are compiled as response_format schemas are: numbers with at most 6 decimals.
    pay = parse_tools([{"type": "function", "function": {"name": "pay", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}}}])
    assert '"multipleOf": 1e-06' in tool_call_grammar(pay, "required", None, parallel=False)
