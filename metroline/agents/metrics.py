"""Prometheus metrics of the agent runtime: runs active, steps, tool latency, guard trips by
kind, job completion time. Registered on the registry the caller gives (the server's), so one
/metrics endpoint shows them beside the engine's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AgentMetrics"]

_TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active = Gauge("metroline_agent_runs_active", "Agent runs in progress.", registry=r)
        self.runs = Counter("metroline_agent_runs", "Agent runs that ended, by status.", ["status"], registry=r)
        self.steps = Counter("metroline_agent_steps", "Agent steps, by kind.", ["kind"], registry=r)
        self.tool_latency = Histogram("metroline_agent_tool_latency_seconds", "Tool call latency.",
                                      ["tool"], buckets=_TOOL_BUCKETS, registry=r)
        self.tool_errors = Counter("metroline_agent_tool_errors", "Tool calls that failed.", ["tool"], registry=r)
        self.guard_trips = Counter("metroline_agent_guard_trips", "Guards that refused a call or ended a run, "
                                   "by kind.", ["guard"], registry=r)
        self.jct = Histogram("metroline_agent_job_completion_seconds", "Agent run duration, start to end.",
                             buckets=_JOB_BUCKETS, registry=r)

    def run_started(self) -> None:
        self.active.inc()

    def run_ended(self, status: str, seconds: float, finished: bool = True) -> None:
        self.active.dec()
        if finished:
            self.runs.labels(status).inc()
            self.jct.observe(seconds)

    def step(self, kind: str) -> None:
        self.steps.labels(kind).inc()

    def tool_call(self, tool: str, seconds: float, ok: bool) -> None:
        self.steps.labels("tool_call").inc()
        self.tool_latency.labels(tool).observe(seconds)
        if not ok:
            self.tool_errors.labels(tool).inc()

    def guard_trip(self, guard: str) -> None:
        self.guard_trips.labels(guard).inc()
