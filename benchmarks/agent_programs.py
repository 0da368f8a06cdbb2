"""Program-level scheduling and tool-aware KV retention for agent workloads: job completion
time (JCT) of many concurrent simulated agent programs, in-process through AsyncEngine.

Each program is an agent run of 1..50 model calls (heavy-tailed: most short, a few long),
arriving over time (Poisson). Its context is a shared system prompt, a task of its own, then
per call the model's output and a fake tool result; after each call but the last a tool runs
(asyncio.sleep of a seeded latency, tens to hundreds of ms, per tool kind). A program's JCT is
from its arrival to the end of its last call.

Configurations, alternating rounds (A, B, A, B, ...) on the same seeded workload and the same
engine settings (a small max_num_seqs so calls queue; a KV pool too small for every context
in flight so finished calls' blocks are evicted while their tool runs):
  A  plas+retention   --scheduling-policy plas, every call sent with program_id, and the call
                      before a tool call with session_id + kv_retention_s from
                      agents/serving.retention_seconds (the tool's expected latency, an EMA
                      of what was observed, x margin; the tool is the one the call produced,
                      as Continuum sets the TTL once the call's tool call is parsed)
  B  fcfs             --scheduling-policy fcfs, no program_id, no session_id / retention
                      (prefix caching is on in both)

Writes benchmarks/results/agent_programs.json and .png (mean / p99 JCT per program-length
bucket, and the JCT CDF).
Usage: python benchmarks/agent_programs.py [--rounds 2] [--programs 120] [--rate 3] [--configs A B plas]
       python benchmarks/agent_programs.py --replot
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)

TOOLS = {  # kind -> median latency (s); each call's latency is log-normal around it
    "calculator": 0.03,
    "kv_lookup": 0.06,
    "search": 0.20,
    "fetch_page": 0.35,
}
BUCKETS = [(1, 1), (2, 3), (4, 10), (11, 50)]
# name -> (scheduling policy, program_id + session KV retention); A and B are the comparison,
# the other two split A's gain into its parts (--configs).
CONFIGS = {"A": ("plas", True), "B": ("fcfs", False), "plas": ("plas", False), "fcfs+ret": ("fcfs", True)}


@dataclass
class Call:
    max_tokens: int
    tool: str | None  # the tool this call ends with (None: the program's last call)
    tool_latency_s: float
    tool_result: list[int]


@dataclass
class Program:
    pid: int
    arrival_s: float
    task: list[int]
    calls: list[Call] = field(default_factory=list)


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def program_length(rng: random.Random, alpha: float, max_calls: int) -> int:
    """Bounded discrete Pareto: P(L >= k) = k^-alpha for k <= max_calls."""
    return min(max_calls, int(1.0 / (1.0 - rng.random()) ** (1.0 / alpha)))


def build_workload(args, vocab: int) -> tuple[list[int], list[Program]]:
    rng = random.Random(args.seed)
    tok = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    system = tok(args.system_len)
    programs, t = [], 0.0
    for pid in range(args.programs):
        t += rng.expovariate(args.rate)
        p = Program(pid, t, tok(rng.randint(args.task_len // 2, args.task_len)))
        n = program_length(rng, args.alpha, args.max_calls)
        for i in range(n):
            last = i == n - 1
            tool = None if last else rng.choice(sorted(TOOLS))
            latency = 0.0 if last else min(1.0, max(0.01, TOOLS[tool] * rng.lognormvariate(0.0, 0.5)))
            p.calls.append(Call(rng.randint(args.min_output, args.max_output), tool, latency,
                                [] if last else tok(rng.randint(16, 48))))
        programs.append(p)
    return system, programs


async def run_program(engine, p: Program, system: list[int], program_hints: bool, retain: bool,
                      tracker, t0: float, record: dict) -> None:
    from metroline.engine.request import RequestHints, SamplingParams

    await asyncio.sleep(max(0.0, t0 + p.arrival_s - time.perf_counter()))
    ctx = system + p.task
    prompt_tokens = cached_tokens = 0
    for i, call in enumerate(p.calls):
        hints = RequestHints(program_id=f"prog-{p.pid}" if program_hints else None)
        if retain:
            retention = tracker.retention_for(call.tool) if call.tool else 0.0
            hints = RequestHints(program_id=hints.program_id, session_id=f"sess-{p.pid}",
                                 kv_retention_s=retention or None)
        sp = SamplingParams(temperature=0.0, max_tokens=call.max_tokens, ignore_eos=True)
        out_ids: list[int] = []
        final = None
        async for out in engine.generate(list(ctx), sp, request_id=f"p{p.pid}-c{i}", hints=hints):
            out_ids += out.outputs[0].token_ids
            final = out
        prompt_tokens += len(ctx)
        cached_tokens += final.num_cached_tokens
        ctx += out_ids
        if call.tool is not None:
            t_tool = time.perf_counter()
            await asyncio.sleep(call.tool_latency_s)
            tracker.observe(call.tool, time.perf_counter() - t_tool)
            ctx += call.tool_result
    record[p.pid] = {"calls": len(p.calls), "jct_s": time.perf_counter() - (t0 + p.arrival_s),
                     "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
                     "final_context": len(ctx)}


def pctl(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(record: dict) -> dict:
    jcts = [r["jct_s"] for r in record.values()]
    out = {"programs": len(jcts), "mean_jct_s": statistics.fmean(jcts), "p50_jct_s": pctl(jcts, 0.5),
           "p99_jct_s": pctl(jcts, 0.99), "buckets": {}}
    for lo, hi in BUCKETS:
        js = [r["jct_s"] for r in record.values() if lo <= r["calls"] <= hi]
        out["buckets"][bucket_name(lo, hi)] = {"programs": len(js),
                                               "mean_jct_s": statistics.fmean(js) if js else None,
                                               "p99_jct_s": pctl(js, 0.99) if js else None}
    pt = sum(r["prompt_tokens"] for r in record.values())
    out["prompt_token_hit_rate"] = sum(r["cached_tokens"] for r in record.values()) / max(1, pt)
    return out


def run_round(loaded, args, system, programs, config: str) -> dict:
    from metroline.agents.serving import ToolLatencyTracker
    from metroline.config import CacheConfig, SchedulerConfig
    from metroline.engine.async_engine import AsyncEngine
    from metroline.engine.core import EngineCore

    from metroline.engine.policy import ProgramLeastAttainedPolicy

    policy_name, retain = CONFIGS[config]
    plas = policy_name == "plas"
    # A fresh policy object per engine (it keeps per-program state).
    policy = ProgramLeastAttainedPolicy(aging_rate=args.aging_rate) if plas else policy_name
    core = EngineCore(loaded,
                      CacheConfig(num_blocks=args.num_blocks, max_pinned_fraction=args.max_pinned_fraction),
                      SchedulerConfig(max_num_seqs=args.max_num_seqs, policy=policy,
                                      max_num_batched_tokens=args.max_num_batched_tokens))
    engine = AsyncEngine(core)
    # The agent side starts each round knowing nothing about its tools but a 0.2 s prior.
    tracker = ToolLatencyTracker(prior_s=0.2)
    record: dict = {}
    load_before = os.getloadavg()
    s0 = core.get_stats()

    async def main():
        t0 = time.perf_counter() + 0.2
        await asyncio.gather(*(run_program(engine, p, system, plas, retain, tracker, t0, record)
                               for p in programs))
        return time.perf_counter() - t0

    try:
        wall = asyncio.run(main())
    finally:
        s1 = core.get_stats()
        engine.shutdown()
    res = summarize(record)
    q, h = s1.prefix_cache_queries - s0.prefix_cache_queries, s1.prefix_cache_hits - s0.prefix_cache_hits
    res.update({
        "config": config, "wall_s": wall, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "throughput_programs_per_s": len(record) / wall,
        "throughput_output_tok_s": (s1.generation_tokens - s0.generation_tokens) / wall,
        "prompt_tokens_computed": s1.prompt_tokens - s0.prompt_tokens,
        "prefix_cache_hit_rate": h / q if q else 0.0,
        "preemptions": s1.num_preemptions - s0.num_preemptions,
        "steps": s1.steps - s0.steps,
        "pinned_blocks_at_end": s1.pinned_blocks,
        "tool_latency_estimates_s": {t: tracker.expected(t) for t in TOOLS} if retain else None,
        "per_program": {str(k): v for k, v in sorted(record.items())},
    })
    return res


def isolated_bound(loaded, args, system, programs) -> dict:
    """The JCT each program would have alone on the engine (no other program, no queue): its
    tool pauses plus, per call, the prefill of the tokens new since its previous call and the
    decode of its output at single-stream speed, both measured here first. No scheduler can
    beat this, so B's mean JCT over this bound's mean is the most any policy could gain on this
    workload (the critical path of a long program is mostly its own decoding)."""
    from metroline.config import CacheConfig, SchedulerConfig
    from metroline.engine.async_engine import AsyncEngine
    from metroline.engine.core import EngineCore
    from metroline.engine.request import SamplingParams

    core = EngineCore(loaded, CacheConfig(num_blocks=args.num_blocks),
                      SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                      max_num_batched_tokens=args.max_num_batched_tokens))
    engine = AsyncEngine(core)
    rng = random.Random(1)

    async def timed(prompt, n):
        t0 = time.perf_counter()
        first = None
        async for _ in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                                       request_id=f"cal{rng.random()}"):
            first = first or time.perf_counter()
        return first - t0, time.perf_counter() - first

    async def calibrate():
        await timed([rng.randrange(100, 40000) for _ in range(64)], 4)  # warm-up
        pre, dec = [], []
        for _ in range(3):
            ttft, rest = await timed([rng.randrange(100, 40000) for _ in range(256)], 33)
            pre.append(ttft / 256)
            dec.append(rest / 32)
        return statistics.median(pre), statistics.median(dec)

    try:
        per_prefill, per_decode = asyncio.run(calibrate())
    finally:
        engine.shutdown()
    jct = {}
    for p in programs:
        t, new = 0.0, len(system) + len(p.task)
        for c in p.calls:
            t += new * per_prefill + c.max_tokens * per_decode + c.tool_latency_s
            new = c.max_tokens + len(c.tool_result)
        jct[p.pid] = t
    out = {"prefill_s_per_token": per_prefill, "decode_s_per_token": per_decode,
           "mean_jct_s": statistics.fmean(jct.values()), "buckets": {}}
    for lo, hi in BUCKETS:
        js = [jct[p.pid] for p in programs if lo <= len(p.calls) <= hi]
        out["buckets"][bucket_name(lo, hi)] = statistics.fmean(js) if js else None
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"A": "A: PLAS + KV retention", "B": "B: FCFS, no retention"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    ax = axes[0]
    buckets = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    width = 0.2
    for j, cfg in enumerate(("A", "B")):
        rounds = [r for r in result["rounds"] if r["config"] == cfg]
        for k, stat in enumerate(("mean_jct_s", "p99_jct_s")):
            vals = [statistics.fmean([r["buckets"][b][stat] for r in rounds if r["buckets"][b][stat] is not None] or [0])
                    for b in buckets]
            xs = [i + (2 * j + k - 1.5) * width for i in range(len(buckets))]
            ax.bar(xs, vals, width, label=f"{names[cfg]} ({'mean' if k == 0 else 'p99'})",
                   color=("tab:blue", "tab:orange")[j], alpha=(1.0, 0.5)[k])
    bound = result.get("isolated_bound")
    if bound:
        ax.scatter(range(len(buckets)), [bound["buckets"][b] or 0 for b in buckets], marker="_", s=900,
                   color="black", zorder=3, label="alone on the engine (no queue): the floor")
    counts = [result["rounds"][0]["buckets"][b]["programs"] for b in buckets]
    ax.set_xticks(range(len(buckets)), [f"{b} calls\n({n} programs)" for b, n in zip(buckets, counts)])
    ax.set_yscale("log")
    ax.set_ylabel("job completion time (s)")
    s = result["summary"]
    ax.set_title(f"JCT by program length; mean B/A = {s['mean_jct_ratio_b_over_a']:.2f}x, "
                 f"p99 B/A = {s['p99_jct_ratio_b_over_a']:.2f}x")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax = axes[1]
    for cfg, color in (("A", "tab:blue"), ("B", "tab:orange")):
        for i, r in enumerate(rr for rr in result["rounds"] if rr["config"] == cfg):
            js = sorted(p["jct_s"] for p in r["per_program"].values())
            ax.plot(js, [(k + 1) / len(js) for k in range(len(js))], color=color, alpha=0.8,
                    linestyle=("-", "--", ":")[i % 3], label=f"{names[cfg]}, round {i + 1}")
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("fraction of programs")
    m = result["machine"]
    ax.set_title(f"JCT CDF ({m['cpu'][:40]}, {m['cores']} cores)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per configuration (A, B alternate)")
    ap.add_argument("--programs", type=int, default=120)
    ap.add_argument("--rate", type=float, default=3.0, help="program arrivals per second (Poisson)")
    ap.add_argument("--alpha", type=float, default=1.1, help="Pareto shape of program length")
    ap.add_argument("--max-calls", type=int, default=50)
    ap.add_argument("--system-len", type=int, default=64)
    ap.add_argument("--task-len", type=int, default=160)
    ap.add_argument("--min-output", type=int, default=16)
    ap.add_argument("--max-output", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--num-blocks", type=int, default=512, help="KV pool (blocks of 16 tokens)")
    ap.add_argument("--max-pinned-fraction", type=float, default=0.5)
    ap.add_argument("--aging-rate", type=float, default=100.0,
                    help="PLAS aging: tokens of attained service forgiven per second waited")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", nargs="+", default=["A", "B"], choices=list(CONFIGS),
                    help="configurations per round, in order (A and B are needed for the summary)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(RESULTS, "agent_programs.json"))
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args(argv)
    png = os.path.splitext(args.output)[0] + ".png"
    if args.replot:
        with open(args.output) as f:
            plot(json.load(f), png)
        return 0

    import torch

    from decode_vs_llamacpp import cpu_summary
    from metroline.model.default import default_model_path
    from metroline.model.loader import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(default_model_path(), show_progress=False)
    system, programs = build_workload(args, loaded.config.vocab_size)
    lengths = [len(p.calls) for p in programs]
    max_ctx = max(len(system) + len(p.task) + sum(c.max_tokens + len(c.tool_result) for c in p.calls)
                  for p in programs)
    print(f"longest context {max_ctx} tokens; KV pool {args.num_blocks * 16} tokens", flush=True)
    print(f"{len(programs)} programs over {programs[-1].arrival_s:.0f} s, {sum(lengths)} calls, "
          f"lengths: " + ", ".join(f"{bucket_name(lo, hi)}: {sum(lo <= n <= hi for n in lengths)}"
                                   for lo, hi in BUCKETS), flush=True)
    bound = isolated_bound(loaded, args, system, programs)
    print(f"alone on the engine (no queue): mean JCT {bound['mean_jct_s']:.2f} s "
          f"({bound['prefill_s_per_token'] * 1e3:.2f} ms/prefill token, "
          f"{bound['decode_s_per_token'] * 1e3:.1f} ms/decoded token)", flush=True)
    rounds = []
    for r in range(args.rounds):
        for cfg in args.configs:
            res = run_round(loaded, args, system, programs, cfg)
            rounds.append(res)
            print(f"round {r + 1} {cfg}: mean JCT {res['mean_jct_s']:.2f} s, p99 {res['p99_jct_s']:.2f} s, "
                  f"wall {res['wall_s']:.0f} s, {res['throughput_output_tok_s']:.0f} tok/s, "
                  f"prefix hit {res['prefix_cache_hit_rate']:.2f} (prompt tokens "
                  f"{res['prompt_token_hit_rate']:.2f}), computed {res['prompt_tokens_computed']} prompt tokens, "
                  f"{res['preemptions']} preemptions, load {res['load_avg_before'][0]:.2f}", flush=True)

    def mean_of(cfg, key):
        return statistics.fmean(r[key] for r in rounds if r["config"] == cfg)

    summary = {}
    for cfg in dict.fromkeys(args.configs):
        summary[cfg] = {k: mean_of(cfg, k) for k in ("mean_jct_s", "p50_jct_s", "p99_jct_s", "wall_s",
                                                      "throughput_programs_per_s", "throughput_output_tok_s",
                                                      "prefix_cache_hit_rate", "prompt_token_hit_rate",
                                                      "prompt_tokens_computed", "preemptions")}
        summary[cfg]["buckets"] = {
            bucket_name(lo, hi): {stat: statistics.fmean(r["buckets"][bucket_name(lo, hi)][stat] for r in rounds
                                                         if r["config"] == cfg)
                                  if rounds[0]["buckets"][bucket_name(lo, hi)]["programs"] else None
                                  for stat in ("mean_jct_s", "p99_jct_s")}
            for lo, hi in BUCKETS}
    if "A" in summary and "B" in summary:
        summary["mean_jct_ratio_b_over_a"] = summary["B"]["mean_jct_s"] / summary["A"]["mean_jct_s"]
        summary["p99_jct_ratio_b_over_a"] = summary["B"]["p99_jct_s"] / summary["A"]["p99_jct_s"]
        summary["bucket_mean_jct_ratio_b_over_a"] = {
            b: (v["mean_jct_s"] / summary["A"]["buckets"][b]["mean_jct_s"]) if v["mean_jct_s"] else None
            for b, v in summary["B"]["buckets"].items()}
        print(f"B/A: mean JCT {summary['mean_jct_ratio_b_over_a']:.2f}x, p99 {summary['p99_jct_ratio_b_over_a']:.2f}x; "
              "per bucket " + ", ".join(f"{b}: {v:.2f}x" for b, v in summary["bucket_mean_jct_ratio_b_over_a"].items()
                                        if v), flush=True)
    result = {"args": vars(args), "machine": cpu_summary(), "model": os.path.basename(default_model_path()),
              "workload": {"programs": len(programs), "calls": sum(lengths),
                           "arrival_span_s": programs[-1].arrival_s,
                           "lengths": {bucket_name(lo, hi): sum(lo <= n <= hi for n in lengths) for lo, hi in BUCKETS},
                           "tools_median_latency_s": TOOLS},
              "isolated_bound": bound, "summary": summary, "rounds": rounds}
    if "B" in summary:
        summary["headroom_b_over_isolated"] = summary["B"]["mean_jct_s"] / bound["mean_jct_s"]
        print(f"B's mean JCT is {summary['headroom_b_over_isolated']:.2f}x the isolated bound: the most any "
              "policy could gain here", flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    if "mean_jct_ratio_b_over_a" in summary:
        plot(result, png)
    print(f"wrote {args.output} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
