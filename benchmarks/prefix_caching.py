"""Prefix caching and KV retention, measured the way a user sees it: TTFT per conversation
turn, replayed over HTTP with `metroline bench serve --dataset multiturn` (and `agent`).

Configurations, one `metroline serve` at a time on loopback, same conversations:
  off              --no-prefix-caching
  on               prefix caching, a KV pool large enough for every history
  on-pressure      prefix caching, a KV pool too small for the conversations in flight
                   (other conversations' turns evict a paused one's blocks)
  on-retention     the same small pool, each turn sent with session_id + kv_retention_s,
                   so a finished turn's blocks stay pinned until the next turn

Writes benchmarks/results/prefix_caching.json and .png (median TTFT per turn, per config) and
the bench serve result files prefix_{config}_{dataset}.json.
Usage: python benchmarks/prefix_caching.py [--conversations 8] [--turns 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from serve_vs_llamacpp import PY, RESULTS, Server, free_port, wait_for_quiet

CONFIGS = {
    "off": (["--no-prefix-caching"], None),
    "on": ([], None),
    "on-pressure": (["--num-blocks", "{small}"], None),
    "on-retention": (["--num-blocks", "{small}", "--max-pinned-fraction", "0.6"], 600),
}


def run_bench(url: str, label: str, dataset: str, out: str, args, retention) -> dict:
    cmd = [PY, "-m", "metroline.cli", "bench", "serve", "--base-url", url, "--label", label,
           "--dataset", dataset, "--seed", str(args.seed), "--disable-tqdm", "--no-save-chunks",
           "--max-concurrency", str(args.concurrency), "--output", out, "--no-plots"]
    if dataset == "multiturn":
        cmd += ["--num-prompts", str(args.conversations), "--max-turns", str(args.turns),
                "--min-turns", str(args.turns), "--max-user-len", str(args.max_user_len),
                "--max-output-len", str(args.output_len), "--think-time", str(args.think_time)]
    else:
        cmd += ["--num-prompts", str(args.agents), "--agent-calls", str(args.turns),
                "--agent-output-len", str(args.output_len), "--agent-tool-pause", str(args.think_time)]
    if retention:
        cmd += ["--session-retention", str(retention)]
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)


def per_turn_p50(result: dict) -> dict[int, float]:
    run = result["runs"][0]
    return {int(k): v["ttft_ms"]["p50"] for k, v in (run.get("per_turn") or {}).items()}


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for name, turns in summary["datasets"][ds]["ttft_p50_ms_by_turn"].items():
            xs = sorted(turns)
            ax.plot([x + 1 for x in xs], [turns[x] for x in xs], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("turn" if ds == "multiturn" else "call")
        ax.set_ylabel("median TTFT (ms)")
        r = summary["datasets"][ds].get("speedup_vs_off_last_turn", {}).get("on-retention")
        ax.set_title(f"{ds}: TTFT per turn" + (f"\noff / on-retention at the last turn = {r:.1f}x" if r else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--agents", type=int, default=6)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-user-len", type=int, default=96)
    ap.add_argument("--output-len", type=int, default=24)
    ap.add_argument("--think-time", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--small-blocks", type=int, default=96,
                    help="KV pool (blocks of 16) for the memory-pressure configs")
    ap.add_argument("--datasets", default="multiturn,agent")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which configurations to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--summary", default="prefix_caching", help="summary file name (no extension)")
    ap.add_argument("--max-load", type=float, default=0.7)
    ap.add_argument("--max-wait", type=float, default=600)
    args = ap.parse_args(argv)

    from metroline.model.default import default_model_path

    gguf = default_model_path()
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "datasets": {}}
    summary["load_wait"] = wait_for_quiet(args.max_load, args.max_wait)
    for ds in args.datasets.split(","):
        entry = summary["datasets"].setdefault(ds, {"ttft_p50_ms_by_turn": {}, "runs": {}})
        for name, (flags, retention) in CONFIGS.items():
            if name not in args.configs.split(","):
                continue
            flags = [f.format(small=args.small_blocks) for f in flags]
            port = free_port()
            cmd = [PY, "-m", "metroline.cli", "serve", "--model", gguf, "--port", str(port),
                   "--no-access-log", "--log-level", "warning", *flags]
            server = Server(name, cmd, port, f"/tmp/prefix_{name}.log")
            try:
                out = os.path.join(RESULTS, f"{args.summary}_{name}_{ds}.json")
                res = run_bench(server.url, name, ds, out, args, retention)
            finally:
                server.stop()
            entry["ttft_p50_ms_by_turn"][name] = per_turn_p50(res)
            run = res["runs"][0]
            entry["runs"][name] = {"flags": flags, "kv_retention_s": retention,
                                   "ttft_ms": run.get("ttft_ms"), "errors": run.get("num_errors"),
                                   "load": [round(x, 2) for x in os.getloadavg()]}
            print(f"{ds} {name}: {entry['ttft_p50_ms_by_turn'][name]}", file=sys.stderr)
        by = entry["ttft_p50_ms_by_turn"]
        if "off" in by:
            last = max(by["off"])
            # How many times lower the median TTFT of the last turn is than with caching off.
            entry["speedup_vs_off_last_turn"] = {name: by["off"][last] / by[name][last]
                                                 for name in by if by[name].get(last)}
    with open(os.path.join(RESULTS, args.summary + ".json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, os.path.join(RESULTS, args.summary + ".png"))
    print(json.dumps({ds: e.get("speedup_vs_off_last_turn") for ds, e in summary["datasets"].items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
