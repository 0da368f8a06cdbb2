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
