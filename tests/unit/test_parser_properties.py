"""Property tests (hypothesis) of every parser of generated or client text (issue 16):

* incremental detokenization (IncrementalDetokenizer, and OutputText over it) against the
  tokenizer's one-shot decode, on random ids, random byte sequences and random splits;
* stop strings across token boundaries (OutputText): the text ends before the first stop
  string to complete, whatever the split into tokens, and nothing sent is ever taken back;
* chat templates: random messages render, or raise ChatTemplateError, nothing else;
* tool calls (parse_tool_calls, ToolCallStreamParser): garbage never raises, a reported call
  is always a JSON object, and random valid calls split into random deltas parse back.

The real default model's tokenizer is loaded once per module (no function-scoped fixture:
hypothesis would run it once for all examples)."""

from __future__ import annotations

import copy
import functools
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from metroline.engine.output_text import OutputText
from metroline.errors import ModelLoadError
from metroline.structured.tools import CLOSE, OPEN, ToolCallStreamParser, parse_tool_calls
from metroline.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer, _byte_alphabet

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    from metroline.model.default import default_model_path
    from metroline.model.loader import load_tokenizer_from_gguf

    try:
        return load_tokenizer_from_gguf(default_model_path())
    except ModelLoadError as e:
        pytest.skip(f"default model not installed: {e}")


def tok() -> Tokenizer:
    return _tokenizer()


@functools.lru_cache(maxsize=1)
def _byte_ids() -> dict[int, int]:
    """byte -> id of its single-byte token in the (byte-level) default vocabulary. SmolLM2's has
    none for 21 bytes (e.g. 0xC0, 0xC1, 0xF5-0xFF, never in UTF-8): those are left out."""
    spell = _byte_alphabet()
    ids = {b: tok().token_to_id(spell[b]) for b in range(256)}
    return {b: i for b, i in ids.items() if i is not None}


VOCAB = 49152  # the default model's; checked against the tokenizer below
SPECIALS = list(range(17))
# Bytes without a token of their own in SmolLM2's vocabulary: a character containing one cannot
# be encoded (the byte is dropped, as transformers drops it), e.g. "\x04" or U+40000-U+BFFFF.
MISSING_BYTES = frozenset([4, 6, 19, 20, 22, 29, 192, 193, 241, 242, *range(245, 256)])
representable = st.characters(codec="utf-8").filter(lambda c: not MISSING_BYTES.intersection(c.encode()))

token_ids = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, 400), st.sampled_from(SPECIALS))
# Cut positions: where a list of n items is split into chunks (each chunk >= 1 item).
cuts = st.lists(st.integers(0, 200), max_size=20)


def chunks(seq, cut_points):
    points = sorted({c for c in cut_points if 0 < c < len(seq)})
    out, last = [], 0
    for c in points + [len(seq)]:
        out.append(seq[last:c])
        last = c
    return [c for c in out if len(c)]


def detok_stream(ids, cut_points, **kw) -> list[str]:
    det = IncrementalDetokenizer(tok(), **kw)
    out = [det.step(c) for c in chunks(ids, cut_points)]
    out.append(det.flush())
    assert det.text == "".join(out)
    return out


def test_vocab_constant():
    assert tok().vocab_size == VOCAB and set(SPECIALS) <= tok().special_token_ids
    assert set(_byte_ids()) == set(range(256)) - MISSING_BYTES


# ---- 1. incremental detokenization ---------------------------------------------------------------


@SETTINGS
@given(st.lists(token_ids, max_size=60), cuts, st.booleans())
def test_detok_deltas_equal_one_shot_decode(ids, cut_points, skip):
    out = detok_stream(ids, cut_points, skip_special_tokens=skip)
    assert "".join(out) == tok().decode(ids, skip)
    # Only flush may give out an incomplete character (as U+FFFD): a delta never ends in one.
    assert not any(o.endswith("\ufffd") for o in out[:-1])


