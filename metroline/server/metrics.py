"""Prometheus metrics of one server: engine gauges and counters read at scrape time, latency
histograms observed by the server as requests stream.

Each app has its own CollectorRegistry (no global state), so several servers can live in one
process (the tests run a few).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0, 160.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0)


class _EngineCollector:
    """Reads the engine's snapshot on every scrape (the engine keeps the counts itself)."""

    def __init__(self, stats: Callable[[], object], server_gauges: Callable[[], dict], model: str,
                 replicas: Callable[[], dict] | None = None, routing: Callable[[], dict] | None = None):
        self._stats, self._server, self._model = stats, server_gauges, model
        self._replicas, self._routing = replicas, routing

    def collect(self):
        s, srv, labels = self._stats(), self._server(), [self._model]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"metroline_{name}", doc, labels=["model_name"])
            g.add_metric(labels, float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"metroline_{name}", doc, labels=["model_name"])
            c.add_metric(labels, float(value))
            return c

        yield gauge("num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                    s.kv_cache_usage)
        yield gauge("kv_cache_num_blocks", "KV cache blocks in the pool.", s.num_blocks)
        yield counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).",
                      s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("num_preemptions", "Preemptions (a running request's KV dropped).",
                      s.num_preemptions)
        yield counter("prefix_cache_queries", "Tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Tokens found in the prefix cache.",
                      s.prefix_cache_hits)
        yield counter("engine_steps", "Engine steps that ran the model.", s.steps)
        yield gauge("kv_cache_pinned_blocks", "KV blocks retained for sessions.", s.pinned_blocks)
        yield gauge("kv_cache_pinned_sessions", "Sessions whose KV is retained.", s.pinned_sessions)
        yield counter("kv_host_tier_hits", "Prompt tokens restored from the host KV tier.",
                      s.host_tier_hits)
        yield counter("kv_cache_evictions", "Cached KV blocks evicted for reuse.", s.kv_evictions)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens verified (speculative decoding).",
                      s.spec_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                      s.spec_accepted_tokens)
        yield counter("spec_decode_num_verifications", "Request-steps that verified drafts.",
                      s.spec_verifications)
        yield gauge("spec_decode_acceptance_rate", "Accepted / drafted tokens since start.",
                    s.spec_accepted_tokens / s.spec_draft_tokens if s.spec_draft_tokens else 0.0)
        yield gauge("spec_decode_mean_accepted_length",
                    "Tokens per verifying step (accepted drafts + the model's own token).",
                    (s.spec_accepted_tokens + s.spec_verifications) / s.spec_verifications
                    if s.spec_verifications else 0.0)
        yield counter("grammar_fast_forward_tokens",
                      "Tokens a grammar forced, appended without a decode step each.",
                      s.fast_forward_tokens)
        if self._replicas is not None:
            yield from self._per_replica(self._replicas())
        if self._routing is not None:
            c = CounterMetricFamily("metroline_routing_decisions", "Requests routed to a replica, by why "
                                    "that one: session, prefix (longest cached), least_loaded, round_robin.",
                                    labels=["model_name", "reason"])
            for reason, n in sorted(self._routing().items()):
                c.add_metric([self._model, reason], float(n))
            yield c
        yield gauge("engine_alive", "1 while the engine loop runs.", srv["engine_alive"])
        yield gauge("server_draining", "1 while the server drains before shutdown.",
                    srv["draining"])
        yield gauge("http_requests_in_flight", "Generation requests being served over HTTP.",
                    srv["in_flight"])

    _PER_REPLICA = (("num_requests_running", "gauge", "num_running"),
                    ("num_requests_waiting", "gauge", "num_waiting"),
                    ("kv_cache_usage_perc", "gauge", "kv_cache_usage"),
                    ("prompt_tokens", "counter", "prompt_tokens"),
                    ("generation_tokens", "counter", "generation_tokens"),
                    ("prefix_cache_queries", "counter", "prefix_cache_queries"),
                    ("prefix_cache_hits", "counter", "prefix_cache_hits"))

    def _per_replica(self, replicas: dict):
        """With engine replicas behind the server (Ray Serve): the totals above are theirs
        summed, and these series give each replica's own, labelled by its id."""
        n = GaugeMetricFamily("metroline_replicas", "Engine replicas reporting.", labels=["model_name"])
        n.add_metric([self._model], float(len(replicas)))
        yield n
        for name, kind, field in self._PER_REPLICA:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            m = family(f"metroline_replica_{name}", f"Per replica: {field}.",
                       labels=["model_name", "replica"])
            for replica, s in sorted(replicas.items()):
                m.add_metric([self._model, replica], float(getattr(s, field)))
            yield m


class ServerMetrics:
    def __init__(self, stats: Callable[[], object], server_gauges: Callable[[], dict], model: str,
                 replicas: Callable[[], dict] | None = None, routing: Callable[[], dict] | None = None):
        self.model = model
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, server_gauges, model, replicas, routing))
        kw = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("metroline_time_to_first_token_seconds",
                              "Time from the HTTP request to its first generated token.",
                              buckets=_TTFT_BUCKETS, **kw).labels(model)
        self.tpot = Histogram("metroline_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              buckets=_TPOT_BUCKETS, **kw).labels(model)
        self.e2e = Histogram("metroline_e2e_request_latency_seconds",
                             "Time from the HTTP request to its last token.",
                             buckets=_E2E_BUCKETS, **kw).labels(model)
        self._success = Counter("metroline_request_success", "Engine requests that finished.",
                                labelnames=["model_name", "finish_reason"], registry=self.registry)
        self._errors = Counter("metroline_request_errors",
                               "Generation requests answered with an error, by error code.",
                               labelnames=["model_name", "code"], registry=self.registry)

    def observe_finished(self, finish_reasons: list[str], arrival: float,
                         first_token: float | None, end: float, tokens_per_sample: float) -> None:
        """One engine request (n samples) finished: e2e and TPOT, and a count per sample."""
        for reason in finish_reasons:
            self._success.labels(self.model, reason).inc()
        self.e2e.observe(end - arrival)
        if first_token is not None and tokens_per_sample > 1:
            self.tpot.observe((end - first_token) / (tokens_per_sample - 1))

    def count_error(self, code: str | None) -> None:
        self._errors.labels(self.model, code or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
