"""Per-request timings of a serving benchmark and the statistics computed from them.

Definitions (all client-side, measured at the moment a streamed chunk is read):

* TTFT   time from sending the request to the first chunk that carries output text.
* ITL    gaps between consecutive text-carrying chunks of one request (a chunk that carries
         several tokens counts as one arrival, as a user sees it).
* TPOT   (e2e - TTFT) / (output_tokens - 1): the mean decode time per token after the first;
         undefined for a request with fewer than two output tokens.
* e2e    time from sending the request to the end of its stream.
* Percentiles interpolate linearly between closest ranks (numpy's default "linear" method).
* Throughput divides by the run's duration: first request sent to last request finished.
* Goodput counts the requests that succeeded and met every SLO given, per second.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One streamed call. Times are seconds; `start` is relative to the run's start."""

    program_id: int
    turn: int  # index of the call within its program (0 for single-call datasets)
    start: float = 0.0
    success: bool = False
    error: str = ""
    ttft: float | None = None
    latency: float | None = None  # e2e
    chunk_times: list[float] = field(default_factory=list)  # text-chunk arrivals, from send
    prompt_tokens: int = 0
    output_tokens: int = 0
    expected_output_tokens: int = 0
    token_source: str = "chunks"  # where the counts come from: usage, tokenizer or chunks
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when sent

    @property
    def itl(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def end(self) -> float:
        return self.start + (self.latency or 0.0)

    def to_json(self, with_chunks: bool = False) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        if not with_chunks:
            del d["chunk_times"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> RequestRecord:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100), linear between closest ranks; nan for no values."""
    if not values:
        return math.nan
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    xs = sorted(values)
    rank = p / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(values: list[float], scale: float = 1.0) -> dict:
    """mean, p50/p90/p99, min, max of `values` times `scale` (e.g. 1000 for ms)."""
    v = [x * scale for x in values]
    if not v:
        return {"n": 0, "mean": None, "min": None, "max": None,
                **{f"p{p}": None for p in PERCENTILES}}
    return {"n": len(v), "mean": sum(v) / len(v), "min": min(v), "max": max(v),
            **{f"p{p}": percentile(v, p) for p in PERCENTILES}}


SLO_KEYS = ("ttft", "tpot", "itl", "e2e")


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:100'] -> {'ttft': 500.0, 'tpot': 100.0} (milliseconds).

    `itl` bounds a request's largest inter-chunk gap; `e2e` its whole latency.
    """
    slos: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            key, sep, value = part.partition(":")
            key = key.strip().lower()
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"bad SLO {part!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"bad SLO {part!r}: {value!r} is not a number of milliseconds") from None
            if not ms > 0:
                raise ValueError(f"bad SLO {part!r}: must be > 0 ms")
            slos[key] = ms
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a request succeeded within every SLO (ms). A bound on a quantity the request
    does not have (TPOT or ITL of a one-token reply) does not fail it."""
    if not r.success:
        return False
    measured = {"ttft": r.ttft, "tpot": r.tpot, "itl": max(r.itl, default=None),
                "e2e": r.latency}
    for key, bound in slos.items():
        v = measured[key]
        if v is not None and v * 1000 > bound:
            return False
    return True


def compute_metrics(records: list[RequestRecord], duration: float | None = None,
                    slos: dict[str, float] | None = None) -> dict:
    """The statistics of one run. `duration` defaults to first start -> last end."""
    ok = [r for r in records if r.success]
    if duration is None:
        duration = (max(r.end for r in ok) - min(r.start for r in ok)) if ok else 0.0
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    m = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "request_throughput": per_s(len(ok)),
        "input_throughput": per_s(in_tok),
        "output_throughput": per_s(out_tok),
        "total_token_throughput": per_s(in_tok + out_tok),
        "ttft_ms": summarize([r.ttft for r in ok if r.ttft is not None], 1000),
        "tpot_ms": summarize([t for r in ok if (t := r.tpot) is not None], 1000),
        "itl_ms": summarize([g for r in ok for g in r.itl], 1000),
        "e2e_ms": summarize([r.latency for r in ok if r.latency is not None], 1000),
        "token_sources": dict(Counter(r.token_source for r in ok)),
        "output_tokens_short": sum(1 for r in ok if r.output_tokens < r.expected_output_tokens),
    }
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    if cached:
        m["cached_prompt_tokens"] = sum(cached)
    if slos:
        good = sum(1 for r in records if meets_slos(r, slos))
        m["goodput"] = {"slos_ms": dict(slos), "good_requests": good,
                        "request_goodput": per_s(good),
                        "fraction": good / len(records) if records else 0.0}
    return m


def per_turn_metrics(records: list[RequestRecord]) -> dict[int, dict]:
    """TTFT and e2e by call index within the program (turn of a conversation, call of an agent)."""
    by_turn: dict[int, list[RequestRecord]] = defaultdict(list)
    for r in records:
        if r.success:
            by_turn[r.turn].append(r)
    return {t: {"n": len(rs), "prompt_tokens_mean": sum(r.prompt_tokens for r in rs) / len(rs),
                "ttft_ms": summarize([r.ttft for r in rs if r.ttft is not None], 1000),
                "e2e_ms": summarize([r.latency for r in rs if r.latency is not None], 1000)}
            for t, rs in sorted(by_turn.items())}


def cost_per_million(price_per_hour: float, metrics: dict) -> dict:
    """Dollars per million tokens at a machine price, from a run's throughputs.

    The machine's time is charged three ways: all to output tokens, all to input tokens, and
    to all tokens alike; which one fits depends on what a provider bills.
    """
    def per_m(tok_s: float) -> float | None:
        return price_per_hour / 3600 / tok_s * 1e6 if tok_s > 0 else None

    return {"price_per_hour": price_per_hour,
            "usd_per_m_output_tokens": per_m(metrics["output_throughput"]),
            "usd_per_m_input_tokens": per_m(metrics["input_throughput"]),
            "usd_per_m_total_tokens": per_m(metrics["total_token_throughput"])}