@SETTINGS
@given(st.binary(max_size=40), cuts, st.lists(st.sampled_from(SPECIALS), max_size=3), st.booleans())
@example(b"\xf0\x9f\x98\x80", [1, 2, 3], [], True)  # one emoji, a byte at a time
@example(b"a\x80\xc3b\xe2\x82", [], [], True)  # invalid and truncated sequences in the middle
def test_detok_random_bytes(data, cut_points, specials, skip):
    """Byte tokens making invalid UTF-8 anywhere (with special tokens in between) never raise;
    the invariant holds, and the result is Python's lossy decode of the bytes when no special
    token is in the way."""
    data = bytes(b for b in data if b in _byte_ids())
    ids = [_byte_ids()[b] for b in data]
    for k, s in enumerate(specials):  # spread the specials through the bytes
        ids.insert((k + 1) * len(ids) // (len(specials) + 1), s)
    out = detok_stream(ids, cut_points, skip_special_tokens=skip)
    assert "".join(out) == tok().decode(ids, skip)
    assert not any(o.endswith("\ufffd") for o in out[:-1])
    if not specials:
        assert "".join(out) == data.decode("utf-8", errors="replace")


@SETTINGS
@given(st.text(representable, max_size=40), cuts)
def test_detok_encoded_text_round_trips(text, cut_points):
    """Text encoded by the tokenizer streams back as exactly that text, never half a character.
    (Special-token strings in the text become special ids, which decoding skips; characters
    with a byte the vocabulary lacks, see MISSING_BYTES, cannot be encoded at all.)"""
    ids = tok().encode(text, add_special_tokens=False)
    out = detok_stream(ids, cut_points)
    assert "".join(out) == tok().decode(ids)
    assert not any("\ufffd" in o for o in out) or "\ufffd" in text
    if not any(s in text for s in ("<|", "<repo", "<file", "<gh", "<issue", "<jupyter", "<empty")):
        assert "".join(out) == text


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@SETTINGS
@given(st.one_of(st.lists(token_ids, min_size=1, max_size=12),
                 st.binary(min_size=1, max_size=8).map(lambda b: [_byte_ids()[x] for x in b if x in _byte_ids()])),
       st.lists(token_ids, max_size=30), cuts)
def test_detok_with_prompt_context(prompt, gen, cut_points):
    """With prompt ids, the text is what decoding the generated tokens after the prompt adds:
    decode(prompt + generated) beyond where it stops agreeing with decode(prompt) (they agree
    up to the prompt's last complete character)."""
    out = detok_stream(gen, cut_points, prompt_ids=prompt)
    before, after = tok().decode(prompt), tok().decode(prompt + gen)
    # The detokenizer sees the last 5 prompt tokens only: compare with what those decode to.
    ctx = prompt[-5:]
    cb, ca = tok().decode(ctx), tok().decode(ctx + gen)
    assert "".join(out) == ca[_common_prefix(cb, ca):]
    if len(ctx) == len(prompt):
        assert "".join(out) == after[_common_prefix(before, after):]
    assert not any(o.endswith("\ufffd") for o in out[:-1])


def test_detok_prompt_ending_inside_a_character():
    """Regression: the prompt ends with the first byte of an emoji and the generated tokens
    complete it. The emoji was lost (deltas "", "", "x"): the generated text had the same
    length as the prompt's decode ("hi\ufffd" vs "hi😀"), so it counted as nothing new."""
    emoji = [_byte_ids()[b] for b in "😀".encode()]
    prompt, gen = tok().encode("hi") + emoji[:1], emoji[1:] + tok().encode("x")
    for cut_points in ([], [1, 2], [1]):
        assert "".join(detok_stream(gen, cut_points, prompt_ids=prompt)) == "😀x"


# ---- 2. stop strings across token boundaries -----------------------------------------------------


def first_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The reference: generation stops as soon as a stop string is complete, so the stop is the
    occurrence that ends first (of two ending at the same character, the longer one)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text.endswith(s, 0, end)]
        if hits:
            s = max(hits, key=len)
            return text[:end - (0 if include else len(s))], s
    return text, None


