"""KV cache formats side by side on the default model, in one run: fp32, fp16 (the CPU
default) and int8 (--kv-cache-dtype int8: per-token, per-head fp16 scale, read directly by the
paged attention kernel).

For each format:
* tokens that fit in the same pool (--pool-mib of KV memory),
* quality on the held-out ShareGPT slice (metroline.quant.evaluate, every query reading its
  keys back from the cache): perplexity, and top-1 agreement and mean KL against an fp32 cache,
  with the served packed weights and with fp32 weights (where only the cache differs),
* decode tok/s in-process (greedy, ignore_eos) at batch 1 on a short prompt and at batch
  --long-batch over --long-prompt-token prompts (where attention reads a long cache every step);
  rounds alternate formats (A, B, C, A, B, C).

Usage: python benchmarks/kv_cache.py [--rounds 3]
Writes benchmarks/results/kv_cache.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FORMATS = ("fp32", "fp16", "int8")


def decode_tok_s(llm, prompts: list[list[int]], tokens: int) -> float:
    from metroline.engine.request import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # prefill (cached)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--pool-mib", type=int, default=256)
    ap.add_argument("--long-batch", type=int, default=8)
    ap.add_argument("--long-prompt-tokens", type=int, default=1536)
    ap.add_argument("--num-seqs", type=int, default=12)
    ap.add_argument("--seq-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "kv_cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from metroline.bench.hardware import machine_info, measure_bandwidth
    from metroline.engine.llm import LLM
    from metroline.model.loader import load_model
    from metroline.quant.evaluate import agreement, held_out, perplexity

    bandwidth = measure_bandwidth()
    packed = load_model(None, show_progress=False)
    fp32w = load_model(None, weights="fp32", show_progress=False)
    tok = packed.tokenizer
    seqs = held_out(tok, args.num_seqs, args.seq_tokens)
    pool = args.pool_mib * 2 ** 20
    llms = {f: LLM(loaded=packed, kv_cache_memory=pool, kv_cache_dtype=f, show_progress=False,
                   max_num_seqs=max(16, args.long_batch)) for f in FORMATS}
    cfg = packed.config
    result = {"machine": machine_info(), "threads": args.threads, "load_avg_start": os.getloadavg(),
              "bandwidth_gb_s": bandwidth / 1e9, "pool_mib": args.pool_mib,
              "slice": f"{len(seqs)} x {args.seq_tokens} tokens (ShareGPT records 2000..2199)",
              "reference": "the same weights with an fp32 KV cache", "formats": {}}

    # Long prompts from the held-out slice's text (distinct, so no prefix is shared).
    long_text = [ids for ids in held_out(tok, args.long_batch, args.long_prompt_tokens, count=400)]
    long_prompts = [ids[:args.long_prompt_tokens] for ids in long_text]
    if len(long_prompts) < args.long_batch:  # not enough long conversations: repeat with a distinct head
        long_prompts += [[i + 1] + long_prompts[0][1:] for i in range(args.long_batch - len(long_prompts))]
    short = [tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a long story about a "
                                                  "lighthouse keeper."}]), add_special_tokens=False)]
    rates = {f: {"batch1": [], "long": []} for f in FORMATS}
    for _ in range(args.rounds):
        for f in FORMATS:
            rates[f]["batch1"].append(decode_tok_s(llms[f], short, args.tokens))
            rates[f]["long"].append(decode_tok_s(llms[f], long_prompts, args.tokens))
    for f in FORMATS:
        e = llms[f].engine
        row = {"cache_dtype": e.info.kv_cache_dtype, "tokens_in_pool": e.num_blocks * e.info.block_size,
               "bytes_per_token": e.info.kv_cache_bytes // (e.num_blocks * e.info.block_size),
               "decode_tok_s_batch1": statistics.median(rates[f]["batch1"]),
               "decode_tok_s_long": statistics.median(rates[f]["long"]), "rounds": rates[f]}
        for name, loaded in (("packed", packed), ("fp32_weights", fp32w)):
            row[f"perplexity_{name}"] = perplexity(loaded, seqs, kv_cache_dtype=f).perplexity
            if f != "fp32":
                a = agreement(loaded, loaded, seqs, kv_cache_dtype=f, reference_kv_cache_dtype="fp32")
                row[f"top1_vs_fp32_kv_{name}"] = a.top1_agreement
                row[f"kl_vs_fp32_kv_{name}"] = a.mean_kl
        result["formats"][f] = row
    result["long_context"] = {"batch": args.long_batch, "prompt_tokens": args.long_prompt_tokens,
                              "decode_tokens": args.tokens}
    result["model"] = {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim}
    result["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.output.replace(".json", ".png"))
    for f, r in result["formats"].items():
        print(f"{f:5s} {r['tokens_in_pool']:>8,} tokens  ppl {r['perplexity_packed']:.3f} "
              f"(fp32 weights {r['perplexity_fp32_weights']:.3f})  "
              f"top1 {r.get('top1_vs_fp32_kv_fp32_weights', 1):.3f} KL {r.get('kl_vs_fp32_kv_fp32_weights', 0):.5f}  "
              f"b1 {r['decode_tok_s_batch1']:.1f} tok/s  long {r['decode_tok_s_long']:.1f} tok/s")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["formats"])
    rows = [result["formats"][n] for n in names]
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    ax[0].bar(names, [r["tokens_in_pool"] / 1e3 for r in rows], color="#4477aa")
    ax[0].set_title(f"tokens in a {result['pool_mib']} MiB pool (thousands)")
    ax[1].bar(names, [r.get("kl_vs_fp32_kv_fp32_weights", 0) for r in rows], color="#cc6677")
    ax[1].set_title("mean KL vs fp32 KV (fp32 weights), nats")
    lc = result["long_context"]
    x = range(len(names))
    ax[2].bar([i - 0.2 for i in x], [r["decode_tok_s_batch1"] for r in rows], 0.4, label="batch 1, short")
    ax[2].bar([i + 0.2 for i in x], [r["decode_tok_s_long"] for r in rows], 0.4,
              label=f"batch {lc['batch']}, {lc['prompt_tokens']}-token prompts")
    ax[2].set_xticks(list(x), names)
    ax[2].set_title("decode tok/s (packed weights)")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"KV cache formats, default model ({result['machine'].get('cpu', '')}, "
                 f"load {result['load_avg_start'][0]:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
