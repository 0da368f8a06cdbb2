"""Perplexity of the default model on a fixed, held-out ShareGPT slice, per weight format.

The slice: ShareGPT records 2000..2199 (the engine tests and serving benchmarks draw from the
first ~1000), each conversation rendered with the model's chat template and cut to its first
--tokens tokens, the first --num-seqs that are at least that long. Every token after the
first is scored (teacher forcing) through metroline's own paged forward, so what is measured
is what the engine serves: fp32 weights (dequantized at load) and packed weights (the file's
Q4_1/Q8_0 bytes on the C++ kernels, int8 activations).

Usage: python benchmarks/perplexity.py [--weights fp32,packed] [--num-seqs 24] [--tokens 256]
Writes benchmarks/results/perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def held_out(tok, num_seqs: int, tokens: int) -> list[list[int]]:
    from metroline.quant.evaluate import held_out as slice_of

    return slice_of(tok, num_seqs, tokens)


def nll(loaded, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given their prefixes (metroline.quant.evaluate)."""
    from metroline.quant.evaluate import logits_of

    logp = logits_of(loaded, ids)
    return -logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item(), len(ids) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="fp32,packed")
    ap.add_argument("--num-seqs", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "perplexity.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from metroline.model.loader import load_model

    results = {"slice": "ShareGPT records 2000..2199, chat template, first "
                        f"{args.tokens} tokens of the first {args.num_seqs} long enough",
               "load_avg": os.getloadavg(), "formats": {}}
    seqs = None
    for w in args.weights.split(","):
        loaded = load_model(None, show_progress=False, weights=w)
        if seqs is None:
            seqs = held_out(loaded.tokenizer, args.num_seqs, args.tokens)
        t0 = time.perf_counter()
        total, n = 0.0, 0
        for ids in seqs:
            s, k = nll(loaded, ids)
            total, n = total + s, n + k
        ppl = math.exp(total / n)
        from metroline.platform import resolve_attention_backend

        results["formats"][w] = {"weights": loaded.weights, "perplexity": round(ppl, 4),
                                 "attention": resolve_attention_backend("auto", torch.device("cpu")),
                                 "tokens_scored": n, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{w:8s} {loaded.weights}: perplexity {ppl:.4f} over {n} tokens")
    f = results["formats"]
    if "fp32" in f and "packed" in f:
        f["packed"]["vs_fp32"] = round(f["packed"]["perplexity"] / f["fp32"]["perplexity"] - 1, 5)
        print(f"packed vs fp32: {f['packed']['vs_fp32']:+.3%}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
