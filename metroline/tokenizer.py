"""Tokenizer: GGUF or Hugging Face tokenizer.json -> `tokenizers` backend, chat templates, streaming detokenization.

The reference for token ids is transformers' own GGUF loader (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`); where it and llama.cpp disagree we follow transformers and say so below.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

from metroline.errors import InvalidRequestError, ModelLoadError

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]


class ChatTemplateError(InvalidRequestError):
    """The chat template cannot render these messages (bad message, or the template raised)."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param=param, code="invalid_chat_template")


# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split regexes by tokenizer.ggml.pre, as transformers' GGUF loader applies them. Any other pre type
# (including 'gpt2', 'smollm', 'starcoder', ...) gets the plain GPT-2 ByteLevel regex there, and here.
# Note llama.cpp's 'smollm' additionally isolates every digit (like SmolLM's original tokenizer.json,
# `Digits(individual_digits=True)`); transformers' GGUF loader does not. SmolLM2's merges contain no
# digits, so the only visible difference is whitespace before a number ("  12": transformers gives
# "Ġ","Ġ","1","2"; llama.cpp "ĠĠ","1","2"). We match transformers.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}

# SentencePiece GGUFs of these architectures need model-specific fixes in transformers; not supported.
_SPM_UNSUPPORTED_ARCHS = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "phi3"})

# Special tokens that end an assistant turn in common chat formats. Only counted as stop tokens when the
# model has them as special tokens *and* its chat template writes them: a base model that merely has
# <|im_end|> in its vocabulary should not stop on it. <|endoftext|> is deliberately absent: it separates
# documents rather than ending turns, so it only stops generation when it is the model's eos.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|end_of_turn|>")

_FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _derive_merges(vocab: dict[str, int], scores: dict[str, float] | None) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary without a merge list, ranked as transformers ranks them.

    Every split of a token into two in-vocabulary halves is a merge; with scores (SentencePiece) the
    best-scored result merges first, else the lowest id. Ties break on the halves' lengths, so the
    outcome (and hence the ids) is identical to transformers' `generate_merges`.
    """
    ranked: dict[str, float] = scores if scores is not None else vocab  # type: ignore[assignment]
    found: list[tuple[str, str, float]] = []
    for piece, score in ranked.items():
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        pairs = [(a, b, score) for a, b in cuts if a in vocab and b in vocab]
        pairs.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found += pairs
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=scores is not None)
    return [(a, b) for a, b, _ in found]


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_id: int | None,
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        special_token_strings: dict[int, str] | None = None,
    ):
        self.backend = backend
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.unk_token_id, self.pad_token_id = unk_token_id, pad_token_id
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        named = {bos_token_id, eos_token_id, unk_token_id, pad_token_id} - {None}
        self.special_token_ids: frozenset[int] = frozenset({i for i, t in added.items() if t.special} | named)
        strings = special_token_strings or {}
        self._special_names = {  # what chat templates see as bos_token, eos_token, ...
            name: strings.get(i) or self.backend.id_to_token(i)
            for name, i in (("bos_token", bos_token_id), ("eos_token", eos_token_id),
                            ("unk_token", unk_token_id), ("pad_token", pad_token_id))
            if i is not None
        }
        stop = {eos_token_id, *extra_stop_ids} - {None}
        template = chat_template or ""
        for name in _END_OF_TURN:
            i = backend.token_to_id(name)
            if i is not None and i in self.special_token_ids and name in template:
                stop.add(i)
        self.stop_token_ids: frozenset[int] = frozenset(stop)  # type: ignore[arg-type]
        # SentencePiece byte-fallback pieces <0xNN>: the decoder joins a run of them before UTF-8
        # decoding, so streaming must not treat text as final while such a run may still grow.
        self.byte_fallback_ids: frozenset[int] = frozenset()
        model = backend.model
        if isinstance(model, BPE) and model.byte_fallback:
            self.byte_fallback_ids = frozenset(
                i for t, i in backend.get_vocab().items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
            )

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        # list(): metadata readers may hand arrays over as numpy arrays
        tokens: list[str] = list(meta.get("tokenizer.ggml.tokens", ()))
        if not tokens:
            raise ModelLoadError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))]
        if len(types) != len(tokens):
            raise ModelLoadError("GGUF tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
        if any(len(m) != 2 for m in merges):
            raise ModelLoadError("GGUF tokenizer.ggml.merges has an entry that is not two space-separated tokens")

        if kind == "gpt2":
            spell = _byte_alphabet()
            alphabet = set(spell.values())
            # llama.cpp stores added tokens (control/user-defined) as raw text, e.g. DeepSeek's "<｜User｜>".
            # transformers respells every token outside the byte alphabet from its UTF-8 bytes and then
            # leaves such control tokens out, so they can never be encoded whole. We keep those two kinds
            # raw and add them (as llama.cpp and the original tokenizer.json do; the ByteLevel decoder
            # emits raw text as is) and respell only normal tokens, as transformers does.
            spelled = [
                t if set(t) <= alphabet or ty in (_CONTROL, _USER_DEFINED) else "".join(spell[b] for b in t.encode())
                for t, ty in zip(tokens, types)
            ]
            vocab = {t: i for i, t in enumerate(spelled)}
            backend = tokenizers.Tokenizer(BPE(
                vocab, merges or _derive_merges(vocab, None), dropout=None,
                continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
            ))
            split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre") or "")
            if split is None:
                backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            else:
                backend.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ])
            backend.decoder = decoders.ByteLevel()
            default_bos = False
        elif kind == "llama":
            arch = meta.get("general.architecture")
            if arch in _SPM_UNSUPPORTED_ARCHS:
                raise ModelLoadError(f"SentencePiece tokenizer of architecture {arch!r} is not supported")
            vocab = {t: i for i, t in enumerate(tokens)}
            if not merges:
                scores = meta.get("tokenizer.ggml.scores")
                merges = _derive_merges(vocab, None if scores is None else dict(zip(tokens, map(float, scores))))
            backend = tokenizers.Tokenizer(BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
            # transformers always prepends "▁" to the first word here, ignoring tokenizer.ggml.add_space_prefix.
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            backend.decoder = decoders.Sequence([
                decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
            ])
            default_bos = True  # llama.cpp's default for SentencePiece vocabularies without the flag
        else:
            raise ModelLoadError(
                f"unsupported GGUF tokenizer model {kind!r} "
                "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)"
            )

        def special_id(key: str) -> int | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            if i is None:
                return None
            if not 0 <= int(i) < len(tokens):
                raise ModelLoadError(f"GGUF tokenizer.ggml.{key} = {i} is outside the vocabulary")
            return int(i)

        keys = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
        bos, eos, unk, pad = (special_id(k) for k in keys)
        # Like transformers, the named special tokens are special even when the file marks them normal --
        # unless stored respelled: as raw text they would get a fresh id past the model's vocabulary.
        named = [i for i in (bos, eos, unk, pad) if i is not None]
        control = [i for i, ty in enumerate(types) if ty == _CONTROL] + named
        control = [i for i in dict.fromkeys(control) if vocab.get(tokens[i]) == i]
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        # User-defined tokens (e.g. <think>) are matched whole in text but are not special.
        user = [t for i, (t, ty) in enumerate(zip(tokens, types)) if ty == _USER_DEFINED and vocab.get(t) == i]
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        extra = [i for k in ("eot_token_id", "eom_token_id") if (i := special_id(k)) is not None]
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_token_id=bos,
            eos_token_id=eos,
            unk_token_id=unk,
            pad_token_id=pad,
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template") or None,
            extra_stop_ids=extra,
            special_token_strings={i: tokens[i] for i in named},
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise ModelLoadError(f"no tokenizer.json in {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the Rust loader raises a bare Exception on malformed files
            raise ModelLoadError(f"cannot load {file}: {e}") from None
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))
        model_cfg = _read_json(os.path.join(path, "config.json"))

        def token_id(name: str, cfg_key: str) -> int | None:
            content = _token_content(cfg.get(name))
            if content is not None and (i := backend.token_to_id(content)) is not None:
                return i
            for source in (gen, model_cfg):
                if ids := _ids(source.get(cfg_key)):
                    return ids[0]
            return None

        bos, eos = token_id("bos_token", "bos_token_id"), token_id("eos_token", "eos_token_id")
        unk, pad = token_id("unk_token", "unk_token_id"), token_id("pad_token", "pad_token_id")
        # Without explicit flags, transformers uses tokenizer.json's post-processor: see what it adds.
        probe = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        add_bos = cfg.get("add_bos_token", bos is not None and len(probe) > len(plain) and probe[0] == bos)
        add_eos = cfg.get("add_eos_token", eos is not None and len(probe) > len(plain) and probe[-1] == eos)

        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if not template:
            jinja = os.path.join(path, "chat_template.jinja")
            if os.path.isfile(jinja):
                with open(jinja, encoding="utf-8") as f:
                    template = f.read()
            else:
                template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
        return cls(
            backend,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            bos_token_id=bos,
            eos_token_id=eos,
            unk_token_id=unk,
            pad_token_id=pad,
            add_bos_token=bool(add_bos),
            add_eos_token=bool(add_eos),
            chat_template=template if isinstance(template, str) and template else None,
            extra_stop_ids=_ids(gen.get("eos_token_id")) + _ids(model_cfg.get("eos_token_id")),
        )

    # ---- encode / decode ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. "<|im_start|>") become their ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        token = self.backend.id_to_token(int(i))
        if token is None:
            raise IndexError(f"token id {i} is outside the vocabulary")
        return token

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat template ------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's chat template (a ChatML fallback when it has none).

        Like transformers: keys whose value is None are dropped from messages, the bos_token/eos_token/
        unk_token/pad_token strings are template variables, and `kwargs` become template variables too.
        """
        import jinja2

        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatTemplateError("messages must be a non-empty list")
        chat = []
        for n, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ChatTemplateError(f"messages[{n}] must be an object, got {type(message).__name__}")
            message = {k: _plain(v) for k, v in message.items() if v is not None}
            if not isinstance(message.get("role"), str):
                raise ChatTemplateError(f"messages[{n}] has no 'role' string")
            if "content" not in message and "tool_calls" not in message:
                raise ChatTemplateError(f"messages[{n}] (role {message['role']!r}) has no 'content'")
            # transformers exposes reasoning under every name templates read it by.
            reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        variables = {**self._special_names, **{k: _plain(v) for k, v in kwargs.items()}}
        documents = variables.pop("documents", None)
        try:
            return _compile_template(self.chat_template or _FALLBACK_CHAT_TEMPLATE).render(
                messages=chat, tools=_plain(tools), documents=documents,
                add_generation_prompt=add_generation_prompt, **variables,
            )
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the model's chat template is invalid: {e.message} (line {e.lineno})") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e.message or e}") from None
        except Exception as e:  # anything else the template trips over, e.g. 'str' + None
            raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None


