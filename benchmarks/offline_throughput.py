"""Engine-core benchmark, side by side in one run on the default model:

1. the machine: read bandwidth and fp32 matmul throughput (measured now, not assumed);
2. single-stream decode tokens/s, and its fraction of the bandwidth roofline for the weight
   format in use (bytes of every matmul weight per token);
3. offline throughput on ShareGPT prompts with their real output lengths (capped), metroline
   `LLM.generate` against HF transformers `generate` (batched, left-padded, prompts sorted by
   length, the best of several batch sizes), as a ratio.

Writes benchmarks/results/offline_throughput.json and .png.
Usage: python benchmarks/offline_throughput.py [--num-prompts 64] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

from metroline.bench.hardware import (decode_roofline, machine_info, measure_bandwidth,
                                      measure_matmul_flops, weight_bytes_per_token)
from metroline.datasets import iter_sharegpt
from metroline.engine.llm import LLM
from metroline.engine.request import SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sample_sharegpt(tok, n: int, max_output: int, seed: int = 0, max_prompt: int = 1024):
    """(prompt_ids, output_len) pairs: first human turn as prompt, the reply's length as output."""
    pool = []
    for rec in iter_sharegpt(limit=3000):
        conv = rec.get("conversations") or []
        if len(conv) < 2 or conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
            continue
        prompt = tok.encode(conv[0]["value"])
        out_len = len(tok.encode(conv[1]["value"], add_special_tokens=False))
        if 4 <= len(prompt) <= max_prompt and out_len >= 4:
            pool.append((prompt, min(out_len, max_output)))
    random.Random(seed).shuffle(pool)
    return pool[:n]


def single_stream_decode(llm: LLM, n_tokens: int = 128) -> float:
    """Decode tokens/s of one request (first token excluded: that is prefill)."""
    core = llm.engine
    ids = llm.tokenizer.encode("Write a long essay about the history of the printing press.")
    core.add_request("single", ids, SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True))
    stamps = []
    while core.has_unfinished_requests():
        for out in core.step():
            stamps += [time.perf_counter()] * len(out.outputs[0].token_ids)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def metroline_throughput(llm: LLM, workload) -> dict:
    prompts = [p for p, _ in workload]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in workload]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(o for _, o in workload)
    n_in = sum(len(p) for p in prompts)
    return {"seconds": dt, "output_tokens": n_out, "prompt_tokens": n_in,
            "output_tok_s": n_out / dt, "total_tok_s": (n_in + n_out) / dt,
            "preemptions": llm.engine.scheduler.num_preemptions}


def hf_load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metroline.model.default import default_model_path

    path = default_model_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


