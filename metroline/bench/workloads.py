"""Benchmark workloads: programs of one or more streamed calls.

A `Program` is what one simulated user (or agent) does: a sequence of calls, each appending a
message to a history that grows (the assistant's actual replies are appended between calls
by the runner). Single-call datasets (sharegpt, random) are programs of one call.

Builders are deterministic given their seed and inputs; they take any tokenizer with
`encode(text, add_special_tokens=...)`, `decode(ids)` and `len()`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

DATASETS = ("sharegpt", "random", "multiturn", "agent")

AGENT_SYSTEM_HEADER = ("You are an agent that solves tasks by calling tools. Reply with one "
                       "tool call at a time. Available tools and their documentation follow.\n")


@dataclass
class Call:
    content: str  # the message appended to the history before this call
    max_tokens: int  # output length requested (sent as max_tokens with ignore_eos)
    role: str = "user"
    pause_s: float = 0.0  # wait before sending: a tool's run time or a user's think time
    content_tokens: int = 0  # tokens of `content` by the client's tokenizer


@dataclass
class Program:
    id: int
    calls: list[Call]
    system: str | None = None
    system_tokens: int = 0
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"id": self.id, "system_tokens": self.system_tokens,
                "calls": [{"content_tokens": c.content_tokens, "max_tokens": c.max_tokens,
                           "pause_s": c.pause_s, "role": c.role} for c in self.calls]}


def _ntok(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def random_text(tok, n: int, rng: random.Random) -> str:
    """Text of about `n` tokens from random token ids (decoded, re-encoded and cut to `n`)."""
    if n <= 0:
        return ""
    vocab = len(tok)
    lo = min(256, vocab // 4)  # skip the low ids, where byte and special tokens live
    ids = [rng.randrange(lo, vocab) for _ in range(n)]
    ids = tok.encode(tok.decode(ids), add_special_tokens=False)[:n]
    return tok.decode(ids)


def _first_pairs(records: Iterable[dict]) -> list[tuple[str, str]]:
    """(human, gpt) text of each record that opens with a human turn answered by gpt."""
    pairs = []
    for rec in records:
        conv = rec.get("conversations") or []
        if (len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt"
                and isinstance(conv[0].get("value"), str) and isinstance(conv[1].get("value"), str)):
            pairs.append((conv[0]["value"], conv[1]["value"]))
    return pairs


def _sharegpt_records(records: Iterable[dict] | None, scan: int) -> Iterable[dict]:
    if records is not None:
        return records
    from metroline.datasets import iter_sharegpt

    return iter_sharegpt(limit=scan)


def sharegpt_programs(tok, num: int, seed: int = 0, max_output_len: int | None = 128,
                      min_output_len: int = 4, max_input_len: int = 1024, min_input_len: int = 4,
                      records: Iterable[dict] | None = None, scan: int = 5000) -> list[Program]:
    """ShareGPT's opening human turns as prompts, each asking for as many tokens as the real
    reply had (capped at `max_output_len`). Drawn without replacement from the first `scan`
    records in a seeded order."""
    pairs = _first_pairs(_sharegpt_records(records, scan))
    random.Random(seed).shuffle(pairs)
    progs: list[Program] = []
    for prompt, reply in pairs:
        if len(progs) >= num:
            break
        n_in = _ntok(tok, prompt)
        n_out = _ntok(tok, reply)
        if not (min_input_len <= n_in <= max_input_len) or n_out < min_output_len:
            continue
        if max_output_len:
            n_out = min(n_out, max_output_len)
        progs.append(Program(len(progs), [Call(prompt, n_out, content_tokens=n_in)]))
    if len(progs) < num:
        raise ValueError(f"ShareGPT has only {len(progs)} usable prompts of {num} asked "
                         f"(input {min_input_len}..{max_input_len} tokens)")
    return progs


def random_programs(tok, num: int, input_len: int, output_len: int, seed: int = 0) -> list[Program]:
    """Prompts of `input_len` random tokens, each asking for exactly `output_len` tokens."""
    rng = random.Random(seed)
    progs = []
    for i in range(num):
        text = random_text(tok, input_len, rng)
        progs.append(Program(i, [Call(text, output_len, content_tokens=_ntok(tok, text))]))
    return progs


def _truncate(tok, text: str, max_tokens: int) -> tuple[str, int]:
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = tok.decode(ids)
    return text, len(ids)


def multiturn_programs(tok, num: int, seed: int = 0, max_turns: int = 8, min_turns: int = 2,
                       max_output_len: int = 128, max_user_len: int = 256,
                       think_time_s: float = 0.0, records: Iterable[dict] | None = None,
                       scan: int = 5000) -> list[Program]:
    """ShareGPT conversations replayed turn by turn: each human turn (cut to `max_user_len`
    tokens) is one call asking for as many tokens as the real reply had (capped). Only
    conversations with at least `min_turns` human turns are used, up to `max_turns` each."""
    convs = []
    for rec in _sharegpt_records(records, scan):
        conv = rec.get("conversations") or []
        turns = []
        for a, b in zip(conv[::2], conv[1::2]):
            if a.get("from") != "human" or b.get("from") != "gpt":
                break
            if not isinstance(a.get("value"), str) or not isinstance(b.get("value"), str):
                break
            if not a["value"].strip():
                break
            turns.append((a["value"], b["value"]))
        if len(turns) >= min_turns:
            convs.append(turns[:max_turns])
    rng = random.Random(seed)
    rng.shuffle(convs)
    if len(convs) < num:
        raise ValueError(f"only {len(convs)} conversations with >= {min_turns} turns, {num} asked")
    progs = []
    for i, turns in enumerate(convs[:num]):
        calls = []
        for k, (user, reply) in enumerate(turns):
            text, n_in = _truncate(tok, user, max_user_len)
            n_out = max(1, min(_ntok(tok, reply), max_output_len))
            calls.append(Call(text, n_out, pause_s=think_time_s if k else 0.0, content_tokens=n_in))
        progs.append(Program(i, calls))
    return progs


def agent_programs(tok, num: int, seed: int = 0, num_calls: int = 8, output_len: int = 32,
                   tool_output_len: int = 64, tool_pause_s: float = 0.5, system_len: int = 256,
                   task_len: int = 128, records: Iterable[dict] | None = None,
                   scan: int = 2000) -> list[Program]:
    """Agent programs: a system prompt shared by every program (tool documentation), a task
    (a ShareGPT opening turn, cut to `task_len` tokens), then `num_calls` short calls of
    `output_len` tokens; before every call but the first, a tool runs (a pause drawn from an
    exponential distribution of mean `tool_pause_s`) and its output (`tool_output_len` random
    tokens) is appended to the history."""
    rng = random.Random(seed)
    system = AGENT_SYSTEM_HEADER + random_text(tok, max(0, system_len - _ntok(tok, AGENT_SYSTEM_HEADER)), rng)
    system_tokens = _ntok(tok, system)
    tasks = [h for h, _ in _first_pairs(_sharegpt_records(records, scan)) if h.strip()]
    rng.shuffle(tasks)
    if len(tasks) < num:
        raise ValueError(f"only {len(tasks)} tasks available, {num} asked")
    progs = []
    for i in range(num):
        task, n_task = _truncate(tok, tasks[i], task_len)
        calls = [Call(task, output_len, content_tokens=n_task)]
        for _ in range(num_calls - 1):
            result = "Tool output:\n" + random_text(tok, tool_output_len, rng)
            pause = rng.expovariate(1 / tool_pause_s) if tool_pause_s > 0 else 0.0
            calls.append(Call(result, output_len, pause_s=pause, content_tokens=_ntok(tok, result)))
        progs.append(Program(i, calls, system=system, system_tokens=system_tokens))
    return progs


def summarize_programs(progs: list[Program]) -> dict:
    calls = [c for p in progs for c in p.calls]
    return {"num_programs": len(progs), "num_calls": len(calls),
            "calls_per_program_max": max((len(p.calls) for p in progs), default=0),
            "content_tokens_mean": sum(c.content_tokens for c in calls) / max(1, len(calls)),
            "max_tokens_mean": sum(c.max_tokens for c in calls) / max(1, len(calls)),
            "max_tokens_total": sum(c.max_tokens for c in calls),
            "pause_s_total": sum(c.pause_s for c in calls)}
