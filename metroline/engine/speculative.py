"""Speculative decoding: proposers that draft tokens, and the policy that says how many.

A proposer drafts k tokens for a request (`propose(request, k)`), optionally with the draft
distribution of each (`Draft.probs`); the engine puts them in `Request.spec_token_ids`, the
runner verifies them in the same forward pass as the request's last token, and the sampler
decides (engine/sampler.py): greedy rows accept while the argmax equals the draft; sampled rows
draw the target token at each position with the position's own random number and accept
while it equals the draft (for a draft without probabilities that *is* rejection sampling
with a one-hot q: accepted with probability p(d), otherwise a token from p with d removed);
a draft with probabilities is accepted with probability min(1, p/q) and otherwise replaced
by a token from the normalized residual (p - q)+. Either way the output has the target's
distribution, and a bonus token follows k accepted drafts.

Proposers here:
- NgramProposer: prompt lookup. The last n tokens (n from max_n down to min_n) are looked
  up earlier in the request's own tokens; the tokens that followed the latest occurrence are
  the draft. Strong where the output copies its input (edits, RAG, tool results).
- SuffixProposer: suffix decoding (arXiv 2411.04975), as a depth-limited suffix tree kept as
  context -> next-token counts, over the request's own tokens and over the outputs of
  recently finished requests, so an agent's repeated call shapes draft themselves. The draft
  follows the most frequent continuation of the longest matching context, as long as its
  estimated probability holds, and its length is bounded by the match length.
- DraftModelProposer (engine/draft_model.py): a small model that shares the vocabulary.
(engine/core.make_proposer builds one from a --speculative method.)

SpeculationPolicy chooses k per request from its recent acceptance and turns speculation off
when the batch is large enough that verifying drafts costs more than it saves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from metroline.engine.request import Request


@dataclass
class Draft:
    token_ids: list[int]
    # [len(token_ids), vocab] draft distribution q of each token; None: one-hot (no probabilities)
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, request: Request, k: int) -> Draft | list[int]: ...


class ProposerBase:
    """Optional hooks the engine calls; a proposer overrides what it needs."""

    def propose_batch(self, requests: Sequence[Request], ks: Sequence[int]) -> list[Draft]:
        return [as_draft(self.propose(r, k)) for r, k in zip(requests, ks)]

    def propose(self, request: Request, k: int) -> Draft | list[int]:
        raise NotImplementedError

    def request_finished(self, request: Request) -> None:
        """The request left the engine (finished or aborted): drop its state, learn from it."""


def num_taken(sampled: Sequence[int], drafts: Sequence[int]) -> int:
    """Verification: `sampled[j]` is the sampler's token at draft position j (len(drafts) + 1
    of them, the last one the bonus position). Drafts are accepted while they equal the token
    sampled at their position; the first mismatch is replaced by that token, and after k
    accepted drafts the bonus token follows. Returns how many of `sampled` the request takes."""
    n = 1
    while n < len(sampled) and sampled[n - 1] == drafts[n - 1]:
        n += 1
    return n


def as_draft(d: Draft | Sequence[int]) -> Draft:
    return d if isinstance(d, Draft) else Draft(list(d))


class NgramProposer(ProposerBase):
    """Prompt lookup over the request's own tokens (prompt and output so far)."""

    def __init__(self, min_n: int = 2, max_n: int = 5):
        assert 1 <= min_n <= max_n
        self.min_n, self.max_n = min_n, max_n
        # request id -> (n-gram -> end position of its latest occurrence, positions indexed)
        self._index: dict[str, tuple[dict[tuple, int], list[int]]] = {}

    def propose(self, request: Request, k: int) -> Draft:
        tokens = request.all_token_ids
        index, done = self._index.setdefault(request.request_id, ({}, [0]))
        L = len(tokens)
        # Index every n-gram that ends before the last token (the last n tokens are the query:
        # their own occurrence must not be found).
        for end in range(done[0], L - 1):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                index[tuple(tokens[end - n + 1:end + 1])] = end
        done[0] = max(done[0], L - 1)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            end = index.get(tuple(tokens[L - n:]))
            if end is not None:
                return Draft(tokens[end + 1:end + 1 + k])
        return Draft([])

    def request_finished(self, request: Request) -> None:
        self._index.pop(request.request_id, None)


