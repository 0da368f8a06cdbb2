"""One sample's text as its tokens are appended: incremental detokenization, the stop-string
search, and how much of the text has been sent.

The scheduler appends tokens one at a time (several per step under speculative decoding), so
a stop string completed by the i-th accepted token ends the request right there: the tokens
after it are never appended. Text that could still be the start of a stop string (up to the
longest stop string minus one character) is held back until it cannot be.
"""

from __future__ import annotations

from typing import Sequence


class OutputText:
    def __init__(self, detokenizer, stop: Sequence[str] = (), include_stop_str: bool = False):
        self.detok = detokenizer
        self.stop = list(stop)
        self.include_stop_str = include_stop_str
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent_chars = 0
        self._flushed = False
        self.stopped = False  # a stop string matched: the text is final

    def append(self, token_id: int) -> str | None:
        """Add one token's text; returns the stop string it completed, if any (the text then
        ends at it, or after it with include_stop_str). Of several, the one that ends first."""
        return self._add(self.detok.step([token_id]))

    def flush(self) -> str | None:
        """At the end: text held back by the detokenizer (a partial character) is added."""
        if self._flushed:
            return None
        self._flushed = True
        return self._add(self.detok.flush())

    def _add(self, new: str) -> str | None:
        if not new or self.stopped:
            return None
        # A match ending in the new text starts at most `hold` characters before it.
        start = max(0, len(self.text) - self.hold)
        self.text += new
        if not self.stop:
            return None
        # Generation stops as soon as a stop string is complete, so the match is the one that
        # ends first (of two ending at the same character, the longer): the same whichever way
        # the text was split into tokens. (The first-starting one was taken: one token "abcd"
        # stopped at "abcd" for stops ["abcd", "c"], tokens "ab", "c", "d" at "c".)
        best = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or (pos + len(s), pos) < (best[0] + len(best[1]), best[0])):
                best = (pos, s)
        if best is None:
            return None
        pos, s = best
        self.stopped = True
        self.text = self.text[:pos + (len(s) if self.include_stop_str else 0)]
        return s

    def take(self, finished: bool) -> str:
        """The text not sent yet that can no longer change; all of it once finished."""
        if finished:
            self.flush()
        end = len(self.text) if finished else max(self.sent_chars, len(self.text) - self.hold)
        piece = self.text[self.sent_chars:end]
        self.sent_chars = end
        return piece
