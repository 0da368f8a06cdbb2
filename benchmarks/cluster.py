"""Scale-out on Ray Serve on this machine: 1 vs 2 engine replicas, and KV-aware routing vs
round-robin, replayed over HTTP with `metroline bench serve`.

Configurations, one server at a time on loopback, each started fresh per round, rounds
alternating (A, B, C, D, A, B, C, D); all of them get the machine's 2 cores:
  one-engine     `metroline serve --threads 2` (no Ray): the reference
  replicas-1     `--replicas 1 --replica-cpus 2`: the same engine behind Serve's proxy and the
                 ingress (what the extra hops cost)
  replicas-2     `--replicas 2 --replica-cpus 1`: two engines of one thread each, KV-aware
                 routing (session, longest cached prefix, least loaded)
  replicas-2-rr  the same, `--routing round_robin`

Workloads: ShareGPT first turns (throughput and latency: one-engine, replicas-1, replicas-2),
and whole ShareGPT conversations, every turn resending the history (multiturn: replicas-2 vs
replicas-2-rr, and one-engine, whose one cache sees every turn: the hit rate a router can at
best get back; prefix-cache hit rate from usage.cached_tokens, TTFT per turn).

Each run reports the fraction of the machine's memory bandwidth its decode reached (the
roofline of `metroline bench roofline`, measured here before any server starts) and $ per
million tokens at --price-per-hour. Writes benchmarks/results/cluster.json and cluster.png.
Usage: python benchmarks/cluster.py [--rounds 2] [--prompts 32] [--conversations 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import httpx
from serve_vs_llamacpp import PY, RESULTS, Server, free_port, wait_for_quiet

CONFIGS = {
    "one-engine": ["--threads", "2"],
    "replicas-1": ["--replicas", "1", "--replica-cpus", "2"],
    "replicas-2": ["--replicas", "2", "--replica-cpus", "1"],
    "replicas-2-rr": ["--replicas", "2", "--replica-cpus", "1", "--routing", "round_robin"],
}
WORKLOADS = {"sharegpt": ("one-engine", "replicas-1", "replicas-2"),
             "multiturn": ("one-engine", "replicas-2", "replicas-2-rr")}


def scrape(url: str) -> dict:
    """The engine totals, per-replica prompt tokens and routing decisions from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict = {"replica_prompt_tokens": {}, "routing": {}}
    for line in text.splitlines():
        m = re.match(r'^metroline_(prefix_cache_hits|prefix_cache_queries|prompt_tokens|generation_tokens)'
                     r'_total\{[^}]*\} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
        m = re.match(r'^metroline_replica_prompt_tokens_total\{.*replica="([^"]+)".*\} (\S+)$', line)
        if m:
            out["replica_prompt_tokens"][m.group(1)] = float(m.group(2))
        m = re.match(r'^metroline_routing_decisions_total\{.*reason="([^"]+)".*\} (\S+)$', line)
        if m:
            out["routing"][m.group(1)] = float(m.group(2))
    return out


def delta(after: dict, before: dict) -> dict:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in
         ("prefix_cache_hits", "prefix_cache_queries", "prompt_tokens", "generation_tokens")}
    d["replica_prompt_tokens"] = {r: v - before["replica_prompt_tokens"].get(r, 0)
                                  for r, v in after["replica_prompt_tokens"].items()}
    d["routing"] = {r: v - before["routing"].get(r, 0) for r, v in after["routing"].items()}
    return d


