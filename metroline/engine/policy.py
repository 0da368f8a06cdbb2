"""Scheduling policies: the order in which the scheduler serves requests.

The scheduler asks a SchedulingPolicy for one thing, `sort_key(req, now)` (lower = served
first). It sorts `running` by it every step, so the last running request is the preemption
victim, and, when the policy says `sorts_waiting`, the waiting queue before each admission.
It tells the policy what happened: `on_add` when a request is queued, `on_tokens` with the
tokens computed for a request in a step (prefill tokens run through the model + tokens
generated; prefix-cache hits are not service), `on_step` once per step, `on_finish` when a
request ends for any reason.

Built in, by name (SchedulerConfig.policy):
  fcfs       arrival order; waiting is a FIFO (a preempted request goes back to its front)
  priority   Request.priority (lower first), then arrival
  plas       program-level least attained service (after Autellix's PLAS): service is
             accumulated per program (RequestHints.program_id; a request without one is its
             own program) over all of its calls, and the call of the program that has had
             the least service so far goes first. A short agent program is therefore never
             stuck behind a long one's tenth call, which is what cuts mean job completion
             time when job lengths are heavy-tailed.

Starvation (plas): a request's effective service is its program's attained service minus
`aging_rate` tokens for every second the request has waited since it arrived, so a request
of a program with S tokens of service ties with a brand-new program's request after at most
S / aging_rate seconds of waiting, and then goes ahead of everything that arrives later.

Memory (plas): a program's state is dropped once it has no live request and none for
`idle_ttl_s` seconds (an agent's tool call shorter than that keeps its history).

A user may pass their own SchedulingPolicy instance instead of a name. One instance holds
state: give each engine its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from metroline.config import SCHEDULING_POLICIES

if TYPE_CHECKING:
    from metroline.engine.request import Request

__all__ = ["FCFSPolicy", "POLICIES", "PriorityPolicy", "ProgramLeastAttainedPolicy",
           "SchedulingPolicy", "make_policy"]


class SchedulingPolicy:
    """Base class: arrival order, no state. Override sort_key and the hooks you need."""

    name = "custom"
    # Whether the waiting queue is sorted by sort_key before each admission; if not, it is
    # served first-in first-out (a preempted request re-enters at its front).
    sorts_waiting = True

    def sort_key(self, req: "Request", now: float) -> tuple:
        return (req.arrival_time, req.arrival_seq)

    def on_add(self, req: "Request", now: float) -> None:
        """A request was queued (called once per request, not again after a preemption)."""

    def on_tokens(self, req: "Request", num_tokens: int) -> None:
        """`num_tokens` were computed for `req` in the step just applied."""

    def on_step(self, now: float) -> None:
        """Called once per schedule(), before anything is sorted."""

    def on_finish(self, req: "Request") -> None:
        """`req` finished (stopped, length, aborted, error)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FCFSPolicy(SchedulingPolicy):
    name = "fcfs"
    sorts_waiting = False


class PriorityPolicy(SchedulingPolicy):
    name = "priority"

    def sort_key(self, req: "Request", now: float) -> tuple:
        return (req.priority, req.arrival_time, req.arrival_seq)


@dataclass
class _Program:
    service: float = 0.0  # tokens computed for this program's requests, all calls together
    live: int = 0  # its requests not finished yet
    last_active: float = 0.0  # when one of them was last added, served or finished


class ProgramLeastAttainedPolicy(SchedulingPolicy):
    """PLAS: least attained service per program first, with linear aging (see module doc)."""

    name = "plas"

    def __init__(self, aging_rate: float = 100.0, idle_ttl_s: float = 300.0,
                 prune_interval_s: float = 1.0):
        if aging_rate < 0:
            raise ValueError("aging_rate must be >= 0")
        if idle_ttl_s <= 0:
            raise ValueError("idle_ttl_s must be > 0")
        self.aging_rate = aging_rate  # tokens of service forgiven per second waited
        self.idle_ttl_s = idle_ttl_s
        self.prune_interval_s = prune_interval_s
        self.programs: dict[str, _Program] = {}
        self._now = 0.0
        self._last_prune = float("-inf")

    @staticmethod
    def program_of(req: "Request") -> str:
        # A request without a program is its own one (its n > 1 samples share it).
        return req.program_id if req.program_id is not None else f"\0req:{req.group_id}"

    def attained_service(self, program_id: str) -> float:
        p = self.programs.get(program_id)
        return p.service if p is not None else 0.0

    def effective_service(self, req: "Request", now: float) -> float:
        waited = max(0.0, now - req.arrival_time)
        return self.attained_service(self.program_of(req)) - self.aging_rate * waited

    def sort_key(self, req: "Request", now: float) -> tuple:
        return (self.effective_service(req, now), req.arrival_time, req.arrival_seq)

    def on_add(self, req: "Request", now: float) -> None:
        p = self.programs.setdefault(self.program_of(req), _Program())
        p.live += 1
        p.last_active = max(p.last_active, now)

    def on_tokens(self, req: "Request", num_tokens: int) -> None:
        p = self.programs.get(self.program_of(req))
        if p is None:  # added before this policy saw it (should not happen); start it now
            p = self.programs[self.program_of(req)] = _Program(live=1)
        p.service += num_tokens
        p.last_active = max(p.last_active, self._now)

    def on_step(self, now: float) -> None:
        self._now = now
        if now - self._last_prune >= self.prune_interval_s:
            self._last_prune = now
            self.prune(now)

    def on_finish(self, req: "Request") -> None:
        key = self.program_of(req)
        p = self.programs.get(key)
        if p is None:
            return
        p.live = max(0, p.live - 1)
        p.last_active = max(p.last_active, self._now)
        if p.live == 0 and req.program_id is None:
            del self.programs[key]  # a lone request's program ends with it

    def prune(self, now: float) -> int:
        """Drop programs with no live request that have been idle for idle_ttl_s."""
        stale = [k for k, p in self.programs.items()
                 if p.live == 0 and now - p.last_active >= self.idle_ttl_s]
        for k in stale:
            del self.programs[k]
        return len(stale)

    def __repr__(self) -> str:
        return (f"ProgramLeastAttainedPolicy(aging_rate={self.aging_rate}, "
                f"idle_ttl_s={self.idle_ttl_s})")


# The one place names map to policies.
POLICIES: dict[str, type[SchedulingPolicy]] = {
    "fcfs": FCFSPolicy,
    "priority": PriorityPolicy,
    "plas": ProgramLeastAttainedPolicy,
}
assert tuple(POLICIES) == SCHEDULING_POLICIES


def make_policy(policy: "str | SchedulingPolicy") -> SchedulingPolicy:
    """A fresh policy for a name in POLICIES, or the instance itself."""
    if isinstance(policy, SchedulingPolicy):
        return policy
    try:
        return POLICIES[policy]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown scheduling policy {policy!r} "
                         f"(choose from {', '.join(POLICIES)}, or a SchedulingPolicy)") from None
