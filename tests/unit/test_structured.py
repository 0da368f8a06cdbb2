"""metroline.structured on the default model's tokenizer: compile errors are GrammarErrors with
the library's message, the mask admits exactly the tokens that keep the output valid (a
random walk through the mask always ends in a valid document), and the processor forks,
accepts and rolls back as the engine drives it."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from metroline.structured import GrammarError, GrammarSpec, compile_grammar  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from metroline.model.default import default_model_path
    from metroline.model.loader import load_tokenizer_from_gguf

    return load_tokenizer_from_gguf(default_model_path())


def walk(tok, spec: GrammarSpec, seed: int, max_tokens: int = 300) -> str:
    """Sample random allowed tokens until only end-of-sequence is allowed; the text."""
    proc = compile_grammar(tok, spec).processor().fork()
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = torch.randn(tok.vocab_size, generator=g) * 3
        masked = proc(out, logits)
        t = int(masked.argmax())
        assert masked[t] > float("-inf"), "the mask allowed nothing"
        if t in tok.stop_token_ids:
            break
        proc.accept([t])
        out.append(t)
    else:
        pytest.fail(f"no end after {max_tokens} tokens: {tok.decode(out)!r}")
    return tok.decode(out)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": ["number", "null"]},
                                      "code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
     "required": ["code"], "additionalProperties": False},
]


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_random_walks_through_the_mask_give_valid_json(tok, i):
    for seed in range(3):
        text = walk(tok, GrammarSpec.json_schema(SCHEMAS[i]), seed)
        jsonschema.validate(json.loads(text), SCHEMAS[i])


def test_regex_choice_and_lark(tok):
    for seed in range(3):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", walk(tok, GrammarSpec.regex(r"[0-9]{3}-[a-z]{2}"), seed))
        assert walk(tok, GrammarSpec.choice(["red", "green", "blue"]), seed) in ("red", "green", "blue")
        assert walk(tok, GrammarSpec.lark('start: "yes" | "no" | "maybe"'), seed) in ("yes", "no", "maybe")
    # Any JSON object: a random walk would write one key forever; check the first mask instead.
    first = compile_grammar(tok, GrammarSpec.json_object()).processor().fork().allowed()
    allowed = first.nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).startswith("{") for t in allowed)


@pytest.mark.parametrize("spec, match", [
    (lambda: GrammarSpec.json_schema({"type": "strng"}), "strng"),
    (lambda: GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (lambda: GrammarSpec.json_schema({"type": "object", "patternProperties": {"^a": {}}}), "patternProperties"),
    (lambda: GrammarSpec.regex("a(b"), "unclosed"),
    (lambda: GrammarSpec.lark("start: undefined_rule"), "undefined_rule"),
    (lambda: GrammarSpec.json_schema("not a schema"), "must be an object"),
    (lambda: GrammarSpec.choice([]), "non-empty"),
    (lambda: GrammarSpec.regex(""), "non-empty"),
])
def test_bad_grammars_raise_grammar_errors(tok, spec, match):
    with pytest.raises(GrammarError, match=match):
        compile_grammar(tok, spec())


def test_compiled_grammars_are_cached_and_properties_named_like_keywords_pass(tok):
    schema = {"type": "object", "properties": {"not": {"type": "integer"}, "if": {"type": "string"}}}
    a = compile_grammar(tok, GrammarSpec.json_schema(schema))
    assert compile_grammar(tok, GrammarSpec.json_schema(dict(schema))) is a


def test_fork_accept_rollback(tok):
    spec = GrammarSpec.json_schema(SCHEMAS[0])
    template = compile_grammar(tok, spec).processor()
    a, b = template.fork(), template.fork()
    start = a.allowed().clone()
    ids = tok.encode('{"name": "Bo', add_special_tokens=False)
    a.accept(ids)
    after = a.allowed().clone()
    assert not torch.equal(start, after)
    assert torch.equal(b.allowed(), start)  # forks are independent
    a.accept(tok.encode('b", "age', add_special_tokens=False))
    a.rollback(len(tok.encode('b", "age', add_special_tokens=False)))
    assert torch.equal(a.allowed(), after)
    with pytest.raises(GrammarError, match="rejected"):
        b.accept(tok.encode("hello", add_special_tokens=False))  # not JSON: the matcher refuses


def test_grammar_state_survives_preemption(default_loaded):
    """Grammar requests in a KV pool too small for all of them: preempted requests recompute
    their KV and go on; the matcher keeps its state, so every output still validates and
    equals the output the request gives alone."""
    from metroline.engine.llm import LLM
    from metroline.engine.request import SamplingParams

    schema = SCHEMAS[1]
    tok = default_loaded.tokenizer
    grammar = compile_grammar(tok, GrammarSpec.json_schema(schema))
    prompts = [f"Tags for item {i}:" + " and more words" * (6 + 3 * i) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=60, logits_processors=[grammar.processor()])
    alone = [LLM(loaded=default_loaded, num_blocks=64, show_progress=False).generate([p], params, use_tqdm=False)[0]
             for p in prompts[:2]]
    tight = LLM(loaded=default_loaded, num_blocks=12, max_num_seqs=6, show_progress=False)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), schema)
    assert [o.outputs[0].token_ids for o in outs[:2]] == [a.outputs[0].token_ids for a in alone]


def test_batch_masks_equal_one_at_a_time(tok):
    """allowed_batch (llguidance's executor, all rows in one call) == each row's own mask,
    for matchers at different points of different grammars."""
    from metroline.structured.grammar_llguidance import GrammarProcessor

    procs = []
    for k, (spec, text) in enumerate([(GrammarSpec.json_schema(SCHEMAS[0]), '{"name": "A'),
                                      (GrammarSpec.json_schema(SCHEMAS[1]), '{"tags": ['),
                                      (GrammarSpec.regex(r"[0-9]{3}-[a-z]{2}"), "12"),
                                      (GrammarSpec.json_schema(SCHEMAS[0]), "")]):
        p = compile_grammar(tok, spec).processor().fork()
        if text:
            p.accept(tok.encode(text, add_special_tokens=False))
        procs.append(p)
    batch = GrammarProcessor.allowed_batch(procs)
    assert torch.equal(batch, torch.stack([p.allowed() for p in procs]))
    assert len({tuple(row.nonzero().flatten().tolist()[:50]) for row in batch}) == 4


def test_sampler_masks_grammar_rows_only(tok):
    """In one batch: two grammar requests and a plain one; the grammar rows' tokens are allowed
    by their grammars, the plain row samples as if alone."""
    from metroline.engine.request import Request, SamplingParams
    from metroline.engine.sampler import Sampler

    g = compile_grammar(tok, GrammarSpec.choice(["yes", "no"]))
    reqs = [Request("a", [1, 2], SamplingParams(temperature=0, logits_processors=[g.processor()])),
            Request("b", [1, 2], SamplingParams(temperature=0)),
            Request("c", [1, 2], SamplingParams(temperature=0, logits_processors=[g.processor()]))]
    logits = torch.randn(3, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    res = Sampler(tok.vocab_size)(logits, reqs)
    allowed = reqs[0].logits_processors[0].allowed()
    assert allowed[res[0].token_id] and allowed[res[2].token_id]
    assert res[1].token_id == int(logits[1].argmax())
    assert all(r.error is None for r in res)


def test_numbers_get_bounded_decimals_and_keep_their_range(tok):
    from metroline.structured.grammar_llguidance import prepare_json_schema

    schema = {"type": "object", "properties": {"x": {"type": "number", "maximum": 5},
                                               "y": {"type": ["number", "null"]}, "n": {"type": "integer"},
                                               "m": {"type": "number", "multipleOf": 0.5}},
              "required": ["x"]}
    b = prepare_json_schema(schema)
    assert b["properties"]["x"] == {"type": "number", "maximum": 5, "multipleOf": 1e-6}
    assert b["properties"]["y"]["multipleOf"] == 1e-6 and "multipleOf" not in b["properties"]["n"]
    assert b["properties"]["m"]["multipleOf"] == 0.5 and b["required"] == ["x"]
    assert "multipleOf" not in schema["properties"]["x"]  # the request's schema is left alone
    one = {"type": "object", "properties": {"s": {"type": "number", "minimum": 0, "maximum": 100}},
           "required": ["s"], "additionalProperties": False}
    for seed in range(4):
        value = json.loads(walk(tok, GrammarSpec.json_schema(one), seed, max_tokens=40))["s"]
        assert 0 <= value <= 100 and len(repr(value).partition(".")[2]) <= 6


def _tool_prompt_and_grammar(tok):
    from metroline.structured.tools import parse_tools, render_messages, tool_call_grammar

    tools = parse_tools([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "get_time"}}])
    grammar = compile_grammar(tok, GrammarSpec.lark(tool_call_grammar(tools, "required", None, True)))
    prompt = tok.apply_chat_template(render_messages(
        [{"role": "user", "content": "What's the weather in Paris?"}], tools, True), add_generation_prompt=True)
    return prompt, grammar


def _run(loaded, prompt, params, fast_forward: bool):
    from metroline.engine.llm import LLM

    llm = LLM(loaded=loaded, num_blocks=64, show_progress=False, grammar_fast_forward=fast_forward)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    return out.outputs[0], llm.engine.num_steps, llm.engine.get_stats().fast_forward_tokens


def test_fast_forward_appends_forced_tokens_without_a_step_each(default_loaded):
    """A tool call's boilerplate (`<tool_call>{"name": "`, `", "arguments": {"city": "`) is forced
    by the grammar: with fast-forward those tokens are appended at once and computed with the
    next sampled token in one pass. Same tokens as one step per token, far fewer steps, and
    every step the counter says was saved is one the engine did not run."""
    from metroline.engine.request import SamplingParams

    prompt, grammar = _tool_prompt_and_grammar(default_loaded.tokenizer)
    params = SamplingParams(temperature=0, max_tokens=80, logits_processors=[grammar.processor()])
    slow, slow_steps, slow_ff = _run(default_loaded, prompt, params, False)
    fast, fast_steps, fast_ff = _run(default_loaded, prompt, params, True)
    assert slow_ff == 0 and fast_ff > 10
    assert fast.token_ids == slow.token_ids and fast.text.startswith("<tool_call>")
    assert fast_steps == slow_steps - fast_ff
    # Whether the model stops after one call or writes another (the grammar allows parallel
    # calls) depends on the CPU's rounding (AVX2 and AVX-512 differ); both paths agree.
    assert fast.finish_reason == slow.finish_reason and "</tool_call>" in fast.text
    # A request that wants logprobs gets one per token, so it decodes step by step.
    lp = SamplingParams(temperature=0, max_tokens=80, logprobs=0, logits_processors=[grammar.processor()])
    with_lp, _, lp_ff = _run(default_loaded, prompt, lp, True)
    assert lp_ff == 0 and with_lp.token_ids == slow.token_ids and len(with_lp.logprobs) == len(slow.token_ids)


def test_fast_forward_respects_max_tokens_and_stop_strings(default_loaded):
    """Forced tokens go through the same stop checks as sampled ones: max_tokens cuts them
    (finish_reason length, exactly max_tokens tokens) and a stop string inside them ends the
    output there."""
    from metroline.engine.request import SamplingParams

    prompt, grammar = _tool_prompt_and_grammar(default_loaded.tokenizer)
    cut, _, ff = _run(default_loaded, prompt, SamplingParams(
        temperature=0, max_tokens=5, logits_processors=[grammar.processor()]), True)
    assert ff > 0 and len(cut.token_ids) == 5 and cut.finish_reason == "length"
    stopped, _, _ = _run(default_loaded, prompt, SamplingParams(
        temperature=0, max_tokens=80, stop=['"arguments"'], logits_processors=[grammar.processor()]), True)
    assert stopped.finish_reason == "stop" and stopped.text.endswith('"name": "get_weather", ')
