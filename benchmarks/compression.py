"""Weight formats side by side on the default model, in one run: bits per weight, bytes the
model reads per decode step, decode tok/s at batch 1 and 16 (in-process, greedy, ignore_eos),
the bandwidth that batch-1 figure achieves, perplexity on the held-out ShareGPT slice
(metroline.quant.evaluate), and greedy top-1 agreement and mean KL against fp32.

The reference is the file's own weights dequantized to fp32 (the default model ships as
Q4_1 with a Q8_0 embedding; no higher-precision original is on this machine), so q8_0 and
q4_0 here are re-quantizations of those values (round to nearest, per 32-weight block).
A "-imatrix" row is the same format quantized importance-weighted (--quant-method imatrix:
each block's scale chosen against the error weighted by the mean x^2 of its layer's input,
measured on the fp32 model over the calibration sample, ShareGPT records 0..999, 4096
tokens, disjoint from the held-out slice; metroline.quant.calibrate), so RTN and calibrated
sit side by side. (q4_1 is the file's own format: both methods keep its bytes, as packed.)
Formats load one at a time; decode rounds alternate formats (A, B, C, A, B, C).

int8 is one scale per output row, int4-gG one fp16 scale (and min, -asym) per G weights,
ternary llama.cpp's TQ2_0 (absmean scale per 256: on this model only down_proj, K = 1536,
takes it; the rest fall back to Q4_0, as llama.cpp's quantizer does); the embedding and the
output projection stay Q8_0 under all of them.

Usage: python benchmarks/compression.py [--formats fp32,packed,q8_0,q8_0-imatrix,...] [--rounds 2]
Writes benchmarks/results/compression.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def decode_tok_s(llm, batch: int, tokens: int) -> float:
    from metroline.engine.request import SamplingParams

    prompts = [f"Write a long story about a lighthouse keeper, part {i}." for i in range(batch)]
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


DEFAULT_FORMATS = ("fp32,packed,q8_0,q8_0-imatrix,q4_0,q4_0-imatrix,int8,int8-imatrix,int4-g64,int4-g64-imatrix,"
                   "int4-g64-asym,int4-g64-asym-imatrix,int4-g128,int4-g128-imatrix,int4-g128-asym,"
                   "int4-g128-asym-imatrix,ternary,ternary-imatrix")


def variant(fmt: str) -> tuple[str, str]:
    """A --formats entry -> (weights, quant method): "q4_0" -> rtn, "int4-g64-imatrix" -> imatrix."""
    if fmt.endswith("-imatrix"):
        return fmt[:-len("-imatrix")], "imatrix"
    return fmt, "rtn"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default=DEFAULT_FORMATS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--num-seqs", type=int, default=12)
    ap.add_argument("--seq-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "compression.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from metroline.bench.hardware import machine_info, measure_bandwidth
    from metroline.engine.llm import LLM
    from metroline.quant.calibrate import SAMPLE
    from metroline.quant.evaluate import agreement, held_out, perplexity

    formats = args.formats.split(",")
    bandwidth = measure_bandwidth()
    llms = {f: LLM(weights=variant(f)[0], quant_method=variant(f)[1], show_progress=False, num_blocks=512)
            for f in formats}
    ref = llms.get("fp32") or LLM(weights="fp32", show_progress=False, num_blocks=64)
    seqs = held_out(ref.tokenizer, args.num_seqs, args.seq_tokens)
    result = {"machine": machine_info(), "threads": args.threads, "load_avg_start": os.getloadavg(),
              "bandwidth_gb_s": bandwidth / 1e9, "reference": "fp32 (the file's weights dequantized)",
              "slice": f"{len(seqs)} x {args.seq_tokens} tokens", "calibration": SAMPLE.describe(), "formats": {}}
    n_params = sum(p.numel() for m in ref.loaded.model.modules() if isinstance(m, torch.nn.Linear)
                   for p in [m.weight]) or 1
    rates: dict = {f: {"1": [], "16": []} for f in formats}
    for _ in range(args.rounds):
        for f in formats:
            for b in (1, 16):
                rates[f][str(b)].append(decode_tok_s(llms[f], b, args.tokens))
    for f in formats:
        loaded = llms[f].loaded
        ppl = perplexity(loaded, seqs)
        agr = agreement(ref.loaded, loaded, seqs) if f != "fp32" else None
        step_bytes = loaded.weight_bytes
        tok1 = statistics.median(rates[f]["1"])
        result["formats"][f] = {
            "held": loaded.weights, "quant_method": variant(f)[1], "bytes_per_step": step_bytes, "bits_per_weight": 8 * step_bytes / n_params,
            "decode_tok_s_batch1": tok1, "decode_tok_s_batch16": statistics.median(rates[f]["16"]),
            "achieved_gb_s_batch1": tok1 * step_bytes / 1e9, "fraction_of_bandwidth": tok1 * step_bytes / bandwidth,
            "perplexity": ppl.perplexity, "top1_agreement": agr.top1_agreement if agr else 1.0,
            "mean_kl": agr.mean_kl if agr else 0.0, "rounds": rates[f]}
        r = result["formats"][f]
        print(f"{f:12s} {r['held'][:40]:40s} {r['bits_per_weight']:5.2f} bits, {step_bytes / 1e6:6.1f} MB/step, "
              f"{tok1:6.1f} / {r['decode_tok_s_batch16']:6.1f} tok/s (b1/b16), {r['fraction_of_bandwidth']:.0%} bw, "
              f"ppl {r['perplexity']:.3f}, agree {r['top1_agreement']:.1%}, KL {r['mean_kl']:.4f}", flush=True)
    result["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, args.output[:-5] + ".png")
    print(f"wrote {args.output}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fm = result["formats"]
    names = list(fm)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(11, 0.9 * len(names)), 9))
    x = range(len(names))
    a1.bar([i - 0.2 for i in x], [fm[n]["decode_tok_s_batch1"] for n in names], 0.4, label="batch 1")
    a1.bar([i + 0.2 for i in x], [fm[n]["decode_tok_s_batch16"] for n in names], 0.4, label="batch 16")
    a1.set_xticks(list(x), [f"{n}\n{fm[n]['bits_per_weight']:.2f} b" for n in names], fontsize=7, rotation=30)
    a1.set_ylabel("decode tok/s (median of rounds)")
    a1.set_title(f"speed ({result['threads']} threads)")
    a1.legend()
    a2.scatter([fm[n]["bits_per_weight"] for n in names], [fm[n]["perplexity"] for n in names])
    for n in names:
        a2.annotate(f"{n} (KL {fm[n]['mean_kl']:.3f})", (fm[n]["bits_per_weight"], fm[n]["perplexity"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=7)
    a2.set_yscale("log")
    a2.set_xlabel("bits per weight (bytes read per step / matrix weights)")
    a2.set_ylabel(f"perplexity, held-out ShareGPT ({result['slice']})")
    a2.set_title("quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
