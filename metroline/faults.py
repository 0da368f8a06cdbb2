"""Fault injection: make a named point of the engine raise or stall, to test that a failure
stays with the requests it touches (issue 16's fault tests, scripts/stress.sh).

Points (each a `hit(point)` call where the work happens):
  step        ModelRunner.execute, before the forward pass: the whole step fails
  kernel      the model's forward, inside the pass (as a failing kernel would)
  detokenize  OutputText.append, per request and token
  tool        ToolRegistry.call, per tool call (an agent's tool)

    from metroline import faults
    with faults.injected("step", after=3, times=1):     # the 4th step raises, once
        ...
    faults.inject("detokenize", match="req-7")          # only that request's detokenizer
    faults.inject("tool", stall_s=2.0, match="search")  # a tool that hangs for 2 s
    faults.clear()

Or, for a server in another process, METROLINE_FAULTS="step:after=3:times=1,tool:stall_s=2"
(read at import). With nothing armed, `hit` is one global check: the hot paths pay nothing
more.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

POINTS = ("step", "kernel", "detokenize", "tool")


class InjectedFault(RuntimeError):
    """What an armed point raises (unless the fault names another exception)."""


@dataclass
class Fault:
    point: str
    after: int = 0  # let this many hits through first
    times: int | None = 1  # then fire this many times (None: every hit)
    stall_s: float = 0.0  # sleep this long at the point (then raise only if `raise_`)
    raise_: bool = True
    match: str | None = None  # fire only when the hit's key contains this
    message: str = "injected fault"
    hits: int = 0
    fired: int = 0

    def _should_fire(self, key: str | None) -> bool:
        if self.match is not None and (key is None or self.match not in key):
            return False
        self.hits += 1
        if self.hits <= self.after:
            return False
        return self.times is None or self.fired < self.times


_lock = threading.Lock()
_faults: list[Fault] = []
ACTIVE = False  # read without the lock on the hot path


def inject(point: str, *, after: int = 0, times: int | None = 1, stall_s: float = 0.0,
           raise_: bool | None = None, match: str | None = None, message: str | None = None) -> Fault:
    """Arm `point`. A stall without raise_ only delays; with raise_ it delays, then raises."""
    global ACTIVE
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; points: {', '.join(POINTS)}")
    if after < 0 or (times is not None and times < 1) or stall_s < 0:
        raise ValueError("after >= 0, times >= 1 (or None) and stall_s >= 0")
    f = Fault(point, after, times, stall_s, (stall_s == 0.0) if raise_ is None else raise_, match,
              message or f"injected fault at {point}")
    with _lock:
        _faults.append(f)
        ACTIVE = True
    return f


def clear() -> None:
    global ACTIVE
    with _lock:
        _faults.clear()
        ACTIVE = False


@contextlib.contextmanager
def injected(point: str, **kw):
    """inject() for the block; the fault is disarmed at its end."""
    global ACTIVE
    f = inject(point, **kw)
    try:
        yield f
    finally:
        with _lock:
            if f in _faults:
                _faults.remove(f)
            ACTIVE = bool(_faults)


def hit(point: str, key: str | None = None) -> None:
    """A fault point: raises InjectedFault or stalls when armed for this point (and key)."""
    if not ACTIVE:
        return
    fire = None
    with _lock:
        for f in _faults:
            if f.point == point and f._should_fire(key):
                f.fired += 1
                fire = f
                break
    if fire is None:
        return
    if fire.stall_s:
        time.sleep(fire.stall_s)
    if fire.raise_:
        raise InjectedFault(fire.message + (f" ({key})" if key else ""))


def parse_spec(spec: str) -> list[dict]:
    """METROLINE_FAULTS: comma-separated `point[:name=value]...`."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, *opts = part.split(":")
        kw: dict = {}
        for o in opts:
            name, _, value = o.partition("=")
            if name in ("after", "times"):
                kw[name] = None if value == "none" else int(value)
            elif name == "stall_s":
                kw[name] = float(value)
            elif name == "raise":
                kw["raise_"] = value not in ("0", "false", "no")
            elif name in ("match", "message"):
                kw[name] = value
            else:
                raise ValueError(f"METROLINE_FAULTS: unknown option {name!r} in {part!r}")
        out.append({"point": point, **kw})
    return out


if os.environ.get("METROLINE_FAULTS"):
    for _kw in parse_spec(os.environ["METROLINE_FAULTS"]):
        inject(_kw.pop("point"), **_kw)
