"""Quality of a weight format: perplexity on a fixed held-out ShareGPT slice, and agreement
with a reference (greedy top-1 agreement and mean KL per position, teacher-forced).

The slice: ShareGPT records 2000..2199 (the engine tests and serving benchmarks draw from the
first ~1000), each conversation rendered with the model's chat template and cut to its first
`tokens` tokens, the first `num_seqs` that are at least that long. Every token after the
first is scored through metroline's own paged forward, so what is measured is what the
engine serves (for packed weights: the stored bytes on the C++ kernels, int8 activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metroline.progress import progress as progress_bar

SLICE = "ShareGPT records 2000..2199, chat template, first {tokens} tokens of the first {num_seqs} long enough"


def sharegpt_chat_ids(tok, first: int, last: int):
    """Token ids of ShareGPT records first..last-1, each conversation in the chat template
    (records with no human / gpt turn, or that the template refuses, are skipped)."""
    from metroline.datasets import iter_sharegpt

    for i, rec in enumerate(iter_sharegpt(limit=last)):
        if i < first:
            continue
        msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in rec["conversations"] if t.get("from") in ("human", "gpt")]
        if not msgs:
            continue
        try:
            yield tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
        except Exception:
            continue


def held_out(tok, num_seqs: int = 24, tokens: int = 256, first: int = 2000, count: int = 200) -> list[list[int]]:
    out = []
    for ids in sharegpt_chat_ids(tok, first, first + count):
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == num_seqs:
            break
    return out


@torch.inference_mode()
def logits_of(loaded, ids: list[int], kv_cache_dtype: str = "auto", attention: str = "auto") -> torch.Tensor:
    """[len(ids) - 1, vocab] float64 log-probabilities of each next token, teacher-forced
    through the engine's own attention backend (`attention`: "auto", "cpu" or "torch", as
    metroline.platform.resolve_attention_backend takes it) and paged KV cache (in
    `kv_cache_dtype`, one of config.KV_CACHE_DTYPE_CHOICES: every query reads its keys back
    from the cache)."""
    hidden = hidden_states(loaded, ids, kv_cache_dtype, attention)
    return torch.log_softmax(loaded.model.compute_logits(hidden[:-1]).double(), -1).cpu()


@torch.inference_mode()
def hidden_states(loaded, ids: list[int], kv_cache_dtype: str = "auto", attention: str = "auto") -> torch.Tensor:
    """[len(ids), hidden] final hidden states of one sequence (one prefill through the
    engine's attention backend and a paged KV cache of its own, in `kv_cache_dtype`)."""
    from metroline.attention.backend import SeqInfo, get_attention_backend
    from metroline.platform import resolve_attention_backend, resolve_kv_cache_dtype

    model = loaded.model
    cfg, p = loaded.config, next(model.parameters())
    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
    backend = get_attention_backend(resolve_attention_backend(attention, p.device, kv_dtype), kv_dtype)
    bs = 16
    nblocks = -(-len(ids) // bs)
    kv = backend.allocate_kv_cache(cfg.num_hidden_layers, nblocks, bs, cfg.num_key_value_heads,
                                   cfg.head_dim, p.dtype, p.device)
    meta = backend.build_metadata([SeqInfo(len(ids), 0, list(range(nblocks)))], bs, p.device)
    return model(torch.tensor(ids, device=p.device), torch.arange(len(ids), device=p.device), backend, meta, kv)


@dataclass
class Perplexity:
    perplexity: float
    tokens_scored: int


def perplexity(loaded, seqs: list[list[int]], progress: bool = False, kv_cache_dtype: str = "auto") -> Perplexity:
    total, n = 0.0, 0
    with progress_bar(len(seqs), "perplexity", progress, unit="seq") as bar:
        for ids in seqs:
            logp = logits_of(loaded, ids, kv_cache_dtype)
            target = torch.tensor(ids[1:])
            total -= logp.gather(1, target.unsqueeze(1)).sum().item()
            n += len(ids) - 1
            bar.update(1)
    return Perplexity(math.exp(total / n), n)


@dataclass
class Agreement:
    top1_agreement: float  # share of positions whose argmax equals the reference's
    mean_kl: float  # KL(reference || model) per position, nats
    positions: int


def agreement(reference, loaded, seqs: list[list[int]], progress: bool = False, kv_cache_dtype: str = "auto",
              reference_kv_cache_dtype: str = "auto") -> Agreement:
    """`reference` may be `loaded` itself, with another KV cache format."""
    same, kl, n = 0, 0.0, 0
    with progress_bar(len(seqs), "agreement", progress, unit="seq") as bar:
        for ids in seqs:
            p = logits_of(reference, ids, reference_kv_cache_dtype)
            q = logits_of(loaded, ids, kv_cache_dtype)
            same += int((p.argmax(-1) == q.argmax(-1)).sum())
            kl += float((p.exp() * (p - q)).sum())
            n += p.shape[0]
            bar.update(1)
    return Agreement(same / n, kl / n, n)


@torch.inference_mode()
def decode_tok_s(loaded, steps: int = 48, prompt: int = 32, rounds: int = 3) -> float:
    """Greedy decode speed at batch 1 of the model's own paged forward + lm_head (no engine, no
    sampler): the median over `rounds` of `steps` steps after a `prompt`-token prefill."""
    import statistics
    import time

    from metroline.attention.backend import SeqInfo, get_attention_backend
    from metroline.platform import resolve_attention_backend

    model = loaded.model
    cfg, p = loaded.config, next(model.parameters())
    backend = get_attention_backend(resolve_attention_backend("auto", p.device))
    bs = 16
    nblocks = -(-(prompt + steps) // bs)
    kv = backend.allocate_kv_cache(cfg.num_hidden_layers, nblocks, bs, cfg.num_key_value_heads,
                                   cfg.head_dim, p.dtype, p.device)
    blocks = list(range(nblocks))
    rates = []
    for _ in range(rounds):
        ids = [(31 * i + 7) % cfg.vocab_size for i in range(prompt)]
        meta = backend.build_metadata([SeqInfo(prompt, 0, blocks)], bs, p.device)
        hidden = model(torch.tensor(ids, device=p.device), torch.arange(prompt, device=p.device), backend, meta, kv)
        tok = int(model.compute_logits(hidden[-1:]).argmax(-1))
        t = time.perf_counter()
        for pos in range(prompt, prompt + steps):
            meta = backend.build_metadata([SeqInfo(1, pos, blocks)], bs, p.device)
            hidden = model(torch.tensor([tok], device=p.device), torch.tensor([pos], device=p.device), backend, meta, kv)
            tok = int(model.compute_logits(hidden).argmax(-1))
        rates.append(steps / (time.perf_counter() - t))
    return statistics.median(rates)