def _plain(value: Any) -> Any:
    """A JSON-like copy of template input, so the sandboxed template never sees caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):  # subclasses such as StrEnum: slicing yields a plain str
        return value[:]
    for base in (bool, int, float):  # bool first: it is an int
        if isinstance(value, base):
            return base(value)
    return str(value)


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns generated ids into text as they arrive, emitting only text that later tokens cannot change.

    Keeps a window tokens[prefix:] where tokens[prefix:read] were already emitted: each step decodes the
    window, and whatever it has beyond the decoded tokens[prefix:read] is new. That text is held back
    while it ends with U+FFFD (a partial UTF-8 character, or with byte-fallback vocabularies a run of
    <0xNN> pieces that the next piece could extend); once emitted, the window slides, so each step
    decodes a few tokens whatever the length of the output. The window always starts where a complete
    character ended, so decoding it agrees with decoding everything: all step() outputs plus flush()
    equal tokenizer.decode(generated ids). With `prompt_ids`, the last few prompt tokens are left
    context, so the text continues the prompt (e.g. SentencePiece keeps the first word's space):
    the outputs then equal what decode(context + generated) adds beyond its common prefix with
    decode(context), so a character the prompt left incomplete comes out whole once completed.
    """

    _CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = [int(i) for i in prompt_ids[-self._CONTEXT:]] if prompt_ids else []
        self._read = len(self._ids)  # window = self._ids; self._ids[:self._read] is already accounted for
        self._done_text: str | None = None  # decode(self._ids[:self._read]), cached
        self.text = ""

    def _emit(self, final: bool) -> str:
        if self._done_text is None:
            self._done_text = self._tok.decode(self._ids[: self._read], self._skip)
        if not final and self._tok.byte_fallback_ids and self._in_byte_run():
            return ""
        full = self._tok.decode(self._ids, self._skip)
        done = self._done_text
        # The window starts at a complete character, so full extends done -- except when the
        # prompt context ends inside a character (done ends with U+FFFD) that these tokens
        # complete: the text then goes on from where the two stop agreeing.
        start = len(done) if full.startswith(done) else _common_prefix_len(done, full)
        if len(full) <= start or (not final and full.endswith("\ufffd")):
            return ""
        new = full[start:]
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._done_text = None
        self.text += new
        return new

    def _in_byte_run(self) -> bool:
        # Skipped special tokens vanish before decoding, so the run can continue across them.
        for i in reversed(self._ids):
            if not (self._skip and i in self._tok.special_token_ids):
                return i in self._tok.byte_fallback_ids
        return False

    def step(self, new_ids: Iterable[int]) -> str:
        """Add generated ids; return the text that became final (possibly "")."""
        self._ids += [int(i) for i in new_ids]
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (e.g. an incomplete character at the end of generation)."""
        return self._emit(final=True)


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
