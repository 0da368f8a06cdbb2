"""The llguidance backend of metroline.structured.

One `LLTokenizer` per tokenizer (built from its `tokenizers` JSON, ~0.3 s, cached), grammars
validated against it at compile time and cached by text (an LRU of 256), and one `LLMatcher`
per sample. Each step the step's matchers write their allowed-token bitmasks in one batch
call (llguidance's thread pool, off the GIL); numpy unpacks them into boolean rows, which the
sampler applies to the logits (engine.processors.MaskingProcessor).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from metroline.engine.processors import MaskingProcessor
from metroline.structured import GrammarError, GrammarSpec

_BACKENDS: dict[int, "LLGuidanceBackend"] = {}
_LOCK = threading.Lock()
# JSON Schema keywords llguidance accepts but does not enforce as a client expects (it names
# the others it does not implement itself, "Unimplemented keys: [...]"): refused up front.
_REFUSED_KEYWORDS = ("patternProperties",)
# Fixed separators, no free whitespace: a small model left to choose whitespace can emit it
# forever (the grammar would allow that), and clients never need it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Likewise digits: numbers get at most 6 decimals (measured: 99.9999998999... until max_tokens
# at temperature 0.8).
_NUMBER_STEP = 1e-6
# Keys whose values are not schemas, and keys whose values map names to schemas.
_NOT_SCHEMAS = ("enum", "const", "default", "examples", "description", "title", "required", "x-guidance")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def backend_for(tokenizer) -> "LLGuidanceBackend":
    with _LOCK:
        b = _BACKENDS.get(id(tokenizer))
        if b is None or b.tokenizer is not tokenizer:
            b = _BACKENDS[id(tokenizer)] = LLGuidanceBackend(tokenizer)
        return b


def _subschemas(schema) -> list:
    """The schemas directly inside a schema (or a list of them)."""
    if isinstance(schema, list):
        return schema
    if not isinstance(schema, dict):
        return []
    out = []
    for k, v in schema.items():
        if k in _SCHEMA_MAPS and isinstance(v, dict):
            out += v.values()
        elif k not in _NOT_SCHEMAS:
            out.append(v)
    return out


def _refused_keyword(schema) -> str | None:
    if isinstance(schema, dict):
        found = next((k for k in schema if k in _REFUSED_KEYWORDS), None)
        if found:
            return found
    return next(filter(None, map(_refused_keyword, _subschemas(schema))), None)


def prepare_json_schema(schema):
    """A copy of the schema as metroline constrains it: every number without a multipleOf gets
    multipleOf 1e-6 (at most 6 decimals in the output; the value range is unchanged)."""
    if isinstance(schema, list):
        return [prepare_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _NOT_SCHEMAS:
            out[k] = v
        elif k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: prepare_json_schema(sub) for name, sub in v.items()}
        else:
            out[k] = prepare_json_schema(v)
    t = schema.get("type")
    if (t == "number" or (isinstance(t, list) and "number" in t)) and "multipleOf" not in schema:
        out["multipleOf"] = _NUMBER_STEP
    return out


def _unpack(words: torch.Tensor) -> torch.Tensor:
    """Bitmask words [..., W] int32 -> boolean [..., 32 W]: bit j of little-endian word w is token
    32w + j, and numpy unpacks the bytes lowest bit first in one pass (~10 us for 49k tokens;
    shifting int32 words in torch is ~100)."""
    return torch.from_numpy(np.unpackbits(words.numpy().view(np.uint8), axis=-1, bitorder="little")).view(torch.bool)


class LLGuidanceBackend:
    def __init__(self, tokenizer, cache_size: int = 256):
        import llguidance

        self._ll = llguidance
        self.tokenizer = tokenizer
        stop = sorted(tokenizer.stop_token_ids) or None
        self.ll_tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                                                   eos_token=stop)
        self.stop_ids = frozenset(tokenizer.stop_token_ids)
        self._cache: OrderedDict[GrammarSpec, "LLGuidanceGrammar"] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._executor = None

    def executor(self):
        """llguidance's thread pool for batch masks (made on first use)."""
        if self._executor is None:
            from metroline.platform import physical_cores

            self._executor = self._ll.LLExecutor(num_threads=max(1, physical_cores()))
        return self._executor

    def _grammar_text(self, spec: GrammarSpec) -> str:
        M = self._ll.LLMatcher
        if spec.kind in ("json_schema", "json_object"):
            schema = json.loads(spec.source)
            bad = _refused_keyword(schema)
            if bad:
                raise GrammarError(f"JSON schema keyword {bad!r} is not supported")
            try:
                return M.grammar_from_json_schema(prepare_json_schema(schema), overrides=JSON_OPTIONS)
            except (ValueError, TypeError) as e:
                raise GrammarError(f"invalid JSON schema: {e}") from None
        if spec.kind == "regex":
            return M.grammar_from_regex(spec.source)
        if spec.kind == "lark":
            return M.grammar_from_lark(spec.source)
        options = json.loads(spec.source)
        return M.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))

    def compile(self, spec: GrammarSpec) -> "LLGuidanceGrammar":
        with self._cache_lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        text = self._grammar_text(spec)
        try:
            err = self._ll.LLMatcher.validate_grammar(text, self.ll_tokenizer)
        except Exception as e:  # the library's own checks, whatever they raise
            err = f"{type(e).__name__}: {e}"
        if err:
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {err.strip()}")
        compiled = LLGuidanceGrammar(self, text)
        with self._cache_lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