class _Counts:
    """Depth-limited suffix tree as counts: context (the last n tokens, n <= depth) -> how often
    each token followed it, with the total and the most frequent one kept up to date (a
    lookup allocates nothing). Sequences can be removed again (a bounded corpus)."""

    def __init__(self, depth: int):
        self.depth = depth
        # context -> [total, most frequent token, its count, {token: count}]
        self.next: dict[tuple, list] = {}

    def add(self, tokens: Sequence[int], start: int = 0, sign: int = 1) -> None:
        """Count the continuations of positions start..len-1 (the token at i follows the
        contexts ending at i - 1); sign -1 removes them again."""
        nxt = self.next
        for i in range(max(1, start), len(tokens)):
            t = tokens[i]
            for n in range(1, min(self.depth, i) + 1):
                key = tuple(tokens[i - n:i])
                rec = nxt.get(key)
                if rec is None:
                    if sign < 0:
                        continue
                    rec = nxt[key] = [0, t, 0, {}]
                counts = rec[3]
                v = counts.get(t, 0) + sign
                rec[0] += sign
                if v > 0:
                    counts[t] = v
                    if v > rec[2]:
                        rec[1], rec[2] = t, v
                    elif t == rec[1]:  # the leader lost a count: find the leader again
                        rec[1], rec[2] = max(counts.items(), key=lambda kv: kv[1])
                else:
                    counts.pop(t, None)
                    if not counts:
                        del nxt[key]
                    elif t == rec[1]:
                        rec[1], rec[2] = max(counts.items(), key=lambda kv: kv[1])


class SuffixProposer(ProposerBase):
    """Suffix decoding over the request's tokens and recent requests' outputs."""

    def __init__(self, depth: int = 8, min_match: int = 2, max_corpus_requests: int = 256,
                 match_factor: float = 2.0, min_prob: float = 0.1):
        self.depth = depth
        self.min_match = min_match
        self.match_factor = match_factor  # draft length <= match_factor * match length
        self.min_prob = min_prob  # stop drafting when the path's estimated probability drops below
        self.corpus = _Counts(depth)  # over finished requests' outputs
        self._corpus_outputs: deque[list[int]] = deque()
        self.max_corpus_requests = max_corpus_requests
        self._local: dict[str, tuple[_Counts, list[int]]] = {}  # request id -> (counts, indexed)

    def _local_counts(self, request: Request) -> tuple[_Counts, list[int]]:
        counts, done = self._local.setdefault(request.request_id, (_Counts(self.depth), [0]))
        tokens = request.all_token_ids
        counts.add(tokens, done[0])
        done[0] = len(tokens)
        return counts, tokens

    def propose(self, request: Request, k: int) -> Draft:
        local, tokens = self._local_counts(request)
        ctx = list(tokens[-self.depth:])
        draft: list[int] = []
        prob = 1.0
        limit = k
        mine, theirs = local.next, self.corpus.next
        while len(draft) < limit:
            for n in range(min(self.depth, len(ctx)), self.min_match - 1, -1):
                key = tuple(ctx[-n:])
                a, b = mine.get(key), theirs.get(key)
                if a is not None or b is not None:
                    break
            else:
                break
            if not draft:  # the first match decides how far the draft may go
                limit = min(k, max(1, int(self.match_factor * n)))
            # The most frequent continuation over both: one of the two leaders.
            total = (a[0] if a else 0) + (b[0] if b else 0)
            tok, c = None, 0
            for cand in {r[1] for r in (a, b) if r}:
                cnt = (a[3].get(cand, 0) if a else 0) + (b[3].get(cand, 0) if b else 0)
                if cnt > c:
                    tok, c = cand, cnt
            prob *= c / total
            if prob < self.min_prob:
                break
            draft.append(tok)
            ctx.append(tok)
        return Draft(draft)

    def reset(self) -> None:
        """Forget every finished request's output (a benchmark's fresh start)."""
        self.corpus = _Counts(self.depth)
        self._corpus_outputs.clear()

    def request_finished(self, request: Request) -> None:
        self._local.pop(request.request_id, None)
        out = list(request.output_token_ids)
        if len(out) < 2:
            return
        # The context a response starts from is the end of its prompt: keep a little of it.
        seq = list(request.prompt_token_ids[-self.depth:]) + out
        self.corpus.add(seq, 1)
        self._corpus_outputs.append(seq)
        while len(self._corpus_outputs) > self.max_corpus_requests:
            self.corpus.add(self._corpus_outputs.popleft(), 1, sign=-1)


