"""metroline.tokenizer against transformers' GGUF tokenizer, plus the streaming detokenizer and ShareGPT reader."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest

import metroline.datasets as datasets
from metroline.datasets import iter_sharegpt
from metroline.errors import InvalidRequestError, ModelLoadError
from metroline.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF]")
CJK = re.compile("[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")

EDGE_TEXTS = [
    "",
    " ",
    "  12 345\n\n 6789",
    "Hello <|im_start|>user\nhi<|im_end|>\n<|endoftext|><|im_end|>",
    "<|im_start|><|im_start|>x<|im_end|>",
    "héllo 😀 世界 🇫🇷 👨‍👩‍👧 👍🏽 Ελληνικά العربية हिन्दी",
    "\t\n\r  \u00a0x\u200b y\u3000z",
    "it's I'LL we've 'd ''",
    "```python\ndef f(x):\n    return x**2  # 二乗\n```",
    "a" * 500 + " " * 40 + "!" * 30,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi 😀, what is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Summarise 日本の歴史."},
        {"role": "assistant", "content": "Long. Complex."},
        {"role": "user", "content": "More?"},
    ],
    [{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """The first 500 ShareGPT turns (≤2000 chars each), plus later emoji and other non-ASCII turns."""
    first: list[str] = []
    emoji: list[str] = []
    other: list[str] = []
    for rec in iter_sharegpt(limit=1500):
        for turn in rec["conversations"]:
            v = turn.get("value")
            if not isinstance(v, str) or not v.strip():
                continue
            v = v[:2000]
            if len(first) < 500:
                first.append(v)
            elif EMOJI.search(v) and len(emoji) < 40:
                emoji.append(v)
            elif not v.isascii() and len(other) < 80:
                other.append(v)
    return first + emoji + other


def _mismatches(ours, theirs, texts: list[str]) -> list[str]:
    return [t for t in texts if ours(t) != theirs(t)]


# ---- ShareGPT reader ---------------------------------------------------------------------------------


def _write_truncated(path, records: list, tail: bytes) -> None:
    body = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, indent=2) for r in records) + ",\n"
    path.write_bytes(body.encode() + tail)


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_iter_sharegpt_truncated_file(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(datasets, "_CHUNK_BYTES", chunk)
    recs = [
        {
            "id": f"r{i}",
            "conversations": [{"from": "human", "value": f"q{i} é😀"}, {"from": "gpt", "value": "a" * i}],
        }
        for i in range(5)
    ]
    recs.insert(2, {"id": "no-conversations"})
    path = tmp_path / "sharegpt.json"
    # cut inside a 4-byte emoji inside a string inside the last record
    _write_truncated(path, recs, '{"id": "cut", "conversations": [{"from": "human", "value": "x 😀'.encode()[:-2])
    got = list(iter_sharegpt(path=path))
    assert [r["id"] for r in got] == [f"r{i}" for i in range(5)]
    assert got[3]["conversations"][0]["value"] == "q3 é😀"
    assert [r["id"] for r in iter_sharegpt(limit=2, path=path)] == ["r0", "r1"]
    path.write_text(json.dumps(recs[:2]))  # a complete file works too
    assert len(list(iter_sharegpt(path=path))) == 2


def test_sample_texts_cover_non_ascii(texts):
    assert len(texts) >= 500
    assert sum(not t.isascii() for t in texts) >= 50
    assert sum(bool(EMOJI.search(t)) for t in texts) >= 10
    assert sum(bool(CJK.search(t)) for t in texts) >= 5


# ---- ids identical to transformers ---------------------------------------------------------------------


def test_ids_match_transformers(tokenizer, hf_tokenizer, texts):
    bad = _mismatches(tokenizer.encode, hf_tokenizer.encode, texts + EDGE_TEXTS)
    assert not bad, f"{len(bad)} texts differ, first: {bad[0][:200]!r}"


def test_decode_matches_transformers(tokenizer, hf_tokenizer, texts):
    for t in texts[:100] + EDGE_TEXTS:
        ids = tokenizer.encode(t)
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=False) == t  # byte-level BPE is lossless
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens(tokenizer, hf_tokenizer):
    im_start = tokenizer.encode("<|im_start|>")
    assert im_start == [1] and tokenizer.id_to_token(1) == "<|im_start|>"
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
    assert not tokenizer.add_bos_token and tokenizer.encode("hi")[0] != tokenizer.bos_token_id
    assert tokenizer.stop_token_ids == {2}  # <|im_end|> is eos; <|endoftext|> is not an end of turn here
    assert set(hf_tokenizer.all_special_ids) <= tokenizer.special_token_ids == set(range(17))
    assert tokenizer.decode([1, 104, 2]) == "x" and tokenizer.decode([1, 104, 2], False) == "<|im_start|>x<|im_end|>"
    with pytest.raises(IndexError):
        tokenizer.id_to_token(10**6)


def test_raw_control_token_outside_byte_alphabet(gguf_meta):
    """Control tokens stored as raw text (DeepSeek's "<｜User｜>") stay whole, as in llama.cpp."""
    tokens = list(gguf_meta["tokenizer.ggml.tokens"])
    tokens[16] = "<｜User｜>"
    tok = Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.tokens": tokens})
    ids = tok.encode("a<｜User｜>b")
    assert 16 in ids and tok.decode(ids, skip_special_tokens=False) == "a<｜User｜>b"
    assert tok.decode(ids) == "ab" and 16 in tok.special_token_ids


def test_bos_added_only_when_model_says_so(gguf_meta):
    tok = Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.add_bos_token": True})
    assert tok.encode("hi")[0] == tok.bos_token_id == 1
    assert tok.encode("hi", add_special_tokens=False)[0] != 1


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "qwen35", "gpt-4o", "tekken", "deepseek-llm"])
def test_pre_tokenizer_types_match_transformers(gguf_meta, texts, pre):
    """Our split regex per tokenizer.ggml.pre gives transformers' ids (SmolLM2 vocab, other pre types)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    keys = {"tokens": "tokens", "merges": "merges", "token_type": "token_type", "model": "tokenizer_type"}
    tdict = {v: gguf_meta[f"tokenizer.ggml.{k}"] for k, v in keys.items()} | {"pre_tokenizer_type": pre}
    ref, _ = mapping.convert_gguf_tokenizer("llama", tdict)
    ours = Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.pre": pre})
    sample = texts[::5] + EDGE_TEXTS + ["1234567 89 x1y22 ١٢٣", "Ünïcödé\u0301 ab\u0300c", "a/b/c\n\n\r\nd"]
    bad = _mismatches(ours.encode, lambda t: ref.encode(t, add_special_tokens=False).ids, sample)
    assert not bad, f"{pre}: {len(bad)} differ, first: {bad[0][:200]!r}"


# ---- chat template ------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, conv, gen):
    ours = tokenizer.apply_chat_template(conv, add_generation_prompt=gen)
    assert ours == hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert tokenizer.encode(ours) == hf_tokenizer.apply_chat_template(conv, add_generation_prompt=gen)["input_ids"]


def test_chat_template_variables_and_fallback(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = (
        "{{ bos_token }}|{{ eos_token }}|{{ messages[0] | tojson }}|{{ extra }}|{% generation %}g{% endgeneration %}"
    )
    out = tok.apply_chat_template([{"role": "user", "content": "é<", "name": None}], extra=3)
    assert out == '<|im_start|>|<|im_end|>|{"role": "user", "content": "é<"}|3|g'
    tok.chat_template = None
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    assert tok.apply_chat_template(conv) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user"}], "no 'content'"),
        ([{"content": "hi"}], "no 'role'"),
        (["hi"], "must be an object"),
        ([], "non-empty"),
    ],
)
def test_chat_template_bad_messages(tokenizer, messages, match):
    with pytest.raises(ChatTemplateError, match=match) as e:
        tokenizer.apply_chat_template(messages)
    assert isinstance(e.value, InvalidRequestError) and e.value.param == "messages"


def test_chat_template_errors(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    assert tok.apply_chat_template([{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": "s"}])
    tok.chat_template = "{{ messages[0]['content'] + 1 }}"
    with pytest.raises(ChatTemplateError, match="failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = "{% for %}"
    with pytest.raises(ChatTemplateError, match="invalid"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = "{{ messages.append(1) }}"  # the immutable sandbox refuses
    with pytest.raises(ChatTemplateError, match="unsafe"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# ---- loading errors and other sources ---------------------------------------------------------------


@pytest.mark.parametrize("model", ["t5", "bert", "rwkv", None])
def test_unsupported_tokenizer_model(gguf_meta, model):
    with pytest.raises(ModelLoadError, match="unsupported GGUF tokenizer model"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.model": model})


def test_missing_vocab_and_bad_ids(gguf_meta):
    with pytest.raises(ModelLoadError, match="no tokenizer vocabulary"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ModelLoadError, match="outside the vocabulary"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.eos_token_id": 10**7})
    with pytest.raises(ModelLoadError, match="gemma"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.model": "llama", "general.architecture": "gemma2"})


def test_from_hf_dir(tokenizer, hf_tokenizer, texts, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert not _mismatches(tok.encode, tokenizer.encode, texts[:100] + EDGE_TEXTS)
    assert tok.chat_template == tokenizer.chat_template
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (1, 2, False)
    assert tok.stop_token_ids == {0, 2} and tok.special_token_ids == tokenizer.special_token_ids
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory, texts) -> str:
    """A tiny SentencePiece-style ('llama') GGUF: scores but no merges, byte-fallback pieces, a user token."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    raw.train_from_iterator(texts[:300], trainers.BpeTrainer(vocab_size=2000, show_progress=False, limit_alphabet=200))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<think>"]
    types = [2, 3, 3, *[6] * 256, 4]
    scores = [0.0] * len(tokens)
    for piece, rank in sorted(raw.get_vocab().items(), key=lambda kv: kv[1]):
        if piece not in tokens:
            tokens.append(piece), types.append(1), scores.append(-float(rank))
    path = str(tmp_path_factory.mktemp("spm") / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(256), w.add_embedding_length(64), w.add_block_count(1), w.add_feed_forward_length(128)
    w.add_head_count(4), w.add_head_count_kv(4), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(1e4)
    w.add_vocab_size(len(tokens)), w.add_tokenizer_model("llama")
    w.add_token_list(tokens), w.add_token_scores(scores), w.add_token_types(types)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def spm_tokenizer(spm_gguf) -> Tokenizer:
    from metroline.model.loader import load_tokenizer_from_gguf

    return load_tokenizer_from_gguf(spm_gguf)


def test_sentencepiece_gguf_matches_transformers(spm_gguf, spm_tokenizer, texts):
    transformers = pytest.importorskip("transformers")
    import os

    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(spm_gguf), gguf_file=os.path.basename(spm_gguf))
    sample = texts[::3] + EDGE_TEXTS + ["<s> a</s> <think>b <unk>"]
    assert not _mismatches(spm_tokenizer.encode, ref.encode, sample)
    assert spm_tokenizer.add_bos_token and spm_tokenizer.encode("x")[0] == 1
    for t in sample[:50]:
        ids = spm_tokenizer.encode(t)
        assert spm_tokenizer.decode(ids) == ref.decode(ids, skip_special_tokens=True)


