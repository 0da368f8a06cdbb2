"""Speculative decoding on the default model: output tok/s with and without it, in one run,
rounds interleaved (none, ngram, suffix, none, ngram, suffix, ...), greedy.

Workloads (in-process, EngineCore):
  - copy-heavy: edit or repeat a given text, rename a variable in code (the project's own
    source), answer from a tool result (a JSON record), summarize keeping sentences;
  - sharegpt: real ShareGPT opening turns (little to copy);
  - agent: agent programs (a shared system prompt, a task, then tool results and short
    replies, turn after turn; bench/workloads.agent_programs without pauses): suffix decoding
    learns the replies' shapes from earlier calls;
each at concurrency 1 (requests one after another) and 8 (eight at once). Reported per run:
output tok/s, drafts and acceptance rate, mean accepted length (tokens per verifying step),
steps; the speedup over no speculation (median of rounds; the suffix proposer forgets the
previous rounds' outputs before each run, so it learns only within the run); tok/s as a fraction of the
machine's batch-1 roofline (bandwidth / bytes read per step), which speculation can pass
since one weight read serves several tokens; and $ per million output tokens at
--price-per-hour. Then a sweep over concurrency (1..16) with speculation never switched off,
which is where the policy's max_batch default comes from.

Usage: python benchmarks/speculative.py [--rounds 3] [--max-tokens 128] [--threads 2]
Writes benchmarks/results/speculative.{json,png}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = (None, "ngram", "suffix")


def copy_heavy_prompts(tok, sharegpt_texts: list[str]) -> list[str]:
    code = []
    for path in sorted(glob.glob(os.path.join(ROOT, "metroline", "engine", "*.py")))[:4]:
        with open(path) as f:
            src = f.read()
        start = src.find("\ndef ")
        code.append(src[start + 1:start + 700] if start >= 0 else src[:700])
    docs = [t[:700] for t in sharegpt_texts[:3]]
    tool = json.dumps({"order_id": "A-1043", "status": "shipped", "carrier": "DHL", "items": [
        {"sku": "KB-88", "name": "mechanical keyboard", "qty": 1}, {"sku": "MS-12", "name": "wireless mouse", "qty": 2}],
        "eta": "2026-12-04", "address": "12 Harbour Street, Oslo"}, indent=1)
    asks = ([f"Fix any typos in this text and return the whole text:\n\n{d}" for d in docs[:2]]
            + [f"Rename the variable `req` to `request` in this code and show all of it:\n\n{c}" for c in code[:3]]
            + [f"The order tool returned:\n{tool}\nTell the customer the status of their order, item by item.",
               f"Repeat this text exactly:\n\n{docs[2]}"]
            + [f"Add a docstring to this function and return the whole function:\n\n{code[3]}"])
    return [tok.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True) for a in asks]


def sharegpt_prompts(tok, n: int) -> tuple[list[str], list[str]]:
    from metroline.datasets import iter_sharegpt

    firsts, replies = [], []
    for rec in iter_sharegpt(limit=400):
        conv = rec.get("conversations") or []
        if len(conv) >= 2 and 20 < len(conv[0]["value"]) < 1500 and len(conv[1]["value"]) > 800:
            firsts.append(conv[0]["value"])
            replies.append(conv[1]["value"])
        if len(firsts) == n:
            break
    return [tok.apply_chat_template([{"role": "user", "content": f}], add_generation_prompt=True) for f in firsts], replies


def agent_conversations(tok, num: int, calls: int) -> list[list[dict]]:
    """Message lists of agent programs, each turn's reply left to the model (see run_agents)."""
    from metroline.bench.workloads import agent_programs

    progs = agent_programs(tok, num, seed=1, num_calls=calls, output_len=48, tool_output_len=48,
                           tool_pause_s=0.0, system_len=200, task_len=96)
    return [[{"role": "system", "content": p.system}] + [{"role": "user", "content": c.content} for c in p.calls]
            for p in progs]


