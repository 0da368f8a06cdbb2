"""Structured outputs: grammars that constrain what a request may sample.

A request asks for a shape (`GrammarSpec`: a JSON schema, any JSON object, a regex, a Lark
grammar, or one of a list of strings). At admission, `compile_grammar(tokenizer, spec)`
turns it into a `CompiledGrammar` or raises `GrammarError` with the library's message (the
server answers 400; nothing invalid ever reaches the engine loop). Compiled grammars are
cached by their text. `CompiledGrammar.processor()` is a `LogitsProcessor` for the request:
each sample forks its own matcher, the engine tells it the accepted tokens and rolls it back
with rejected drafts, and each step it masks every token that cannot continue a valid output
(once the output is complete only the end-of-sequence tokens remain).

The backend is llguidance (grammar_llguidance.py); this module is the interface the engine
and the server see, so another library can stand behind it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from metroline.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "lark", "choice")


class GrammarError(InvalidRequestError):
    """A grammar, schema or regex that cannot be compiled, or that leads nowhere while a
    request decodes (the message says why): the request's input, never the engine's fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. `source` is the canonical text: a JSON schema
    (serialized), a regex, a Lark grammar, or the JSON list of choices."""

    kind: str
    source: str

    @classmethod
    def json_schema(cls, schema: Any) -> "GrammarSpec":
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        # Key order kept: properties are generated in the order the schema lists them.
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls("json_object", '{"type":"object"}')

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> "GrammarSpec":
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("grammar must be a non-empty Lark grammar")
        return cls("lark", grammar)

    @classmethod
    def choice(cls, options: list[str]) -> "GrammarSpec":
        if (not isinstance(options, list) or not options
                or not all(isinstance(o, str) and o for o in options)):
            raise GrammarError("choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(options))

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r} (one of {', '.join(KINDS)})")


def compile_grammar(tokenizer, spec: GrammarSpec):
    """A CompiledGrammar for `tokenizer` (metroline.tokenizer.Tokenizer); raises GrammarError."""
    from metroline.structured.grammar_llguidance import backend_for

    return backend_for(tokenizer).compile(spec)


def available() -> tuple[bool, str | None]:
    """Whether a grammar backend is installed, and if not, why."""
    try:
        import llguidance  # noqa: F401
    except ImportError as e:
        return False, f"llguidance is not installed ({e}); pip install llguidance"
    return True, None


@dataclass(frozen=True)
class PortableGrammar:
    """A request's grammar processor as it crosses to another process (a Ray replica): the
    grammar text already validated at admission, compiled again there against that
    process's tokenizer (a matcher holds native state that does not pickle)."""

    text: str


def portable_processors(processors: list) -> list:
    """`processors` with each grammar processor replaced by its PortableGrammar; others as they
    are (they must pickle)."""
    from metroline.structured.grammar_llguidance import GrammarProcessor

    return [PortableGrammar(p.grammar.text) if isinstance(p, GrammarProcessor) else p
            for p in processors]


def restore_processors(tokenizer, items: list) -> list:
    """The inverse of portable_processors, in the process that runs the engine."""
    if not any(isinstance(p, PortableGrammar) for p in items):
        return items
    from metroline.structured.grammar_llguidance import LLGuidanceGrammar, backend_for

    backend = backend_for(tokenizer)
    return [LLGuidanceGrammar(backend, p.text).processor() if isinstance(p, PortableGrammar) else p
            for p in items]