# ---- incremental detokenizer ------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random | None = None, **kw) -> list[str]:
    det = IncrementalDetokenizer(tok, **kw)
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3) if rng else 1
        out.append(det.step(ids[i : i + n]))
        i += n
    out.append(det.flush())
    assert det.text == "".join(out)
    return out


@pytest.mark.parametrize("which", ["tokenizer", "spm_tokenizer"])
def test_incremental_random_ids(request, which):
    tok: Tokenizer = request.getfixturevalue(which)
    rng = random.Random(0)
    # mix in low ids: specials, lone bytes (byte-level) / <0xNN> pieces (SentencePiece)
    pools = [range(tok.vocab_size), range(300), range(20)]
    for _ in range(300):
        pool = rng.choice(pools)
        n = rng.randint(0, 40)
        ids = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(tok.vocab_size) for _ in range(n)]
        for skip in (True, False):
            out = _stream(tok, ids, rng, skip_special_tokens=skip)
            assert "".join(out) == tok.decode(ids, skip), ids
            assert not any(o.endswith("\ufffd") for o in out[:-1])


@pytest.mark.parametrize("which", ["tokenizer", "spm_tokenizer"])
def test_incremental_one_token_at_a_time(request, which, texts):
    tok: Tokenizer = request.getfixturevalue(which)
    samples = [t for t in texts if EMOJI.search(t) or CJK.search(t)][:15] + EDGE_TEXTS[5:6]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        out = _stream(tok, ids)
        assert "".join(out) == tok.decode(ids)
        assert not any("\ufffd" in o for o in out)  # never half a character


def test_incremental_with_prompt_context(tokenizer, spm_tokenizer):
    text = "Hello 世界! 😀👍🏽 naïve"
    for tok in (tokenizer, spm_tokenizer):
        prompt = tok.encode("Say:")
        ids = tok.encode(text, add_special_tokens=False)
        got = "".join(_stream(tok, ids, prompt_ids=prompt))
        whole = tok.decode(prompt + ids)
        assert got == whole[len(tok.decode(prompt)):]
    assert got == " " + text  # SentencePiece: the first generated word keeps its space after a prompt


def test_incremental_is_constant_work_per_token(tokenizer, texts):
    sizes: list[int] = []

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            ids = list(ids)
            sizes.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    tok = copy.copy(tokenizer)
    tok.__class__ = Counting
    ids = tok.encode(" ".join(texts[:40]))
    assert len(ids) > 2000
    _stream(tok, ids)
    assert max(sizes) <= 12 and len(sizes) <= 2 * len(ids) + 4