@torch.inference_mode()
def hf_single_stream(model, ids: list[int], n_tokens: int = 64) -> float:
    x = torch.tensor([ids])
    t = time.perf_counter()
    model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(x, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
    return (n_tokens - 1) / (time.perf_counter() - t - t1)


@torch.inference_mode()
def hf_throughput(model, tok, workload, batch_size: int) -> dict:
    order = sorted(range(len(workload)), key=lambda i: len(workload[i][0]))
    t = time.perf_counter()
    for s in range(0, len(order), batch_size):
        batch = [workload[i] for i in order[s:s + batch_size]]
        enc = tok.pad({"input_ids": [p for p, _ in batch]}, return_tensors="pt")
        new = max(o for _, o in batch)
        model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t
    n_out = sum(o for _, o in workload)  # useful tokens only: padding to the batch max is waste
    n_in = sum(len(p) for p, _ in workload)
    return {"batch_size": batch_size, "seconds": dt, "output_tok_s": n_out / dt,
            "total_tok_s": (n_in + n_out) / dt}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ss = res["single_stream"]
    names = ["metroline", "roofline\n(fp32 weights)"] + (["transformers"] if "hf_tok_s" in ss else [])
    vals = [ss["metroline_tok_s"], ss["roofline_tok_s"]] + ([ss["hf_tok_s"]] if "hf_tok_s" in ss else [])
    a1.bar(names, vals, color=["#1f77b4", "#bbbbbb", "#ff7f0e"][:len(vals)])
    a1.set_title(f"single-stream decode (tok/s)\n{ss['fraction_of_roofline']:.0%} of the bandwidth roofline")
    for i, v in enumerate(vals):
        a1.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    th = res["throughput"]
    names = ["metroline"] + [f"HF bs={h['batch_size']}" for h in th.get("hf", [])]
    vals = [th["metroline"]["output_tok_s"]] + [h["output_tok_s"] for h in th.get("hf", [])]
    a2.bar(names, vals, color=["#1f77b4"] + ["#ff7f0e"] * (len(vals) - 1))
    title = f"offline throughput, {th['num_prompts']} ShareGPT prompts (output tok/s)"
    if "ratio_vs_hf_best" in th:
        title += f"\nmetroline / best transformers = {th['ratio_vs_hf_best']:.1f}x"
    a2.set_title(title)
    for i, v in enumerate(vals):
        a2.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", default="8,16,32")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(RESULTS, "offline_throughput"))
    args = ap.parse_args(argv)

    res: dict = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    bw = measure_bandwidth()
    flops = measure_matmul_flops()
    res["machine"].update(bandwidth_gb_s=bw / 1e9, fp32_matmul_gflop_s=flops / 1e9)
    print(f"bandwidth {bw / 1e9:.1f} GB/s, fp32 matmul {flops / 1e9:.0f} GFLOP/s", file=sys.stderr)

    llm = LLM(show_progress=False, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    model = llm.loaded.model
    bpt = weight_bytes_per_token(model)
    n_params = sum(p.numel() for p in model.parameters())
    roof = decode_roofline(bw, bpt, flops, 2 * n_params)
    dec = statistics.median(single_stream_decode(llm) for _ in range(3))
    res["single_stream"] = {"metroline_tok_s": dec, "weight_bytes_per_token": bpt,
                            "weight_dtype": str(next(model.parameters()).dtype),
                            "file_format": llm.loaded.weight_format,
                            "roofline_tok_s": roof["decode_ceiling_tok_s"],
                            "fraction_of_roofline": dec / roof["decode_ceiling_tok_s"],
                            "achieved_bandwidth_gb_s": dec * bpt / 1e9,
                            "compute_bound_batch": roof["compute_bound_batch"]}
    print(f"single stream: {dec:.1f} tok/s = {dec / roof['decode_ceiling_tok_s']:.0%} of "
          f"{roof['decode_ceiling_tok_s']:.1f} tok/s roofline", file=sys.stderr)

    workload = sample_sharegpt(llm.tokenizer, args.num_prompts, args.max_output)
    th = {"num_prompts": len(workload), "max_output": args.max_output,
          "metroline": metroline_throughput(llm, workload)}
    print(f"metroline: {th['metroline']['output_tok_s']:.1f} output tok/s", file=sys.stderr)
    res["throughput"] = th
    del llm

    if not args.skip_hf:
        hf, hf_tok = hf_load()
        res["single_stream"]["hf_tok_s"] = hf_single_stream(hf, workload[0][0])
        th["hf"] = []
        for bs in [int(b) for b in args.hf_batch_sizes.split(",")]:
            th["hf"].append(hf_throughput(hf, hf_tok, workload, bs))
            print(f"transformers bs={bs}: {th['hf'][-1]['output_tok_s']:.1f} output tok/s", file=sys.stderr)
        best = max(th["hf"], key=lambda h: h["output_tok_s"])
        th["ratio_vs_hf_best"] = th["metroline"]["output_tok_s"] / best["output_tok_s"]
        res["single_stream"]["ratio_vs_hf"] = dec / res["single_stream"]["hf_tok_s"]

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    plot(res, args.out + ".png")
    print(json.dumps({k: res[k] for k in ("single_stream", "throughput")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
