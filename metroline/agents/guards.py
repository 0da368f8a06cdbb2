"""Guards of an agent run against loops and failing tools (issue 15): pure logic, no I/O, so the
runtime can pass every model and tool call through them at one choke point.

* CircuitBreaker, per tool: closed (calls pass); after `failures` consecutive failures, open
  (calls are refused for `cooldown_s`); then half-open: one probe call passes, its success closes
  the breaker, its failure opens it again for another cool-down.
* LoopDetector, per run: sees each tool call (name, arguments, result) and says how far the run
  has gone round in circles: the same call with the same arguments `repeat` times within the
  last `window` calls, an A-B-A-B cycle of two calls, or `stale` results in a row that bring
  nothing new. Each detection escalates one level: HINT (tell the model), REMOVE (take that tool
  out of the grammar), STOP (end the run), and says why.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["BreakerState", "CircuitBreaker", "Escalation", "LoopVerdict", "LoopDetector"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    failures: int = 3  # consecutive failures that open it
    cooldown_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    state: BreakerState = BreakerState.CLOSED
    consecutive: int = 0
    opened_at: float = 0.0
    probing: bool = False  # a half-open probe is out

    def __post_init__(self):
        if self.failures < 1 or self.cooldown_s < 0:
            raise ValueError("a breaker needs failures >= 1 and cooldown_s >= 0")

    def allow(self) -> bool:
        """Whether a call may go now (a True in half-open state is the one probe)."""
        if self.state is BreakerState.OPEN:
            if self.clock() - self.opened_at < self.cooldown_s:
                return False
            self.state, self.probing = BreakerState.HALF_OPEN, False
        if self.state is BreakerState.HALF_OPEN:
            if self.probing:
                return False
            self.probing = True
        return True

    def record(self, ok: bool) -> None:
        if ok:
            self.state, self.consecutive, self.probing = BreakerState.CLOSED, 0, False
            return
        self.consecutive += 1
        if self.state is BreakerState.HALF_OPEN or self.consecutive >= self.failures:
            self.state, self.opened_at, self.probing = BreakerState.OPEN, self.clock(), False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 otherwise)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.cooldown_s - (self.clock() - self.opened_at))


class Escalation(enum.IntEnum):
    NONE = 0
    HINT = 1  # tell the model it is repeating itself
    REMOVE = 2  # take the tool out of the grammar
    STOP = 3  # end the run (the model is asked for a final answer without tools)


@dataclass
class LoopVerdict:
    level: Escalation
    kind: str = ""  # "repeat" | "cycle" | "stale"
    tool: str = ""  # the tool the loop runs through (for REMOVE)
    reason: str = ""


def _digest(obj) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class LoopDetector:
    window: int = 8  # calls looked back over
    repeat: int = 3  # the same call this many times in the window is a loop
    stale: int = 4  # this many results in a row already seen are a loop
    history: deque = field(default_factory=deque)
    seen_results: set = field(default_factory=set)
    stale_run: int = 0
    level: Escalation = Escalation.NONE

    def __post_init__(self):
        if self.window < 4 or self.repeat < 2 or self.stale < 2:
            raise ValueError("a loop detector needs window >= 4, repeat >= 2 and stale >= 2")

    def observe(self, name: str, arguments, result: str) -> LoopVerdict:
        """One completed tool call; a verdict above NONE when it closes a loop (each detection
        one level higher than the last, up to STOP)."""
        call = (name, _digest(arguments))
        self.history.append(call)
        while len(self.history) > self.window:
            self.history.popleft()
        r = _digest([name, result])
        self.stale_run = self.stale_run + 1 if r in self.seen_results else 0
        self.seen_results.add(r)

        h = list(self.history)
        found = None
        if h.count(call) >= self.repeat:
            found = ("repeat", f"{name} called {h.count(call)} times with the same arguments in the last {len(h)} calls")
        elif len(h) >= 4 and h[-1] == h[-3] and h[-2] == h[-4] and h[-1] != h[-2]:
            found = ("cycle", f"{h[-2][0]} and {name} alternate with the same arguments (A-B-A-B)")
        elif self.stale_run >= self.stale:
            found = ("stale", f"{self.stale_run} tool results in a row brought nothing new")
        if found is None:
            return LoopVerdict(Escalation.NONE)
        self.level = Escalation(min(int(self.level) + 1, int(Escalation.STOP)))
        self.history.clear()  # the next level needs a loop of its own
        self.stale_run = 0
        return LoopVerdict(self.level, found[0], name, found[1])