def run_batch(llm, prompts: list, concurrency: int, max_tokens: int) -> dict:
    from metroline.engine.request import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens)  # to the model's own end: no rambling on
    core = llm.engine
    s0, st0 = core.num_steps, core.get_stats()
    t = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), concurrency):
        outs = llm.generate(prompts[i:i + concurrency], sp, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    dt = time.perf_counter() - t
    return _row(core, s0, st0, tokens, dt)


def run_agents(llm, convs: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    """Each program turn by turn: the model's reply joins the history before the next tool
    result; `concurrency` programs advance together."""
    from metroline.engine.request import SamplingParams

    tok = llm.tokenizer
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    core = llm.engine
    s0, st0 = core.num_steps, core.get_stats()
    t = time.perf_counter()
    tokens = 0
    for i in range(0, len(convs), concurrency):
        group = convs[i:i + concurrency]
        history = [[c[0], c[1]] for c in group]
        for turn in range(2, max(len(c) for c in group) + 1):
            prompts = [tok.apply_chat_template(h, add_generation_prompt=True) for h in history]
            outs = llm.generate(prompts, sp, use_tqdm=False)
            for h, c, o in zip(history, group, outs):
                tokens += len(o.outputs[0].token_ids)
                h.append({"role": "assistant", "content": o.outputs[0].text})
                if turn < len(c):
                    h.append(c[turn])
    dt = time.perf_counter() - t
    return _row(core, s0, st0, tokens, dt)


def _row(core, s0, st0, tokens, dt) -> dict:
    st = core.get_stats()
    drafted = st.spec_draft_tokens - st0.spec_draft_tokens
    accepted = st.spec_accepted_tokens - st0.spec_accepted_tokens
    verifs = st.spec_verifications - st0.spec_verifications
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt, "steps": core.num_steps - s0,
            "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": (accepted + verifs) / verifs if verifs else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens (at most; adapted per request)")
    ap.add_argument("--price-per-hour", type=float, default=0.10, help="machine price, $/h")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "speculative.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from metroline.bench.hardware import machine_info, measure_bandwidth
    from metroline.config import SpeculativeConfig
    from metroline.engine.llm import LLM

    base = LLM(show_progress=False, num_blocks=2048)
    tok = base.tokenizer
    bandwidth = measure_bandwidth()
    ceiling = bandwidth / base.loaded.weight_bytes if base.loaded.weight_bytes else None
    share, replies = sharegpt_prompts(tok, 8)
    sets = {"copy-heavy": copy_heavy_prompts(tok, replies), "sharegpt": share}
    convs = agent_conversations(tok, 8, 6)
    engines = {m: base if m is None else LLM(loaded=base.loaded, show_progress=False, num_blocks=2048,
                                             speculative=SpeculativeConfig(method=m, num_speculative_tokens=args.k))
               for m in METHODS}
    result = {"machine": machine_info(), "threads": args.threads, "k": args.k, "max_tokens": args.max_tokens,
              "load_avg_start": os.getloadavg(), "bandwidth_gb_s": bandwidth / 1e9,
              "batch1_ceiling_tok_s": ceiling, "price_per_hour": args.price_per_hour,
              "policy_max_batch": SpeculativeConfig().max_batch, "runs": {}}
    cases = [(name, c) for name in (*sets, "agent") for c in (1, 8)]
    for r in range(args.rounds):
        for name, c in cases:
            for m in METHODS:
                llm = engines[m]
                reset = getattr(llm.engine.proposer, "reset", None)
                if reset is not None:  # suffix: no memory of this workload's previous round
                    reset()
                row = (run_agents(llm, convs, c, 48) if name == "agent"
                       else run_batch(llm, sets[name], c, args.max_tokens))
                result["runs"].setdefault(f"{name}|c{c}|{m or 'none'}", []).append(row)
                print(f"round {r + 1} {name:10s} c={c} {m or 'none':6s}: {row['tok_s']:6.1f} tok/s, "
                      f"{row['steps']} steps, accepted {row['accepted']}/{row['drafted']}", flush=True)
    summary = {}
    for name, c in cases:
        base_tok_s = statistics.median(x["tok_s"] for x in result["runs"][f"{name}|c{c}|none"])
        for m in METHODS:
            rows = result["runs"][f"{name}|c{c}|{m or 'none'}"]
            med = statistics.median(x["tok_s"] for x in rows)
            drafted, accepted = sum(x["drafted"] for x in rows), sum(x["accepted"] for x in rows)
            lens = [x["mean_accepted_length"] for x in rows if x["mean_accepted_length"]]
            summary[f"{name}|c{c}|{m or 'none'}"] = {
                "median_tok_s": med, "speedup": med / base_tok_s,
                "acceptance_rate": accepted / drafted if drafted else None,
                "mean_accepted_length": statistics.mean(lens) if lens else None,
                "fraction_of_batch1_roofline": med / ceiling if ceiling and c == 1 else None,
                "usd_per_million_output_tokens": args.price_per_hour / 3600 / med * 1e6}
    result["summary"] = summary
    result["crossover"] = crossover(base, sets["copy-heavy"], args)
    result["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    _plot(result, args.output[:-5] + ".png")
    for key, v in summary.items():
        acc = f", accepted {v['acceptance_rate']:.0%}, {v['mean_accepted_length']:.2f} tokens/step" \
            if v["acceptance_rate"] is not None else ""
        print(f"{key:28s} {v['median_tok_s']:7.1f} tok/s  {v['speedup']:.2f}x{acc}")
    print("crossover (ngram, never off):", {c: round(v["speedup"], 2) for c, v in result["crossover"].items()})
    print(f"wrote {args.output}")


def crossover(base, prompts, args) -> dict:
    """Copy-heavy prompts at concurrency 1..16, ngram with max_batch off against none,
    alternated: where speculation stops paying."""
    from metroline.config import SpeculativeConfig
    from metroline.engine.llm import LLM

    spec = LLM(loaded=base.loaded, show_progress=False, num_blocks=2048,
               speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=args.k, max_batch=None))
    out = {}
    for c in (1, 2, 4, 6, 8, 16):
        work = (prompts * 2)[:max(c, 8)]
        a = [run_batch(base, work, c, 64)["tok_s"] for _ in range(2)]
        b = [run_batch(spec, work, c, 64)["tok_s"] for _ in range(2)]
        out[c] = {"none_tok_s": statistics.median(a), "ngram_tok_s": statistics.median(b),
                  "speedup": statistics.median(b) / statistics.median(a)}
        print(f"crossover c={c}: none {out[c]['none_tok_s']:.1f}, ngram {out[c]['ngram_tok_s']:.1f} tok/s", flush=True)
    return out


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    cases = sorted({k.rsplit("|", 1)[0] for k in s}, key=lambda k: list(s).index(f"{k}|none"))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    w = 0.27
    for j, (m, color) in enumerate((("none", "tab:gray"), ("ngram", "tab:blue"), ("suffix", "tab:green"))):
        vals = [s[f"{c}|{m}"]["speedup"] for c in cases]
        bars = ax.bar([i + (j - 1) * w for i in range(len(cases))], vals, w, label=m, color=color)
        if m != "none":
            for b, c in zip(bars, cases):
                rate = s[f"{c}|{m}"]["acceptance_rate"]
                if rate is not None:
                    ax.text(b.get_x() + w / 2, b.get_height() + 0.02, f"{rate:.0%}", ha="center", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.95, color="red", lw=0.6, ls="--")
    ax.set_xticks(range(len(cases)), [c.replace("|c", "\nc=") for c in cases])
    ax.set_ylabel("output tok/s / no speculation (median of rounds)")
    ax.set_title(f"speculative decoding, k={result['k']}, greedy, {result['threads']} threads "
                 f"(labels: acceptance)")
    ax.legend()
    cx = result["crossover"]
    ax2.plot([int(c) for c in cx], [v["speedup"] for v in cx.values()], "o-", color="tab:blue")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrent requests (copy-heavy)")
    ax2.set_ylabel("ngram / none")
    ax2.set_title(f"where it stops paying\n(policy default: off above {result['policy_max_batch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