class ChunkDetokenizer:
    """A detokenizer whose token i is the text chunks[i] (any split of a text into tokens)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def step(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def flush(self):
        return ""


def run_output_text(otext: OutputText, ids, take_after: list[bool]) -> tuple[str, str | None, list[str]]:
    """Append ids one at a time as the scheduler does (stopping at a stop string), taking the
    stable text after some of them; (final text, stop string, pieces sent)."""
    sent, stop = [], None
    for k, i in enumerate(ids):
        stop = otext.append(i)
        if stop is not None:
            break
        if take_after[k % len(take_after)]:
            sent.append(otext.take(finished=False))
            assert otext.text.startswith("".join(sent))
    if stop is None:
        stop = otext.flush()
    sent.append(otext.take(finished=True))
    assert otext.take(finished=True) == ""
    return otext.text, stop, sent


stop_alphabet = st.sampled_from("abc\n😀é")
stop_texts = st.text(stop_alphabet, max_size=40)
stop_lists = st.lists(st.text(stop_alphabet, min_size=1, max_size=5), min_size=1, max_size=4)


@SETTINGS
@given(stop_texts, stop_lists, cuts, st.booleans(), st.lists(st.booleans(), min_size=1, max_size=5))
# One token "abcd" completed both "abcd" and "c": OutputText picked the one starting first
# ("abcd", text ""), but split "ab", "c", "d" the same text stopped at "c" (text "ab").
@example("abcd", ["abcd", "c"], [], False, [True])
@example("abcd", ["abcd", "c"], [1, 2, 3], False, [True])
def test_stop_strings_any_split(text, stops, cut_points, include, take_after):
    pieces = chunks(text, cut_points) or [""]
    otext = OutputText(ChunkDetokenizer(pieces), stops, include)
    final, stop, sent = run_output_text(otext, range(len(pieces)), take_after)
    want_text, want_stop = first_stop(text, stops, include)
    assert (final, stop) == (want_text, want_stop)
    assert "".join(sent) == final  # nothing sent was taken back (no partial stop string went out)


@SETTINGS
@given(st.text(representable.filter(lambda c: c != "<"), max_size=30),
       st.data(), st.booleans(), st.lists(st.booleans(), min_size=1, max_size=5))
def test_stop_strings_real_tokens(text, data, include, take_after):
    """The same through the real tokenizer and detokenizer (stop strings drawn from the text,
    so that they occur, and cut anywhere, also inside a token or a character's bytes)."""
    ids = tok().encode(text, add_special_tokens=False)
    full = tok().decode(ids)
    stops = data.draw(st.lists(
        st.one_of(st.text(min_size=1, max_size=3),
                  st.tuples(st.integers(0, max(0, len(full) - 1)), st.integers(1, 4)).map(
                      lambda t: full[t[0]:t[0] + t[1]]).filter(bool)),
        min_size=1, max_size=3))
    otext = OutputText(IncrementalDetokenizer(tok(), tok().encode("Say:")), stops, include)
    final, stop, sent = run_output_text(otext, ids, take_after)
    assert (final, stop) == first_stop(full, stops, include)
    assert "".join(sent) == final


@SETTINGS
@given(st.lists(token_ids, max_size=40), st.booleans())
def test_output_text_without_stops_is_the_decode(ids, skip):
    otext = OutputText(IncrementalDetokenizer(tok(), skip_special_tokens=skip))
    final, stop, sent = run_output_text(otext, ids, [True, False])
    assert stop is None and final == "".join(sent) == tok().decode(ids, skip)


# ---- 3. chat templates ---------------------------------------------------------------------------

# Any code point but surrogates (which cannot be encoded as UTF-8), NUL and emoji included.
content_text = st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ["\x00", "😀👍🏽", "<|im_end|>", "{{ x }}", "{% raw %}", "\u202e", ""])
roles = st.sampled_from(["user", "assistant", "system"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | content_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(content_text, inner, max_size=3),
    max_leaves=8)
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": content_text},
                                          optional={"name": content_text, "extra": json_values}),
                    min_size=1, max_size=5)


