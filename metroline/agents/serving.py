"""Serving hints for agent programs (issue 15): how long to keep a model call's KV for the call
that follows the tool (after Continuum's tool-aware KV retention).

An agent's model call that ends in a tool call is followed, once the tool answers, by a call
whose prompt is the same context plus the tool result. Pinning the first call's KV
(RequestHints.session_id + kv_retention_s) lets the next call skip recomputing it, but a pin
holds pool blocks that running work could use. So retain it only about as long as the tool is
expected to take:

  retention = max(floor_s, expected * margin)   when expected <= cap_s (clipped to cap_s)
            = 0 (no pin)                        when expected > cap_s: the pin would hold
                                                memory for longer than it is worth, and a
                                                turn that slow can afford the recompute

The expectation comes from ToolLatencyTracker: an exponential moving average of each tool's
observed latency, a prior until the first observation. Pure logic, no I/O; agents/ may import
engine/, never the reverse.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterable, Iterator

from metroline.engine.validation import MAX_KV_RETENTION_S

__all__ = ["ToolLatencyTracker", "retention_seconds"]

DEFAULT_MARGIN = 1.5  # retain for 1.5x the expected latency: most calls come back in time
DEFAULT_FLOOR_S = 0.5  # never less: covers the agent's own turn-around and queueing
DEFAULT_CAP_S = 30.0  # a tool expected to take longer gets no retention


def _check_latency(value: float, name: str) -> float:
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return value


def retention_seconds(expected_tool_latency_s: float, margin: float = DEFAULT_MARGIN,
                      floor_s: float = DEFAULT_FLOOR_S, cap_s: float = DEFAULT_CAP_S) -> float:
    """kv_retention_s for the model call that precedes a tool call expected to take
    `expected_tool_latency_s`; 0.0 means do not retain (send no kv_retention_s)."""
    expected = _check_latency(expected_tool_latency_s, "expected_tool_latency_s")
    if margin < 1.0:
        raise ValueError("margin must be >= 1 (retaining for less than the expected latency "
                         "would drop the KV just before it is needed)")
    if floor_s < 0 or cap_s < 0:
        raise ValueError("floor_s and cap_s must be >= 0")
    cap_s = min(cap_s, MAX_KV_RETENTION_S)
    if math.isinf(expected) or expected > cap_s:
        return 0.0
    return min(cap_s, max(floor_s, expected * margin))


class ToolLatencyTracker:
    """Per-tool estimate of how long a call takes: an exponential moving average of what was
    observed (weight `alpha` for the newest), `prior_s` (or the tool's own entry in `priors`)
    until the first observation, which replaces the prior. Remembers at most `max_tools`
    tools, dropping the least recently used."""

    def __init__(self, prior_s: float = 1.0, alpha: float = 0.3, *,
                 priors: dict[str, float] | None = None, max_tools: int = 1024,
                 clock=time.monotonic):
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if max_tools < 1:
            raise ValueError("max_tools must be >= 1")
        self.prior_s = _check_latency(prior_s, "prior_s")
        self.alpha = alpha
        self.priors = {k: _check_latency(v, f"priors[{k!r}]") for k, v in (priors or {}).items()}
        self.max_tools = max_tools
        self._clock = clock
        self._ema: OrderedDict[str, float] = OrderedDict()
        self._count: dict[str, int] = {}

    def observe(self, tool: str, latency_s: float) -> float:
        """Record one call's latency; returns the new estimate."""
        latency_s = _check_latency(latency_s, "latency_s")
        old = self._ema.pop(tool, None)
        new = latency_s if old is None else (1 - self.alpha) * old + self.alpha * latency_s
        self._ema[tool] = new
        self._count[tool] = self._count.get(tool, 0) + 1
        while len(self._ema) > self.max_tools:
            gone, _ = self._ema.popitem(last=False)
            self._count.pop(gone, None)
        return new

    @contextmanager
    def measure(self, tool: str) -> Iterator[None]:
        """`with tracker.measure("search"): await ...` records the block's duration (also
        when it raises: a failing tool's latency is still what the KV had to wait)."""
        t0 = self._clock()
        try:
            yield
        finally:
            self.observe(tool, max(0.0, self._clock() - t0))

    def expected(self, tool: str) -> float:
        if tool in self._ema:
            self._ema.move_to_end(tool)
            return self._ema[tool]
        return self.priors.get(tool, self.prior_s)

    def num_observations(self, tool: str) -> int:
        return self._count.get(tool, 0)

    def retention_for(self, tools: str | Iterable[str], **kwargs) -> float:
        """kv_retention_s for a model call followed by `tools` (run in parallel: the slowest
        decides); kwargs go to retention_seconds."""
        names = [tools] if isinstance(tools, str) else list(tools)
        if not names:
            return 0.0
        return retention_seconds(max(self.expected(t) for t in names), **kwargs)

    def __len__(self) -> int:
        return len(self._ema)
