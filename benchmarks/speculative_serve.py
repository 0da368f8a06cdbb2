"""The agent workload served, with and without suffix decoding: `metroline serve` and
`metroline serve --speculative suffix`, one at a time, rounds alternated (plain, suffix,
plain, suffix), each measured by `metroline bench serve --dataset agent` (agent programs: a
shared system prompt, a task, then tool results and short replies, call after call; tool
pauses 0 so that the figure is the engine's), greedy. Output tok/s per run, the ratio of
medians, and the server's own speculative counters (drafted, accepted) from /metrics.

Usage: python benchmarks/speculative_serve.py [--rounds 2] [--num-prompts 8]
Writes benchmarks/results/speculative_serve.json (and each run's bench JSON under /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from serve_vs_llamacpp import PY, Server, free_port  # noqa: E402


def spec_counters(url: str) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("metroline_spec_decode_num_"):
            out[line.split("{")[0].removeprefix("metroline_spec_decode_num_")] = float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--agent-calls", type=int, default=8)
    ap.add_argument("--max-concurrency", default="1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "speculative_serve.json"))
    args = ap.parse_args()
    configs = {"plain": [], "suffix": ["--speculative", "suffix"]}
    result = {"workload": {"dataset": "agent", "num_prompts": args.num_prompts, "agent_calls": args.agent_calls,
                           "agent_tool_pause": 0, "max_concurrency": args.max_concurrency, "temperature": 0},
              "load_avg_start": os.getloadavg(), "runs": {k: [] for k in configs}}
    for r in range(args.rounds):
        for name, extra in configs.items():
            port = free_port()
            srv = Server(name, [PY, "-m", "metroline.cli", "serve", "--port", str(port), "--threads",
                                str(args.threads), *extra], port, f"/tmp/spec-serve-{name}.log")
            out = f"/tmp/spec-serve-{name}-{r}.json"
            try:
                subprocess.run([PY, "-m", "metroline.cli", "bench", "serve", "--base-url", srv.url, "--label", name,
                                "--dataset", "agent", "--num-prompts", str(args.num_prompts),
                                "--agent-calls", str(args.agent_calls), "--agent-tool-pause", "0",
                                "--max-concurrency", args.max_concurrency, "--output", out, "--disable-tqdm"],
                               check=True)
                counters = spec_counters(srv.url)
            finally:
                srv.stop()
            with open(out) as f:
                m = json.load(f)["runs"][0]["metrics"]
            row = {"output_tok_s": m["output_throughput"], "output_tokens": m["output_tokens"],
                   "duration_s": m["duration_s"], "tpot_ms_p50": m["tpot_ms"]["p50"], **counters}
            result["runs"][name].append(row)
            print(f"round {r + 1} {name}: {row['output_tok_s']:.1f} output tok/s, {counters}", flush=True)
    med = {k: statistics.median(x["output_tok_s"] for x in v) for k, v in result["runs"].items()}
    sfx = result["runs"]["suffix"]
    drafted = sum(x.get("draft_tokens_total", 0) for x in sfx)
    accepted = sum(x.get("accepted_tokens_total", 0) for x in sfx)
    result.update(median_output_tok_s=med, speedup=med["suffix"] / med["plain"],
                  acceptance_rate=accepted / drafted if drafted else None, load_avg_end=os.getloadavg())
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.output[:-5] + ".png")
    print(f"plain {med['plain']:.1f}, suffix {med['suffix']:.1f} output tok/s: {result['speedup']:.2f}x "
          f"(acceptance {result['acceptance_rate'] or 0:.0%})")
    print(f"wrote {args.output}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    names = list(result["runs"])
    for i, name in enumerate(names):
        vals = [x["output_tok_s"] for x in result["runs"][name]]
        ax.bar(i, result["median_output_tok_s"][name], 0.6, color=["tab:gray", "tab:green"][i % 2])
        ax.plot([i] * len(vals), vals, "k.", ms=6)
    ax.set_xticks(range(len(names)), ["metroline serve", "--speculative suffix"])
    ax.set_ylabel("output tok/s (bars: median; dots: rounds)")
    w = result["workload"]
    ax.set_title(f"agent workload served ({w['num_prompts']} programs x {w['agent_calls']} calls, "
                 f"concurrency {w['max_concurrency']}):\n{result['speedup']:.2f}x, "
                 f"{result['acceptance_rate'] or 0:.0%} of drafts accepted")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
