"""`metroline bench serve`: drive an OpenAI-compatible server with a workload and measure it.

Programs (see workloads.py) start at the arrival times (all at once, or Poisson at
`request_rate`); at most `max_concurrency` programs are active at a time, and the calls of a
program run one after another, each appending to its history. A sweep runs the whole
workload once per concurrency (or rate) value and keeps every run in one result file.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from metroline.bench.metrics import (RequestRecord, compute_metrics, cost_per_million,
                                     per_turn_metrics)
from metroline.bench.workloads import Program

if TYPE_CHECKING:  # the client needs httpx (the [bench] extra); reading results does not
    from metroline.bench.client import StreamingClient

RESULT_KIND = "metroline-bench-serve"
RESULT_VERSION = 1


@dataclass
class RunConfig:
    max_concurrency: int | None = None  # None: unbounded
    request_rate: float = math.inf  # programs per second (Poisson); inf: all at once
    seed: int = 0
    fresh_prefix: bool = True  # a per-run nonce before each program's first message
    progress: bool = True
    desc: str = ""


@dataclass
class RunResult:
    config: RunConfig
    records: list[RequestRecord]
    duration: float
    load_avg: dict = field(default_factory=dict)


def host_info() -> dict:
    from metroline.bench.hardware import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# Common words that are one token each in most vocabularies: a nonce of two costs ~2 tokens.
_NONCE_WORDS = ("apple river stone cloud green table music paper light water house tree bird "
                "blue north night chair bread sugar glass field metal ocean horse smile world "
                "garden winter summer silver orange yellow purple forest island bridge market "
                "window letter planet rocket engine signal circle square copper marble "
                "rabbit tiger eagle salmon pepper ginger cotton velvet maple cedar lemon olive "
                "violet amber coral ivory pearl").split()


def run_nonce() -> str:
    """A few words that start every program's first message in one run, so that a later run
    of the same prompts cannot hit the prefix cache an earlier run filled."""
    rng = random.Random(time.time_ns())
    return " ".join(rng.choice(_NONCE_WORDS) for _ in range(3)) + ": "


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Start times (s) of n programs: 0 for all when rate is infinite, else a Poisson process."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("request rate must be > 0")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_programs(client: StreamingClient, programs: list[Program], cfg: RunConfig) -> RunResult:
    """Run every program once; returns one record per call (calls after a failed one in the
    same program are recorded as failed without being sent)."""
    records: list[RequestRecord] = []
    nonce = run_nonce() if cfg.fresh_prefix else ""
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = _progress(sum(len(p.calls) for p in programs), cfg)
    t_start = time.perf_counter()
    loads = {"start": load_avg()}

    async def one(prog: Program) -> None:
        messages: list[dict] = []
        history_tokens = 0
        if prog.system is not None:
            messages.append({"role": "system", "content": nonce + prog.system})
            history_tokens += prog.system_tokens
        failed = False
        for k, call in enumerate(prog.calls):
            rec = RequestRecord(prog.id, k)
            records.append(rec)
            if failed:
                rec.error = "not sent: an earlier call of the program failed"
                bar.update(1)
                continue
            if call.pause_s > 0:
                await asyncio.sleep(call.pause_s)
            content = nonce + call.content if not messages else call.content
            messages.append({"role": call.role, "content": content})
            history_tokens += call.content_tokens
            rec.prompt_tokens = history_tokens  # replaced by the server's count when it sends usage
            rec.start = time.perf_counter() - t_start
            text = await client.call(messages, call.max_tokens, rec,
                                     session_id=f"bench-{id(messages)}-{prog.id}")
            bar.update(1)
            if not rec.success:
                failed = True
                continue
            messages.append({"role": "assistant", "content": text})
            history_tokens += rec.output_tokens

    async def gated(prog: Program, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay - (time.perf_counter() - t_start))
        if sem is None:
            await one(prog)
        else:
            async with sem:
                await one(prog)

    offsets = arrival_offsets(len(programs), cfg.request_rate, cfg.seed)
    try:
        await asyncio.gather(*(gated(p, d) for p, d in zip(programs, offsets)))
    finally:
        bar.close()
    ends = [r.end for r in records if r.success]
    duration = (max(ends) if ends else time.perf_counter() - t_start)
    loads["end"] = load_avg()
    records.sort(key=lambda r: (r.program_id, r.turn))
    return RunResult(cfg, records, duration, loads)


def _progress(total: int, cfg: RunConfig):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=cfg.desc or "requests", unit="req", disable=not cfg.progress,
                file=sys.stderr, dynamic_ncols=True, leave=True)


async def warmup(client: StreamingClient, programs: list[Program], n: int) -> list[str]:
    """`n` short calls before measuring; returns their errors (empty when all succeeded)."""
    errors = []
    for i in range(n):
        prog = programs[i % len(programs)]
        messages = ([{"role": "system", "content": "[warmup] " + prog.system}] if prog.system else []) + \
            [{"role": "user", "content": "[warmup] " + prog.calls[0].content}]
        rec = RequestRecord(-1, 0)
        await client.call(messages, min(8, prog.calls[0].max_tokens), rec)
        if not rec.success:
            errors.append(rec.error)
    return errors


def run_summary(run: RunResult, slos: dict | None, price_per_hour: float | None,
                with_chunks: bool = False) -> dict:
    m = compute_metrics(run.records, run.duration, slos)
    out = {"max_concurrency": run.config.max_concurrency,
           "request_rate": None if math.isinf(run.config.request_rate) else run.config.request_rate,
           "load_avg": run.load_avg, "metrics": m}
    if price_per_hour is not None:
        out["cost"] = cost_per_million(price_per_hour, m)
    if any(r.turn > 0 for r in run.records):
        out["per_turn"] = {str(k): v for k, v in per_turn_metrics(run.records).items()}
    out["requests"] = [r.to_json(with_chunks) for r in run.records]
    return out


def sweep_points(concurrency: list[int | None], rates: list[float]) -> list[tuple[int | None, float]]:
    if len(concurrency) > 1 and len(rates) > 1:
        raise ValueError("sweep either --max-concurrency or --request-rate, not both")
    return [(c, r) for c in concurrency for r in rates]


async def bench(client: StreamingClient, programs: list[Program], points, *, seed: int = 0,
                warmup_calls: int = 1, fresh_prefix: bool = True, progress: bool = True,
                slos: dict | None = None, price_per_hour: float | None = None,
                with_chunks: bool = False, on_run=None) -> list[dict]:
    """Warm up, then run the workload at every (max_concurrency, request_rate) point."""
    try:
        if warmup_calls:
            errors = await warmup(client, programs, warmup_calls)
            if errors:
                raise RuntimeError(f"warm-up call failed: {errors[0]}")
        runs = []
        for conc, rate in points:
            desc = f"concurrency {conc or 'inf'}" + ("" if math.isinf(rate) else f", rate {rate:g}/s")
            cfg = RunConfig(conc, rate, seed, fresh_prefix, progress, desc)
            result = await run_programs(client, programs, cfg)
            summary = run_summary(result, slos, price_per_hour, with_chunks)
            runs.append(summary)
            if on_run:
                on_run(summary)
        return runs
    finally:
        await client.aclose()


def format_run(run: dict) -> str:
    m = run["metrics"]
    lines = [f"--- max_concurrency={run['max_concurrency'] or 'inf'}"
             f" request_rate={run['request_rate'] or 'inf'}"
             f" load_avg={run['load_avg'].get('start')}",
             f"  completed {m['completed']}  failed {m['failed']}  duration {m['duration_s']:.2f} s",
             f"  request throughput {m['request_throughput']:.3f} req/s   output {m['output_throughput']:.1f} tok/s"
             f"   total {m['total_token_throughput']:.1f} tok/s",
             f"  {'':6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}  (ms)"]
    for key in ("ttft", "tpot", "itl", "e2e"):
        s = m[f"{key}_ms"]
        if s["n"]:
            lines.append(f"  {key.upper():6} {s['mean']:9.1f} {s['p50']:9.1f} {s['p90']:9.1f} {s['p99']:9.1f}")
    if "goodput" in m:
        g = m["goodput"]
        lines.append(f"  goodput {g['request_goodput']:.3f} req/s ({g['fraction']:.0%} of requests within "
                     + ", ".join(f"{k}<={v:g}ms" for k, v in g["slos_ms"].items()) + ")")
    if "cost" in run and run["cost"]["usd_per_m_output_tokens"] is not None:
        c = run["cost"]
        inp = c["usd_per_m_input_tokens"]
        lines.append(f"  cost at ${c['price_per_hour']:g}/h: ${c['usd_per_m_output_tokens']:.3f} per M output tokens, "
                     + (f"${inp:.3f}" if inp is not None else "-")
                     + " per M input tokens (all machine time charged to each)")
    if m["output_tokens_short"]:
        lines.append(f"  note: {m['output_tokens_short']} requests returned fewer tokens than asked "
                     "(the server ended them early: EOS or stop)")
    if "per_turn" in run:
        lines.append("  TTFT by call index (p50 ms): " + "  ".join(
            f"{k}:{v['ttft_ms']['p50']:.0f}" for k, v in run["per_turn"].items()))
    return "\n".join(lines)


def dumps_result(result: dict) -> str:
    """JSON with the summaries indented and each request on one line (readable, diffable)."""
    runs = result.get("runs", [])
    head = {k: v for k, v in result.items() if k != "runs"}
    parts = []
    for run in runs:
        body = json.dumps({k: v for k, v in run.items() if k != "requests"}, indent=1)
        reqs = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in run.get("requests", []))
        parts.append(body[:-2] + ',\n "requests": [\n' + reqs + "\n ]\n}")
    text = json.dumps(head, indent=1)
    return text[:-2] + ',\n "runs": [\n' + ",\n".join(parts) + "\n ]\n}\n"


def write_result(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(dumps_result(result))
    os.replace(tmp, path)


def load_result(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    if res.get("kind") != RESULT_KIND:
        raise ValueError(f"{path} is not a `metroline bench serve` result")
    return res