class LLGuidanceGrammar:
    """A validated grammar; `processor()` gives a request its LogitsProcessor."""

    def __init__(self, backend: LLGuidanceBackend, text: str):
        self.backend, self.text = backend, text

    def processor(self) -> "GrammarProcessor":
        return GrammarProcessor(self)

    def matcher(self):
        return self.backend._ll.LLMatcher(self.backend.ll_tokenizer, self.text, log_level=0)


class GrammarProcessor(MaskingProcessor):
    """Masks the logits row to the tokens the grammar allows next. The matcher is made on first
    use, so the template a request carries costs nothing until a sample forks it."""

    def __init__(self, grammar: LLGuidanceGrammar):
        self.grammar = grammar
        self._matcher = None
        n = grammar.backend.ll_tokenizer.vocab_size
        self._words = torch.zeros((n + 31) // 32, dtype=torch.int32)

    @property
    def matcher(self):
        if self._matcher is None:
            self._matcher = self.grammar.matcher()
        return self._matcher

    def allowed(self) -> torch.Tensor:
        """Boolean [vocab] row of the tokens that may come next."""
        m = self.matcher
        if m.is_error():
            raise GrammarError(f"grammar matcher failed: {m.get_error()}")
        m.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        if m.is_error():
            raise GrammarError(f"grammar matcher failed: {m.get_error()}")
        if not bool(self._words.any()):
            raise GrammarError("the grammar allows no next token with this model's vocabulary")
        return _unpack(self._words)

    @classmethod
    def allowed_batch(cls, processors) -> torch.Tensor:
        """All the step's grammar masks in one llguidance call (its threads, off the GIL)."""
        if len(processors) == 1:
            return processors[0].allowed().unsqueeze(0)
        backend = processors[0].grammar.backend
        for p in processors:
            if p.grammar.backend is not backend or p.matcher.is_error():
                raise GrammarError("mixed backends or a failed matcher")  # the caller asks one by one
        words = processors[0]._words.numel()
        buf = torch.zeros(len(processors), words, dtype=torch.int32)
        backend.executor().unsafe_compute_mask_ptr([(p.matcher, k) for k, p in enumerate(processors)],
                                                   buf.data_ptr(), words * 4, len(processors))
        if any(p.matcher.is_error() for p in processors):
            raise GrammarError("a matcher failed")
        if not bool(buf.any(dim=1).all()):
            raise GrammarError("a grammar allows no next token")
        return _unpack(buf)

    def accept(self, token_ids: Sequence[int]) -> None:
        m = self.matcher
        ids = list(token_ids)
        if m.is_stopped() and all(t in self.grammar.backend.stop_ids for t in ids):
            return  # the end-of-sequence token that the finished grammar allowed
        if not m.consume_tokens(ids):
            raise GrammarError(f"token(s) {list(token_ids)} rejected by the grammar: {m.get_error()}")

    def forced(self) -> list[int]:
        m = self.matcher
        if m.is_stopped() or m.is_error():
            return []
        return m.compute_ff_tokens()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def fork(self) -> "GrammarProcessor":
        return GrammarProcessor(self.grammar)