class SpeculationPolicy:
    """How many drafts a request gets this step.

    Per request, an exponentially weighted estimate `a` of the chance that a draft token is
    accepted (each verification counts its accepted drafts as successes and a rejection, if
    any, as a failure). With k drafts a request gets 1 + a + ... + a^k tokens from a step on
    average, and its drafts make the step cost 1 + c * k times as much, where c is the extra
    cost of one more query token relative to the step: step_cost at batch 1 (~0.14 on this
    CPU: 5.2 ms for 1 token, 8.1 ms for 5), and at batch B, where the step already yields B
    tokens and costs 1 + batch_slope * (B - 1) times a batch-1 step (~0.2 here: 12.6 ms for
    8), c = step_cost * B / (1 + batch_slope * (B - 1)). k is the value in 0..k_max that gives
    the most tokens per cost, so a larger batch drafts only what is very likely accepted. A
    request whose k is 0 drafts one token every `probe_every` steps, to notice when its text
    turns predictable. Above `max_batch` decoding requests nobody drafts."""

    def __init__(self, k_max: int, max_batch: int | None = 6, adaptive: bool = True,
                 decay: float = 0.8, step_cost: float = 0.14, batch_slope: float = 0.2,
                 prior: float = 0.7, probe_every: int = 4):
        self.k_max = k_max
        self.max_batch = max_batch
        self.adaptive = adaptive
        self.decay = decay
        self.step_cost = step_cost
        self.batch_slope = batch_slope
        self.prior = prior  # acceptance assumed before a request's first verification
        self.probe_every = probe_every
        self._stats: dict[str, tuple[float, float]] = {}  # request id -> (successes, trials), decayed
        self._skipped: dict[str, int] = {}
        self._seen: dict[str, tuple[int, int]] = {}

    def acceptance(self, request_id: str) -> float:
        s, n = self._stats.get(request_id, (0.0, 0.0))
        return (s + self.prior) / (n + 1)  # one prior pseudo-trial

    def draft_cost(self, batch_size: int) -> float:
        """Extra cost of one draft token relative to the step, at this batch size."""
        return self.step_cost * batch_size / (1 + self.batch_slope * (batch_size - 1))

    def best_k(self, a: float, batch_size: int = 1) -> int:
        c = self.draft_cost(max(1, batch_size))
        best, best_rate, gain, term = 0, 1.0, 1.0, 1.0
        for k in range(1, self.k_max + 1):
            term *= a
            gain += term
            rate = gain / (1 + c * k)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def num_drafts(self, request: Request, batch_size: int) -> int:
        if self.max_batch is not None and batch_size > self.max_batch:
            return 0
        if not self.adaptive:
            return self.k_max
        k = self.best_k(self.acceptance(request.request_id), batch_size)
        if k == 0:
            skipped = self._skipped.get(request.request_id, 0) + 1
            if skipped < self.probe_every:
                self._skipped[request.request_id] = skipped
                return 0
            self._skipped[request.request_id] = 0
            return 1
        return k

    def observe(self, request: Request) -> None:
        """After a step in which the request verified drafts (its running totals moved)."""
        rid = request.request_id
        seen_d, seen_a = self._seen.get(rid, (0, 0))
        drafted, accepted = request.num_spec_drafted - seen_d, request.num_spec_accepted - seen_a
        self._seen[rid] = (request.num_spec_drafted, request.num_spec_accepted)
        if drafted > 0:
            trials = accepted + (1 if accepted < drafted else 0)
            s, n = self._stats.get(rid, (0.0, 0.0))
            self._stats[rid] = (self.decay * s + accepted, self.decay * n + trials)

    def forget(self, request_id: str) -> None:
        self._stats.pop(request_id, None)
        self._skipped.pop(request_id, None)
        self._seen.pop(request_id, None)