def bench(url: str, label: str, workload: str, out: str, args) -> dict:
    cmd = [PY, "-m", "metroline.cli", "bench", "serve", "--base-url", url, "--label", label,
           "--dataset", workload, "--seed", str(args.seed), "--disable-tqdm", "--no-save-chunks",
           "--no-plots", "--output", out, "--price-per-hour", str(args.price_per_hour)]
    if workload == "sharegpt":
        cmd += ["--num-prompts", str(args.prompts), "--max-concurrency", str(args.concurrency),
                "--max-output-len", str(args.output_len), "--max-input-len", "512"]
    else:
        cmd += ["--num-prompts", str(args.conversations), "--max-concurrency", str(args.mt_concurrency),
                "--max-turns", str(args.turns), "--min-turns", str(args.turns),
                "--max-user-len", "128", "--max-output-len", str(args.mt_output_len)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def summarize(result: dict, metrics: dict, roof: dict) -> dict:
    from metroline.bench.roofline import achieved, model_shape

    run = result["runs"][0]
    m = run["metrics"]
    rows = achieved(result, model_shape(None), "file", roof["bandwidth"], roof["flops"])
    per_turn = {int(k): v["ttft_ms"]["p50"] for k, v in (run.get("per_turn") or {}).items()}
    return {"completed": m["completed"], "failed": m["failed"],
            "output_tok_s": m["output_throughput"], "total_tok_s": m["total_token_throughput"],
            "request_per_s": m["request_throughput"],
            "ttft_p50_ms": m["ttft_ms"]["p50"], "ttft_p90_ms": m["ttft_ms"]["p90"],
            "tpot_p50_ms": m["tpot_ms"]["p50"], "e2e_p50_ms": m["e2e_ms"]["p50"],
            "cache_hit_rate": m.get("cached_prompt_tokens", 0) / m["input_tokens"] if m["input_tokens"] else 0.0,
            "ttft_p50_ms_per_turn": per_turn,
            "bandwidth_fraction": rows[0]["fraction"] if rows else None,
            "usd_per_m_output_tokens": (run.get("cost") or {}).get("usd_per_m_output_tokens"),
            "load_avg": run.get("load_avg"), "server": metrics}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sg = summary["mean"]["sharegpt"]
    names = list(sg)
    for ax, key, ylabel, title in ((axes[0], "output_tok_s", "output tok/s (mean of rounds)",
                                    f"ShareGPT, {summary['args']['concurrency']} streams"),
                                   (axes[1], "ttft_p50_ms", "TTFT p50 (ms)", "ShareGPT TTFT")):
        ax.bar(names, [sg[n][key] for n in names], color=["#777", "#4a7", "#37b"][:len(names)])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    mt = summary["mean"]["multiturn"]
    ax = axes[2]
    labels = {"replicas-2": "2 replicas, kv routing", "replicas-2-rr": "2 replicas, round robin",
              "one-engine": "one engine (no Ray)"}
    for name, style in (("replicas-2", "-o"), ("replicas-2-rr", "--s"), ("one-engine", ":^")):
        turns = mt[name]["ttft_p50_ms_per_turn"]
        ks = sorted(turns)
        ax.plot(ks, [turns[k] for k in ks], style,
                label=f"{labels[name]} (hit rate {mt[name]['cache_hit_rate']:.0%})")
    ax.set_xlabel("conversation turn")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("multiturn (whole conversations)")
    ax.set_xticks(sorted(mt["replicas-2"]["ttft_p50_ms_per_turn"]))
    ax.legend()
    fig.suptitle(f"metroline on Ray Serve, {summary['machine'].get('cpu', '')} "
                 f"(load {summary['load_start']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--mt-concurrency", type=int, default=4)
    ap.add_argument("--mt-output-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--price-per-hour", type=float, default=0.10, help="machine price, $/h")
    ap.add_argument("--max-load", type=float, default=1.0)
    args = ap.parse_args()

    from metroline.bench.roofline import measure

    quiet = wait_for_quiet(args.max_load, 300)
    bandwidth, flops, machine = measure()
    roof = {"bandwidth": bandwidth, "flops": flops}
    rounds = []
    for k in range(args.rounds):
        this: dict = {w: {} for w in WORKLOADS}
        for name, flags in CONFIGS.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [PY, "-m", "metroline.cli", "serve", "--port", str(port), "--no-access-log", *flags]
            server = Server(name, cmd, port, f"/tmp/cluster_{name}.log")
            try:
                for workload, configs in WORKLOADS.items():
                    if name not in configs:
                        continue
                    before = scrape(url)
                    out = os.path.join(RESULTS, f"cluster_{name}_{workload}.json")
                    result = bench(url, name, workload, out, args)
                    time.sleep(2.5)  # replicas report every second: let the counters settle
                    this[workload][name] = summarize(result, delta(scrape(url), before), roof)
                    s = this[workload][name]
                    print(f"round {k} {workload:9s} {name:13s} {s['output_tok_s']:6.1f} tok/s  "
                          f"TTFT p50 {s['ttft_p50_ms']:7.0f} ms  hit {s['cache_hit_rate']:.0%}  "
                          f"failed {s['failed']}  load {os.getloadavg()[0]:.2f}", file=sys.stderr)
            finally:
                server.stop()
                time.sleep(3)
        rounds.append(this)

    means: dict = {}
    for workload, configs in WORKLOADS.items():
        means[workload] = {}
        for name in configs:
            runs = [r[workload][name] for r in rounds]
            keys = ("output_tok_s", "total_tok_s", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms",
                    "e2e_p50_ms", "cache_hit_rate", "bandwidth_fraction", "usd_per_m_output_tokens")
            row = {key: mean([r[key] for r in runs]) for key in keys}
            turns = sorted({t for r in runs for t in r["ttft_p50_ms_per_turn"]})
            row["ttft_p50_ms_per_turn"] = {t: mean([r["ttft_p50_ms_per_turn"].get(t) for r in runs])
                                           for t in turns}
            means[workload][name] = row
    sg, mt = means["sharegpt"], means["multiturn"]
    ratios = {"throughput_replicas2_over_one_engine": sg["replicas-2"]["output_tok_s"] / sg["one-engine"]["output_tok_s"],
              "throughput_replicas1_over_one_engine": sg["replicas-1"]["output_tok_s"] / sg["one-engine"]["output_tok_s"],
              "throughput_replicas2_over_replicas1": sg["replicas-2"]["output_tok_s"] / sg["replicas-1"]["output_tok_s"],
              "multiturn_ttft_p50_kv_over_rr": mt["replicas-2"]["ttft_p50_ms"] / mt["replicas-2-rr"]["ttft_p50_ms"],
              "multiturn_hit_rate_kv": mt["replicas-2"]["cache_hit_rate"],
              "multiturn_hit_rate_rr": mt["replicas-2-rr"]["cache_hit_rate"],
              "multiturn_hit_rate_one_engine": mt["one-engine"]["cache_hit_rate"]}
    summary = {"kind": "cluster", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine,
               "bandwidth_gb_s": bandwidth / 1e9, "load_start": quiet[-1]["load"], "load_end": list(os.getloadavg()),
               "args": vars(args), "configs": CONFIGS, "rounds": rounds, "mean": means, "ratios": ratios}
    path = os.path.join(RESULTS, "cluster.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, os.path.join(RESULTS, "cluster.png"))
    print(json.dumps(ratios, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
