"""What a grammar costs, and what fast-forward saves: output tok/s of the default model with
and without a JSON-schema grammar, at batch 1 and 16, in-process, rounds alternated (plain,
grammar, grammar + fast-forward, plain, ...), and the decode steps fast-forward saves on a
tool-call workload (tool_choice required over several tool sets).

Each grammar request asks for a list of up to 6 records ({"name", "age", "city"}); the plain
request generates the same number of tokens (ignore_eos, max_tokens = the grammar run's mean
length), so the difference is the mask work: llguidance's mask per row and step, the bitmask
-> boolean row, the masked copy of the logits, and the sampler's slow path that any logits
processor takes; "grammar" runs with fast-forward off, so that this is all it measures. With
fast-forward on (the default), the tokens the grammar forces (keys, separators) are appended
without a decode step each. Also: grammar compile time (cold and cached) and the per-step mask
time.

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

    ff_llm = LLM(show_progress=False, num_blocks=1024)  # fast-forward on: the default
    llm = LLM(loaded=ff_llm.loaded, show_progress=False, num_blocks=1024, grammar_fast_forward=False)
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

    def run(batch: int, use_grammar: bool, max_tokens: int, fast_forward: bool = False) -> dict:
        sp = (SamplingParams(max_tokens=400, temperature=0.8, seed=1, logits_processors=[grammar.processor()])
              if use_grammar else SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=1, ignore_eos=True))
        engine = (ff_llm if fast_forward else llm)
        steps = engine.engine.num_steps
        t = time.perf_counter()
        outs = engine.generate([prompt] * batch, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        steps = engine.engine.num_steps - steps
        n = [len(o.outputs[0].token_ids) for o in outs]
        valid = None
        if use_grammar:
            valid = sum(1 for o in outs if _valid(o.outputs[0].text)) / batch
        return {"tokens": sum(n), "mean_tokens": sum(n) / batch, "seconds": dt, "tok_s": sum(n) / dt,
                "valid_fraction": valid, "steps": steps}

    result = {"schema": SCHEMA, "threads": args.threads, "load_avg_start": os.getloadavg(),
              "tokenizer_build_s": tokenizer_s, "compile_cold_ms": compile_cold_s * 1e3,
              "compile_cached_ms": compile_cached_s * 1e3,
              "mask_ms_p50": statistics.median(mask_times) * 1e3,
              "mask_ms_p99": sorted(mask_times)[int(0.99 * (len(mask_times) - 1))] * 1e3, "batches": {}}
    for batch in (1, 16):
        rows = {"plain": [], "grammar": [], "grammar_ff": []}
        length = None
        for r in range(args.rounds):
            g = run(batch, True, 0)
            length = length or max(8, round(g["mean_tokens"]))
            p = run(batch, False, length)
            f = run(batch, True, 0, fast_forward=True)
            rows["grammar"].append(g)
            rows["plain"].append(p)
            rows["grammar_ff"].append(f)
            print(f"batch {batch} round {r + 1}: plain {p['tok_s']:.1f} tok/s, grammar {g['tok_s']:.1f} tok/s "
                  f"(valid {g['valid_fraction']:.0%}, {g['mean_tokens']:.0f} tokens each), grammar + fast-forward "
                  f"{f['tok_s']:.1f} tok/s (valid {f['valid_fraction']:.0%}, {f['steps']} steps vs {g['steps']})",
                  flush=True)
        med = {k: statistics.median(x["tok_s"] for x in v) for k, v in rows.items()}
        result["batches"][str(batch)] = {"rounds": rows, "median_tok_s": med,
                                         "grammar_over_plain": med["grammar"] / med["plain"],
                                         "grammar_ff_over_plain": med["grammar_ff"] / med["plain"]}
    result["tool_calls"] = _tool_call_workload(llm, ff_llm, args.rounds)
    result["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    _plot(result, args.output[:-5] + ".png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("batches", "schema")}, indent=1))
    for b, v in result["batches"].items():
        m = v["median_tok_s"]
        print(f"batch {b}: plain {m['plain']:.1f}, grammar {m['grammar']:.1f} tok/s ({v['grammar_over_plain']:.2f}x), "
              f"grammar + fast-forward {m['grammar_ff']:.1f} tok/s ({v['grammar_ff_over_plain']:.2f}x)")
    tc = result["tool_calls"]
    print(f"tool calls: {tc['calls']} calls, {tc['steps_off']} steps without fast-forward, {tc['steps_on']} with "
          f"({tc['saved_steps']} saved, {tc['saved_fraction']:.0%}); {tc['seconds_off']:.2f} s vs {tc['seconds_on']:.2f} s")
    print(f"wrote {args.output}")


TOOL_SETS = [
    [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
     {"type": "function", "function": {"name": "get_time"}}],
    [{"type": "function", "function": {"name": "search_flights", "parameters": {
        "type": "object", "properties": {"origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                         "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                         "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["origin", "destination", "passengers"], "additionalProperties": False}}}],
    [{"type": "function", "function": {"name": "create_event", "parameters": {
        "type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                         "day": {"enum": ["monday", "tuesday", "wednesday"]},
                                         "attendees": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                       "maxItems": 3}},
        "required": ["title", "day", "attendees"], "additionalProperties": False}}}],
    [{"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string", "maxLength": 30}},
        "required": ["expression"], "additionalProperties": False}}},
     {"type": "function", "function": {"name": "notebook_write", "parameters": {
         "type": "object", "properties": {"key": {"type": "string", "maxLength": 12},
                                          "value": {"type": "string", "maxLength": 30}},
         "required": ["key", "value"], "additionalProperties": False}}}],
]
ASKS = ["What's the weather in Paris?", "Find flights from JFK to LHR for 2.", "Set up a standup on monday.",
        "What is 17 * 23?"]


def _tool_call_workload(llm, ff_llm, rounds: int) -> dict:
    """tool_choice required, parallel calls allowed, temperature 0, batch 4 (one request per
    tool set): decode steps and seconds with fast-forward off and on, rounds alternated."""
    from metroline.engine.request import SamplingParams
    from metroline.structured import GrammarSpec, compile_grammar
    from metroline.structured.tools import parse_tool_calls, parse_tools, render_messages, tool_call_grammar

    tok = llm.tokenizer
    prompts, params = [], []
    for ask, raw in zip(ASKS, TOOL_SETS):
        tools = parse_tools(raw)
        grammar = compile_grammar(tok, GrammarSpec.lark(tool_call_grammar(tools, "required", None, True)))
        prompts.append(tok.apply_chat_template(render_messages([{"role": "user", "content": ask}], tools, True),
                                               add_generation_prompt=True))
        params.append(SamplingParams(temperature=0, max_tokens=160, logits_processors=[grammar.processor()]))
    res = {"off": [], "on": []}
    for _ in range(rounds):
        for key, engine in (("off", llm), ("on", ff_llm)):
            steps, ff = engine.engine.num_steps, engine.engine.get_stats().fast_forward_tokens
            t = time.perf_counter()
            outs = engine.generate(prompts, params, use_tqdm=False)
            calls = [parse_tool_calls(o.outputs[0].text)[1] for o in outs]
            res[key].append({"seconds": time.perf_counter() - t, "steps": engine.engine.num_steps - steps,
                             "fast_forward_tokens": engine.engine.get_stats().fast_forward_tokens - ff,
                             "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                             "calls": sum(len(c) for c in calls)})
    off, on = res["off"][0], res["on"][0]
    return {"rounds": res, "calls": on["calls"], "steps_off": off["steps"], "steps_on": on["steps"],
            "saved_steps": off["steps"] - on["steps"], "saved_fraction": 1 - on["steps"] / off["steps"],
            "fast_forward_tokens": on["fast_forward_tokens"], "tokens": on["tokens"],
            "seconds_off": statistics.median(r["seconds"] for r in res["off"]),
            "seconds_on": statistics.median(r["seconds"] for r in res["on"])}


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

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    batches = list(result["batches"])
    x = range(len(batches))
    for off, key, color in ((-0.27, "plain", "tab:gray"), (0, "grammar", "tab:blue"),
                            (0.27, "grammar_ff", "tab:green")):
        ax.bar([i + off for i in x], [result["batches"][b]["median_tok_s"][key] for b in batches], 0.27,
               label={"grammar_ff": "grammar + fast-forward"}.get(key, key), color=color)
    ax.set_xticks(list(x), [f"batch {b}" for b in batches])
    ax.set_ylabel("output tok/s (median of rounds)")
    ax.set_title(f"JSON-schema grammar vs none, {result['threads']} threads\n"
                 f"mask p50 {result['mask_ms_p50']:.2f} ms, compile {result['compile_cold_ms']:.1f} ms cold")
    ax.legend()
    tc = result["tool_calls"]
    ax2.bar([0, 1], [tc["steps_off"], tc["steps_on"]], color=["tab:blue", "tab:green"])
    ax2.set_xticks([0, 1], ["fast-forward off", "fast-forward on"])
    ax2.set_ylabel("decode steps")
    ax2.set_title(f"tool-call workload ({tc['calls']} calls, {tc['tokens']} tokens):\n"
                  f"{tc['saved_steps']} steps saved ({tc['saved_fraction']:.0%}), "
                  f"{tc['seconds_off']:.2f} s -> {tc['seconds_on']:.2f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
