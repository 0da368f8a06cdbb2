"""What a grammar costs: output tok/s of the default model with and without a JSON-schema
grammar, at batch 1 and 16, in-process, rounds alternated (plain, grammar, plain, grammar).

Each grammar request asks for a list of up to 6 records ({"name", "age", "city"}); the plain
request generates the same number of tokens (ignore_eos, max_tokens = the grammar run's mean
length), so the difference is the mask work: llguidance's mask per row and step, the bitmask
-> boolean row, the masked copy of the logits, and the sampler's slow path that any logits
processor takes. Also: grammar compile time (cold and cached) and the per-step mask time.

Usage: python benchmarks/structured_outputs.py [--rounds 3] [--threads 2]
Writes benchmarks/results/structured_outputs.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = {"type": "array", "minItems": 6, "maxItems": 6, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 99},
                   "city": {"type": "string", "maxLength": 16}}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "structured_outputs.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from metroline.engine.llm import LLM
    from metroline.engine.request import SamplingParams
    from metroline.structured import GrammarSpec, compile_grammar
    from metroline.structured.grammar_llguidance import backend_for

    llm = LLM(show_progress=False, num_blocks=1024)
    tok = llm.tokenizer
    t = time.perf_counter()
    backend_for(tok)
    tokenizer_s = time.perf_counter() - t
    spec = GrammarSpec.json_schema(SCHEMA)
    t = time.perf_counter()
    grammar = compile_grammar(tok, spec)
    compile_cold_s = time.perf_counter() - t
    t = time.perf_counter()
    compile_grammar(tok, spec)
    compile_cached_s = time.perf_counter() - t
    # Mask time alone, along one valid output.
    proc = grammar.processor().fork()
    out = llm.generate(["People:"], SamplingParams(max_tokens=200, temperature=0, logits_processors=[grammar.processor()]),
                       use_tqdm=False)[0].outputs[0].token_ids
    mask_times = []
    for tid in out:
        if tid in tok.stop_token_ids:
            break
        t = time.perf_counter()
        proc.allowed()
        mask_times.append(time.perf_counter() - t)
        proc.accept([tid])

    prompt = tok.apply_chat_template([{"role": "user", "content": "List six people as JSON: name, age, city."}],
                                     add_generation_prompt=True)

    def run(batch: int, use_grammar: bool, max_tokens: int) -> dict:
        sp = (SamplingParams(max_tokens=400, temperature=0.8, seed=1, logits_processors=[grammar.processor()])
              if use_grammar else SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=1, ignore_eos=True))
        t = time.perf_counter()
        outs = llm.generate([prompt] * batch, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        n = [len(o.outputs[0].token_ids) for o in outs]
        valid = None
        if use_grammar:
            valid = sum(1 for o in outs if _valid(o.outputs[0].text)) / batch
        return {"tokens": sum(n), "mean_tokens": sum(n) / batch, "seconds": dt, "tok_s": sum(n) / dt,
                "valid_fraction": valid}

    result = {"schema": SCHEMA, "threads": args.threads, "load_avg_start": os.getloadavg(),
              "tokenizer_build_s": tokenizer_s, "compile_cold_ms": compile_cold_s * 1e3,
              "compile_cached_ms": compile_cached_s * 1e3,
              "mask_ms_p50": statistics.median(mask_times) * 1e3,
              "mask_ms_p99": sorted(mask_times)[int(0.99 * (len(mask_times) - 1))] * 1e3, "batches": {}}
    for batch in (1, 16):
        rows = {"plain": [], "grammar": []}
        length = None
        for r in range(args.rounds):
            g = run(batch, True, 0)
            length = length or max(8, round(g["mean_tokens"]))
            p = run(batch, False, length)
            rows["grammar"].append(g)
            rows["plain"].append(p)
            print(f"batch {batch} round {r + 1}: plain {p['tok_s']:.1f} tok/s, grammar {g['tok_s']:.1f} tok/s "
                  f"(valid {g['valid_fraction']:.0%}, {g['mean_tokens']:.0f} tokens each)", flush=True)
        med = {k: statistics.median(x["tok_s"] for x in v) for k, v in rows.items()}
        result["batches"][str(batch)] = {"rounds": rows, "median_tok_s": med,
                                         "grammar_over_plain": med["grammar"] / med["plain"]}
    result["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    _plot(result, args.output[:-5] + ".png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("batches", "schema")}, indent=1))
    for b, v in result["batches"].items():
        print(f"batch {b}: plain {v['median_tok_s']['plain']:.1f}, grammar {v['median_tok_s']['grammar']:.1f} "
              f"tok/s ({v['grammar_over_plain']:.2f}x)")
    print(f"wrote {args.output}")


def _valid(text: str) -> bool:
    try:
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except Exception:
        return False


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    batches = list(result["batches"])
    x = range(len(batches))
    for off, key, color in ((-0.2, "plain", "tab:gray"), (0.2, "grammar", "tab:blue")):
        ax.bar([i + off for i in x], [result["batches"][b]["median_tok_s"][key] for b in batches], 0.4,
               label=key, color=color)
    ax.set_xticks(list(x), [f"batch {b}" for b in batches])
    ax.set_ylabel("output tok/s (median of rounds)")
    ax.set_title(f"JSON-schema grammar vs none, {result['threads']} threads\n"
                 f"mask p50 {result['mask_ms_p50']:.2f} ms, compile {result['compile_cold_ms']:.1f} ms cold")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
