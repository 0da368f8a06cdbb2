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
def logits_of(loaded, ids: list[int], attention: str = "auto") -> torch.Tensor:
    """[len(ids) - 1, vocab] float64 log-probabilities of each next token, teacher-forced
    through the engine's own attention backend (`attention`: "auto", "cpu" or "torch", as
    metroline.platform.resolve_attention_backend takes it) and paged KV cache."""
    from metroline.attention.backend import SeqInfo, get_attention_backend
    from metroline.platform import resolve_attention_backend

    model = loaded.model
    cfg, p = loaded.config, next(model.parameters())
    backend = get_attention_backend(resolve_attention_backend(attention, p.device))
    bs = 16
    nblocks = -(-len(ids) // bs)
    kv = backend.allocate_kv_cache(cfg.num_hidden_layers, nblocks, bs, cfg.num_key_value_heads,
                                   cfg.head_dim, backend.kv_cache_dtype or p.dtype, p.device)
    meta = backend.build_metadata([SeqInfo(len(ids), 0, list(range(nblocks)))], bs, p.device)
    hidden = model(torch.tensor(ids, device=p.device), torch.arange(len(ids), device=p.device), backend, meta, kv)
    return torch.log_softmax(model.compute_logits(hidden[:-1]).double(), -1).cpu()


@dataclass
class Perplexity:
    perplexity: float
    tokens_scored: int


def perplexity(loaded, seqs: list[list[int]], progress: bool = False) -> Perplexity:
    total, n = 0.0, 0
    with progress_bar(len(seqs), "perplexity", progress, unit="seq") as bar:
        for ids in seqs:
            logp = logits_of(loaded, ids)
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


def agreement(reference, loaded, seqs: list[list[int]], progress: bool = False) -> Agreement:
    same, kl, n = 0, 0.0, 0
    with progress_bar(len(seqs), "agreement", progress, unit="seq") as bar:
        for ids in seqs:
            p, q = logits_of(reference, ids), logits_of(loaded, ids)
            same += int((p.argmax(-1) == q.argmax(-1)).sum())
            kl += float((p.exp() * (p - q)).sum())
            n += p.shape[0]
            bar.update(1)
    return Agreement(same / n, kl / n, n)
