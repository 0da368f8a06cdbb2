"""A distilled student, measured: its perplexity on the held-out ShareGPT slice (against the
teacher's), its size, its batch-1 decode speed, and what it does as the speculative draft
(acceptance, speedup over no speculation, rounds alternated) next to the teacher's own first
layers (`draft:layers=N`, untrained) on ShareGPT chats at concurrency 1.

Make the student first (not committed: ~230 MB in fp32):
    metroline distill --layers 8 --steps 300 --seq-len 128 --batch 4 -o /tmp/student8
Usage: python benchmarks/distill.py /tmp/student8 [--rounds 2]
Writes benchmarks/results/distill.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("student")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "distill.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import speculative as B

    from metroline.config import SpeculativeConfig
    from metroline.engine.llm import LLM
    from metroline.quant.evaluate import held_out, perplexity

    ck = torch.load(os.path.join(args.student, "checkpoint.pt"), weights_only=False)
    layers = ck["config"]["layers"]
    teacher = LLM(show_progress=False, num_blocks=1024)
    student = LLM(args.student, show_progress=False, num_blocks=256, weights="packed")  # Q8_0 at load
    seqs = held_out(teacher.tokenizer, 12, 256)
    tok1 = {}
    for name, llm in (("teacher", teacher), ("student", student)):
        tok1[name] = B.run_batch(llm, ["Tell me a story about the sea."], 1, 128)["tok_s"]
    result = {"student": args.student, "layers": layers, "training": ck["config"], "steps": ck["step"],
              "loss_first": ck["losses"][0], "loss_last": ck["losses"][-1], "load_avg_start": os.getloadavg(),
              "perplexity": {"teacher": perplexity(teacher.loaded, seqs).perplexity,
                             "student": perplexity(student.loaded, seqs).perplexity},
              "weight_bytes_per_step": {"teacher": teacher.loaded.weight_bytes, "student": student.loaded.weight_bytes},
              "decode_tok_s_batch1": tok1, "draft": {}}
    share, _ = B.sharegpt_prompts(teacher.tokenizer, 6)
    engines = {"none": teacher}
    for m in (f"draft:{args.student}", f"draft:layers={layers}"):
        engines[m] = LLM(loaded=teacher.loaded, show_progress=False, num_blocks=1024,
                         speculative=SpeculativeConfig(method=m, num_speculative_tokens=4))
    runs: dict = {k: [] for k in engines}
    for _ in range(args.rounds):
        for k, llm in engines.items():
            t = time.perf_counter()
            runs[k].append(B.run_batch(llm, share, 1, 128))
            print(f"{k}: {runs[k][-1]['tok_s']:.1f} tok/s, accepted {runs[k][-1]['accepted']}/{runs[k][-1]['drafted']}"
                  f" ({time.perf_counter() - t:.0f} s)", flush=True)
    base = statistics.median(r["tok_s"] for r in runs["none"])
    for k, rows in runs.items():
        d, a = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
        med = statistics.median(r["tok_s"] for r in rows)
        result["draft"][k] = {"median_tok_s": med, "speedup": med / base, "acceptance_rate": a / d if d else None,
                              "rounds": rows}
    result["load_avg_end"] = os.getloadavg()
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, ck["losses"], args.output[:-5] + ".png")
    print(json.dumps({k: v for k, v in result.items() if k != "draft"}, indent=1, default=str))
    for k, v in result["draft"].items():
        acc = f", accepted {v['acceptance_rate']:.0%}" if v["acceptance_rate"] is not None else ""
        print(f"{k}: {v['median_tok_s']:.1f} tok/s, {v['speedup']:.2f}x{acc}")
    print(f"wrote {args.output}")


def plot(result: dict, losses: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(range(1, len(losses) + 1), losses)
    a1.set_yscale("log")
    a1.set_xlabel("step")
    a1.set_ylabel("KL(teacher || student), nats/token")
    p = result["perplexity"]
    a1.set_title(f"{result['layers']}-layer student: perplexity {p['student']:.1f} (teacher {p['teacher']:.2f})")
    names = list(result["draft"])
    a2.bar(range(len(names)), [result["draft"][n]["speedup"] for n in names], color=["tab:gray", "tab:green", "tab:red"])
    for i, n in enumerate(names):
        r = result["draft"][n]["acceptance_rate"]
        if r is not None:
            a2.text(i, result["draft"][n]["speedup"] + 0.02, f"{r:.0%} accepted", ha="center", fontsize=8)
    a2.axhline(1.0, color="black", lw=0.8)
    a2.set_xticks(range(len(names)), ["none", "distilled student", f"first {result['layers']} layers"])
    a2.set_ylabel("tok/s / no speculation (ShareGPT, c=1)")
    a2.set_title("as the speculative draft")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
