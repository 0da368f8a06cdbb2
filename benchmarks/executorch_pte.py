"""`metroline quantize --to executorch` on the default model, measured: the .pte's size, its
logits from ExecuTorch's own Python runtime against metroline's fp32 forward on the held-out
ShareGPT slice (max |logprob diff|, top-1 agreement, mean KL), and greedy decode tok/s of the
.pte in that runtime (its static KV cache, one token a call) beside metroline's own decode of
the same weights format family (fp32, and the shipped Q4_1 packed), batch 1, same threads.

Needs the executorch extra (a venv of its own, see benchmarks/README.md, "ExecuTorch").
Usage: python benchmarks/executorch_pte.py [--bits 4,8] [--num-seqs 4] [--threads 2]
       [--pte-dir DIR: reuse DIR/smollm2-{bits}.pte when present]
Writes benchmarks/results/executorch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def metroline_decode_tok_s(weights: str, prompt: list[int], tokens: int) -> float:
    from metroline.engine.llm import LLM
    from metroline.engine.request import SamplingParams

    llm = LLM(weights=weights, show_progress=False, num_blocks=64)
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm
    t = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    return len(out.token_ids) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--num-seqs", type=int, default=4)
    ap.add_argument("--seq-tokens", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded for tok/s")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pte-dir", default="/tmp/metroline-pte")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "executorch.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from --output's JSON")
    args = ap.parse_args()
    if args.replot:
        with open(args.output) as fh:
            plot(json.load(fh), args.output[:-5] + ".png")
        return
    torch.set_num_threads(args.threads)

    import executorch

    from metroline.model import executorch_export as et
    from metroline.model.loader import load_model
    from metroline.quant.evaluate import SLICE, held_out

    ref = load_model(None, weights="fp32", device="cpu", show_progress=False, max_model_len=args.max_seq_len)
    seqs = held_out(ref.tokenizer, args.num_seqs, args.seq_tokens)
    prompt = seqs[0][:32]
    result = {"model": ref.source.name, "torch": torch.__version__,
              "executorch": getattr(executorch, "__version__", None) or _version("executorch"),
              "torchao": _version("torchao"), "threads": args.threads,
              "slice": SLICE.format(tokens=args.seq_tokens, num_seqs=len(seqs)),
              "reference": "metroline fp32 weights, engine forward (CPU backend: K/V cache fp16)",
              "decode_tokens": args.tokens, "prompt_tokens": len(prompt), "pte": {}}
    os.makedirs(args.pte_dir, exist_ok=True)
    for bits in [int(b) for b in args.bits.split(",")]:
        path = os.path.join(args.pte_dir, f"smollm2-{bits}.pte")
        row = {}
        if not os.path.exists(path):
            r = et.export_pte(ref.model, path, bits, args.group_size, args.max_seq_len)
            row.update(export_seconds=round(r.seconds, 1), delegated=r.delegated,
                       schemes=dict(sorted(Counter(r.schemes.values()).items())))
        runner = et.PteRunner(path)
        row["bytes"] = os.path.getsize(path)
        row.update(et.compare(runner, ref, seqs))
        runner.greedy(prompt, 4)  # warm
        toks, prefill_s, decode_s = runner.greedy(prompt, args.tokens)
        row["prefill_tok_s"] = len(prompt) / prefill_s
        row["decode_tok_s"] = (len(toks) - 1) / decode_s
        result["pte"][str(bits)] = row
        print(bits, json.dumps(row))
    del ref
    result["metroline_decode_tok_s"] = {w: metroline_decode_tok_s(w, prompt, args.tokens)
                                        for w in ("fp32", "packed")}
    print(json.dumps(result["metroline_decode_tok_s"]))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.output[:-5] + ".png")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pte = result["pte"]
    bits = sorted(pte, key=int)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"pte {b}-bit" for b in bits] + [f"metroline {k}" for k in result["metroline_decode_tok_s"]]
    speeds = [pte[b]["decode_tok_s"] for b in bits] + list(result["metroline_decode_tok_s"].values())
    a1.bar(names, speeds, color=["#cc6677"] * len(bits) + ["#4477aa"] * len(result["metroline_decode_tok_s"]))
    a1.set_ylabel("decode tok/s, batch 1")
    a1.set_title(f"ExecuTorch runtime vs metroline ({result['threads']} threads)")
    a2.bar([f"{b}-bit\n{pte[b]['bytes'] / 1e6:.0f} MB" for b in bits], [pte[b]["top1_agreement"] for b in bits])
    for i, b in enumerate(bits):
        a2.annotate(f"KL {pte[b]['mean_kl']:.3f}", (i, pte[b]["top1_agreement"]), textcoords="offset points",
                    xytext=(0, 3), ha="center", fontsize=8)
    a2.set_ylim(0, 1.05)
    a2.set_ylabel("top-1 agreement with metroline fp32")
    a2.set_title(f".pte quality ({result['slice'][:60]}...)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
