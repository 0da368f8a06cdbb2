"""The llguidance backend of metroline.structured.

One `LLTokenizer` per tokenizer (built from its `tokenizers` JSON, ~0.3 s, cached), grammars
validated against it at compile time and cached by text (an LRU of 256), and one `LLMatcher`
per sample. Each step the matcher writes the allowed-token bitmask (its Rust code, off the
GIL), which becomes a boolean row with one vectorized shift-and-mask; the logits row is
masked in one `masked_fill`.
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
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def backend_for(tokenizer) -> "LLGuidanceBackend":
    with _LOCK:
        b = _BACKENDS.get(id(tokenizer))
        if b is None or b.tokenizer is not tokenizer:
            b = _BACKENDS[id(tokenizer)] = LLGuidanceBackend(tokenizer)
        return b


def _refused_keyword(schema) -> str | None:
    if isinstance(schema, dict):
        for k, v in schema.items():
            if k in _REFUSED_KEYWORDS:
                return k
            if k in ("enum", "const", "default", "examples", "description", "title"):
                continue
            subs = v.values() if k in ("properties", "$defs", "definitions") and isinstance(v, dict) else [v]
            for sub in subs:
                found = _refused_keyword(sub)
                if found:
                    return found
    elif isinstance(schema, list):
        for v in schema:
            found = _refused_keyword(v)
            if found:
                return found
    return None


_NUMBER_STEP = 1e-6
_NOT_SCHEMAS = ("enum", "const", "default", "examples", "description", "title", "required", "x-guidance")


def _bounded_numbers(schema):
    """A copy of the schema in which every number without a multipleOf gets multipleOf 1e-6
    (at most 6 decimals in the output; the value range is unchanged)."""
    if isinstance(schema, list):
        return [_bounded_numbers(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _NOT_SCHEMAS:
            out[k] = v
        elif k in ("properties", "$defs", "definitions", "patternProperties") and isinstance(v, dict):
            out[k] = {name: _bounded_numbers(sub) for name, sub in v.items()}
        else:
            out[k] = _bounded_numbers(v)
    t = schema.get("type")
    if (t == "number" or (isinstance(t, list) and "number" in t)) and "multipleOf" not in schema:
        out["multipleOf"] = _NUMBER_STEP
    return out


class LLGuidanceBackend:
    def __init__(self, tokenizer, cache_size: int = 256):
        import llguidance

        self._ll = llguidance
        self.tokenizer = tokenizer
        stop = sorted(tokenizer.stop_token_ids) or None
        self.ll_tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                                                   eos_token=stop)
        self.vocab_size = tokenizer.vocab_size
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
                # Fixed separators, no free whitespace: a small model left to choose whitespace
                # can emit it forever (the grammar would allow that), and clients never need it.
                # Likewise digits: numbers get at most 6 decimals (measured: 99.9999998999...
                # until max_tokens at temperature 0.8).
                return M.grammar_from_json_schema(_bounded_numbers(schema), overrides=_JSON_OPTIONS)
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
        # Bit j of little-endian word w is token 32w + j: numpy unpacks the bytes lowest bit
        # first in one pass (~10 us for 49k tokens; shifting int32 words in torch is ~100).
        if not bool(self._words.any()):
            raise GrammarError("the grammar allows no next token with this model's vocabulary")
        return torch.from_numpy(np.unpackbits(self._words.numpy().view(np.uint8), bitorder="little")).view(torch.bool)

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
        return torch.from_numpy(np.unpackbits(buf.numpy().view(np.uint8), axis=1, bitorder="little")).view(torch.bool)

    def accept(self, token_ids: Sequence[int]) -> None:
        m = self.matcher
        ids = list(token_ids)
        if m.is_stopped() and all(t in self.grammar.backend.stop_ids for t in ids):
            return  # the end-of-sequence token that the finished grammar allowed
        if not m.consume_tokens(ids):
            raise GrammarError(f"token(s) {list(token_ids)} rejected by the grammar: {m.get_error()}")

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar allows as the only continuation (fast-forward)."""
        return list(self.matcher.compute_ff_tokens())

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def fork(self) -> "GrammarProcessor":
        return GrammarProcessor(self.grammar)