@SETTINGS
@given(messages, st.booleans())
def test_chat_template_renders_random_messages(msgs, gen):
    out = tok().apply_chat_template(msgs, add_generation_prompt=gen)
    assert isinstance(out, str)
    pos = 0
    for m in msgs:  # every content, in order, with its role
        i = out.find(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>", pos)
        assert i >= 0, (m, out)
        pos = i
    assert out.endswith("<|im_start|>assistant\n") == gen or msgs[-1]["content"].endswith("<|im_start|>assistant\n")


@SETTINGS
@given(st.lists(st.dictionaries(st.sampled_from(["role", "content", "tool_calls", "name", "reasoning"]),
                                json_values | roles, max_size=4)
                | json_values, max_size=4)
       | json_values,
       st.sampled_from([None, "default"]))
def test_chat_template_only_raises_its_error(msgs, template):
    """Anything as messages: the result is a string or ChatTemplateError, never another error."""
    t = tok()
    if template is None:
        t = copy.copy(t)
        t.chat_template = None  # the ChatML fallback, which reads list contents too
    try:
        out = t.apply_chat_template(msgs)
    except ChatTemplateError as e:
        assert e.param == "messages"
    else:
        assert isinstance(out, str)
        for m in msgs:
            if isinstance(m.get("content"), str):
                assert m["content"] in out


# ---- 4. tool calls -------------------------------------------------------------------------------


def stream_calls(text: str, cut_points) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(content, [(name, arguments)] of the complete calls, as assembled from the streamed
    pieces), checking that the pieces agree with `calls`."""
    p = ToolCallStreamParser()
    content, assembled, last = [], {}, 0
    for c in sorted({c for c in cut_points if 0 < c < len(text)}) + [len(text)]:
        d, pieces = p.feed(text[last:c])
        last = c
        content.append(d)
        for piece in pieces:
            if piece.id is not None:
                assembled[piece.index] = [piece.id, piece.name, ""]
            assembled[piece.index][2] += piece.arguments
    d, _ = p.finish()
    content.append(d)
    by_id = {i: (n, a) for i, n, a in assembled.values()}
    calls = [(c.name, c.arguments) for c in p.calls]
    assert [by_id[c.id] for c in p.calls] == calls
    return "".join(content), calls, p.unfinished


garbage_alphabet = st.sampled_from([OPEN, CLOSE, "<", "<tool_", "</tool", "{", "}", "[", "]", '"', "\\", ":",
                                    ",", " ", "\n", '"name"', '"arguments"', '"f"', "1", "2", "null", "x"])
garbage = st.text(max_size=60) | st.lists(garbage_alphabet, max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(garbage, cuts)
# Reported as a complete call although the body is not JSON (the head was canonical, the
# arguments "1 2" are no JSON value) -- the docstring promises such text is not a call.
@example(f'{OPEN}{{"name": "f", "arguments": 1 2}}{CLOSE}', [])
@example(f'{OPEN}{{"name": "f", "arguments": {{}},}}{CLOSE}', [])
@example(f'{OPEN}{{"name": "f", "arguments": {{}}, "name": "g"}}{CLOSE}', [5])
def test_tool_calls_garbage(text, cut_points):
    """Any text: no exception, streamed == whole, every reported call is a JSON object whose
    name and arguments are the call's, and the content never loses text outside the calls."""
    content, calls = parse_tool_calls(text)
    for name, args in ((c.name, c.arguments) for c in calls):
        json.loads(args)  # valid JSON
        assert isinstance(name, str)
    s_content, s_calls, unfinished = stream_calls(text, cut_points)
    assert s_calls == [(c.name, c.arguments) for c in calls]
    if not calls:  # no call: all of the text is content (in the stream, less unfinished calls)
        assert content == text
        if not unfinished:
            assert s_content == text


def _call_text(name, args, order, key, json_kw, pad):
    obj = {"name": name, key: args} if order else {key: args, "name": name}
    return OPEN + pad + json.dumps(obj, **json_kw) + pad + CLOSE


json_args = st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6), max_size=4)
json_kw = st.fixed_dictionaries({"ensure_ascii": st.booleans(), "indent": st.sampled_from([None, 0, 2]),
                                 "separators": st.sampled_from([None, (",", ":"), (", ", ": ")])})
one_call = st.tuples(st.text(max_size=12), json_args, st.booleans(), st.sampled_from(["arguments", "parameters"]),
                     json_kw, st.sampled_from(["", " ", "\n"]))
plain = st.text(max_size=15).filter(lambda s: OPEN not in s)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(plain, one_call), max_size=3), plain, cuts)
def test_tool_calls_round_trip(parts, tail, cut_points):
    """Random calls serialized in the documented format between random text, split into random
    deltas: the same calls come back (name, arguments as JSON), and the text between is the
    content (a "\\n" right after a call separates calls and is not content)."""
    text, want_content, want_calls, after_call = "", "", [], False
    for before, call in parts + [(tail, None)]:
        text += before
        want_content += before[1:] if after_call and before.startswith("\n") else before
        if call is None:
            break
        name, args, order, key, kw, pad = call
        text += _call_text(name, args, order, key, kw, pad)
        want_calls.append((name, args))
        after_call = True
    got_content, got_calls, unfinished = stream_calls(text, cut_points)
    assert unfinished == []
    assert [(n, json.loads(a)) for n, a in got_calls] == want_calls
    whole_content, whole_calls = parse_tool_calls(text)
    assert whole_content == got_content
    assert got_content == want_content
    assert [(c.name, c.arguments) for c in whole_calls] == got_calls
