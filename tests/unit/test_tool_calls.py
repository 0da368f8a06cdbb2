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
    p = ToolCallStreamParser()
    content, calls, last = "", [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        d, cs = p.feed(text[last:c])
        content, calls, last = content + d, calls + cs, c
    d, cs = p.finish()
    return content + d, [(c.name, c.arguments) for c in calls + cs]


def whole(text: str):
    content, calls = parse_tool_calls(text)
    return content, [(c.name, c.arguments) for c in calls]


SAMPLES = [
    'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    '<tool_call>{"name": "a", "arguments": {"s": "</tool_call> inside a string? no: <tool_call>"}}</tool_call>',
    '<tool_call>{"name": "now", "arguments": {}}</tool_call>\n<tool_call>{"name": "get_weather", '
    '"arguments": {"city": "Oslo"}}</tool_call>',
    'just text with a < sign and <tool but no call',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Ro',  # cut by max_tokens
    '<tool_call>not json</tool_call> then text',
    '{"braces": "in text"} <tool_call>{"name": "x", "arguments": {"k": "{}}"}}</tool_call>tail',
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
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    content, calls = parse_tool_calls(SAMPLES[2])
    assert content == "" and [c.name for c in calls] == ["now", "get_weather"]
    content, calls = parse_tool_calls(SAMPLES[4])  # truncated: no call, text kept
    assert calls == [] and content == SAMPLES[4]
    content, calls = parse_tool_calls(SAMPLES[5])
    assert calls == [] and content == SAMPLES[5]
    assert len({c.id for c in parse_tool_calls(SAMPLES[2])[1]}) == 2


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
    compile_grammar(tok, GrammarSpec.lark(tool_call_grammar(tools, "auto", None, parallel=True)))
    # Arguments are compiled as response_format schemas are: numbers with at most 6 decimals.
    pay = parse_tools([{"type": "function", "function": {"name": "pay", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}}}])
    assert '"multipleOf": 1e-06' in tool_call_grammar(pay, "required", None, parallel=False)
