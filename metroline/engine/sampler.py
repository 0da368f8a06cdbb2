"""Batched sampling with per-request parameters.

Order of operations on each row of logits (float32):
  logits processors -> logit_bias -> repetition / presence / frequency penalties
  -> min_tokens mask (EOS and stop ids) -> [logprobs are taken here] -> greedy argmax, or
  temperature -> top-k -> top-p -> min-p -> draw.
A sampled row draws by inverse CDF with one uniform number. A seeded request's number for
output position t is a hash of (seed, t) (position_uniform), so it samples the same tokens
whatever else shares its batch, and with or without speculative decoding: a draft is accepted
when the token drawn at its position equals it, which for drafts without probabilities is
exact rejection sampling (see engine/speculative.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from metroline.engine.processors import MaskingProcessor, fit_mask
from metroline.engine.request import Request
from metroline.errors import processor_failure


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None  # the request's logits processor raised: it fails alone


_MASK64 = 2**64 - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a well-mixed 64-bit value from any 64-bit input."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def position_uniform(seed: int, position: int, stream: int = 0) -> float:
    """A uniform number in [0, 1) for one output position of a seeded request: a function of
    (seed, position, stream) alone, so the token at a position does not depend on how many
    positions were drawn before it (drafts verified and thrown away, batch composition)."""
    x = _mix64((seed * 0x9E3779B97F4A7C15 + position) & _MASK64)
    x = _mix64((x + stream * 0xD1B54A32D192ED03) & _MASK64)
    return (x >> 11) * 2.0**-53


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self._default_gen = torch.Generator().manual_seed(seed)

    def _uniform(self, req: Request, position: int, stream: int = 0) -> float:
        """The random number of a row: a seeded request's from its seed and the position (its
        siblings of n > 1 get distinct streams; any Python int is a valid seed), the others'
        from the engine's generator."""
        seed = req.sampling_params.seed
        if seed is None:
            return float(torch.rand(1, dtype=torch.float64, generator=self._default_gen))
        return position_uniform((seed + 1_000_003 * req.sample_index) & _MASK64, position, stream)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, reqs: Sequence[Request],
                 drafts: Sequence[Sequence[int]] | None = None,
                 draft_probs: Sequence[torch.Tensor | None] | None = None) -> list[SampleResult]:
        """One token per row. `drafts[i]`: the draft tokens before row i's position (a
        speculating request has rows for [], [d0], [d0, d1], ...); processors, masks, penalties
        and min_tokens see the output as if those drafts were accepted. `draft_probs[i]`: the
        draft distribution q of the draft at row i's position, when its proposer has one: the
        row then accepts that draft with probability min(1, p/q) or returns a token from the
        residual (p - q)+ (see engine/speculative.py)."""
        B, V = logits.shape
        params = [r.sampling_params for r in reqs]
        errors: dict[int, str] = {}
        drafts = drafts if drafts is not None and any(drafts) else None
        positions = [r.num_output_tokens + (len(drafts[i]) if drafts is not None else 0)
                     for i, r in enumerate(reqs)]
        checks = None
        if draft_probs is not None and any(q is not None for q in draft_probs):
            checks = {i: q for i, q in enumerate(draft_probs) if q is not None}
        if not any(_edits_logits(r, sp) for r, sp in zip(reqs, params)):
            # The common case (no processor, bias, penalty or min_tokens mask): nothing edits
            # the rows, so no copy of the [B, vocab] logits and no per-request loop.
            return self._draw(logits.float(), reqs, params, errors, positions, checks)
        # Work on a float32 copy: the caller's tensor is never modified.
        logits = logits.to(torch.float32, copy=True)
        maskers: list[tuple[int, MaskingProcessor]] = []
        ahead: dict[int, tuple[MaskingProcessor, list[int]]] = {}  # masks at draft positions
        for i, (r, sp) in enumerate(zip(reqs, params)):
            prefix = drafts[i] if drafts is not None else ()
            try:
                for proc in r.logits_processors:
                    if isinstance(proc, MaskingProcessor):
                        if drafts is not None and _speculates(reqs, drafts, i):
                            ahead.setdefault(id(proc), (proc, []))[1].append(i)
                        else:
                            maskers.append((i, proc))  # all of the step's masks at once, below
                    else:
                        ids = r.output_token_ids if not prefix else [*r.output_token_ids, *prefix]
                        logits[i] = proc(ids, logits[i])
            except Exception as e:
                errors[i] = processor_failure(e)
                logits[i] = 0.0  # any finite row: its token is discarded
            if sp.logit_bias:
                ids = torch.tensor(list(sp.logit_bias.keys()), dtype=torch.int64)
                vals = torch.tensor(list(sp.logit_bias.values()), dtype=logits.dtype)
                logits[i].index_add_(0, ids.to(logits.device), vals.to(logits.device))
        if maskers:
            self._apply_masks(logits, [(i, p) for i, p in maskers if i not in errors], errors)
        for proc, rows in ahead.values():
            rows = [i for i in rows if i not in errors]
            if not rows:
                continue
            try:  # one request's rows: the mask after each prefix of its drafts
                masks = fit_mask(proc.allowed_ahead(drafts[rows[-1]]), V)
            except Exception as e:
                for i in rows:
                    errors[i] = processor_failure(e)
                    logits[i] = 0.0
                continue
            for i in rows:
                logits[i].masked_fill_(~masks[len(drafts[i])].to(logits.device), float("-inf"))
        self._apply_penalties(logits, reqs, drafts)
        for i, (r, sp) in enumerate(zip(reqs, params)):
            if r.num_output_tokens + (len(drafts[i]) if drafts is not None else 0) < sp.min_tokens:
                banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(r.eos_token_ids))
                if banned:
                    logits[i, list(banned)] = float("-inf")

        return self._draw(logits, reqs, params, errors, positions, checks)

    def _draw(self, logits: torch.Tensor, reqs, params, errors: dict[int, str], positions: list[int],
              checks: dict[int, torch.Tensor] | None = None) -> list[SampleResult]:
        """Logprobs, then the greedy / sampled token of every row (one host transfer)."""
        want_lp = [sp.logprobs is not None for sp in params]
        logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

        tokens = logits.argmax(dim=-1)
        sample_rows = [i for i, sp in enumerate(params) if not sp.greedy]
        if sample_rows:
            idx = torch.tensor(sample_rows, dtype=torch.int64, device=logits.device)
            sub = logits.index_select(0, idx)
            temps = torch.tensor([params[i].temperature for i in sample_rows], device=logits.device)
            sub = sub / temps.unsqueeze(1)
            sub = self._filter(sub, [params[i] for i in sample_rows])
            probs = torch.softmax(sub, dim=-1)
            # Inverse-CDF sampling: one uniform number per row, not one per vocabulary entry
            # (an exponential draw per token cost ~1.1 ms a row on the CPU generator, more than
            # a whole batch-1 decode step of this model). The cumulative sum is in float64, and
            # `right=True` finds the first token whose cumulative mass exceeds u, so a token of
            # probability 0 (filtered out) is never chosen. The generators live on the CPU (a
            # CUDA tensor cannot draw from a CPU generator), which also makes a seeded request
            # draw the same tokens on any device.
            cdf = probs.double().cumsum(dim=-1)
            u = torch.tensor([self._uniform(reqs[i], positions[i]) for i in sample_rows], dtype=torch.float64)
            u = u.to(probs.device).unsqueeze(1) * cdf[:, -1:]
            tokens[idx] = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max_(probs.shape[1] - 1)
            if checks:
                self._check_drafts(tokens, probs, sample_rows, reqs, positions, checks)

        tok_list = tokens.tolist()
        results = []
        for i, t in enumerate(tok_list):
            res = SampleResult(t, error=errors.get(i))
            if want_lp[i]:
                row = logprobs[i]
                res.logprob = float(row[t])
                k = params[i].logprobs
                if k:
                    vals, ids = row.topk(k)
                    res.top_logprobs = list(zip(ids.tolist(), vals.tolist()))
                else:
                    res.top_logprobs = []
            results.append(res)
        return results

    def _check_drafts(self, tokens, probs, sample_rows, reqs, positions, checks) -> None:
        """Rows whose draft came with its probability q: accept the draft d with probability
        min(1, p(d) / q(d)), otherwise draw from (p - q)+ normalized (stream 1 of the row's
        random numbers; stream 0 decided the acceptance)."""
        for k, i in enumerate(sample_rows):
            q = checks.get(i)
            if q is None:
                continue
            d = self._draft_at(reqs[i], positions[i])
            if d is None:
                continue
            p = probs[k].double()
            q = q.to(p.device, torch.float64)
            if self._uniform(reqs[i], positions[i]) * float(q[d]) < float(p[d]):
                tokens[i] = d
                continue
            residual = (p - q).clamp_min_(0)
            total = float(residual.sum())
            if total <= 0:  # p == q: any draft would have been accepted; keep the sample
                continue
            cdf = residual.cumsum(0)
            u = self._uniform(reqs[i], positions[i], stream=1) * float(cdf[-1])
            tokens[i] = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64, device=p.device),
                                               right=True).clamp_max_(p.shape[0] - 1))

    @staticmethod
    def _draft_at(req: Request, position: int) -> int | None:
        """The draft token at output position `position` of a speculating request."""
        j = position - req.num_output_tokens
        return req.spec_token_ids[j] if 0 <= j < len(req.spec_token_ids) else None

    @staticmethod
    def _apply_masks(logits: torch.Tensor, maskers: list, errors: dict[int, str]) -> None:
        """Each masking class computes its rows' masks in one call; one masked_fill for all.
        If a class's batch call fails, its processors are asked one by one, so only the
        failing requests fail."""
        by_class: dict[type, list] = {}
        for i, p in maskers:
            by_class.setdefault(type(p), []).append((i, p))
        rows, masks = [], []
        for cls, items in by_class.items():
            try:
                m = cls.allowed_batch([p for _, p in items])
                rows += [i for i, _ in items]
                masks.append(m)
            except Exception:
                for i, p in items:
                    try:
                        masks.append(p.allowed().unsqueeze(0))
                        rows.append(i)
                    except Exception as e:
                        errors[i] = processor_failure(e)
                        logits[i] = 0.0
        if not rows:
            return
        m = torch.cat(masks)
        if len(set(rows)) < len(rows):  # a request with several masks: all of them apply
            combined: dict[int, torch.Tensor] = {}
            for r, row in zip(rows, m):
                combined[r] = combined[r] & row if r in combined else row
            rows, m = list(combined), torch.stack(list(combined.values()))
        forbid = ~fit_mask(m, logits.shape[1]).to(logits.device)
        if rows == list(range(logits.shape[0])):  # every row masked: one in-place op
            logits.masked_fill_(forbid, float("-inf"))
        else:  # in place on our own copy, row by row: no gather and scatter of [k, vocab]
            for r, f in zip(rows, forbid):
                logits[r].masked_fill_(f, float("-inf"))

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: Sequence[Request], drafts=None) -> None:
        for i, r in enumerate(reqs):
            sp = r.sampling_params
            prefix = list(drafts[i]) if drafts is not None else []
            if sp.repetition_penalty != 1.0:
                # As in HF/vLLM: over prompt and output tokens; divides positive logits.
                seen = torch.tensor(sorted(set(r.all_token_ids + prefix)), dtype=torch.int64, device=logits.device)
                if seen.numel():
                    vals = logits[i, seen]
                    logits[i, seen] = torch.where(vals > 0, vals / sp.repetition_penalty,
                                                  vals * sp.repetition_penalty)
            if (sp.presence_penalty or sp.frequency_penalty) and (r.output_token_ids or prefix):
                # As in OpenAI: over generated tokens only.
                out = torch.tensor(r.output_token_ids + prefix, dtype=torch.int64, device=logits.device)
                counts = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
                counts.index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
                logits[i] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0)

    @staticmethod
    def _filter(logits: torch.Tensor, params) -> torch.Tensor:
        """top-k, top-p and min-p on temperature-scaled logits (rows that need none pass as is)."""
        need_sort = [sp.top_k > 0 or sp.top_p < 1.0 for sp in params]
        if any(need_sort):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            V = logits.shape[1]
            top_k = torch.tensor([sp.top_k if sp.top_k > 0 else V for sp in params], device=logits.device)
            ranks = torch.arange(V, device=logits.device).unsqueeze(0)
            sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
            if any(sp.top_p < 1.0 for sp in params):
                # top-p sees the distribution that top-k left (renormalized), as in HF and vLLM.
                # Keep the smallest prefix whose mass reaches top_p (the top token always stays);
                # a row with top_p = 1 keeps everything, whatever the rounding of the cumsum.
                top_p = torch.tensor([sp.top_p for sp in params], device=logits.device).unsqueeze(1)
                probs = torch.softmax(sorted_logits, dim=-1)
                remove = ((probs.cumsum(dim=-1) - probs) >= top_p) & (top_p < 1.0)
                sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        min_p = [sp.min_p for sp in params]
        if any(m > 0 for m in min_p):
            probs = torch.softmax(logits, dim=-1)
            thresh = torch.tensor(min_p, device=logits.device).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < thresh, float("-inf"))
        return logits


def _speculates(reqs: Sequence[Request], drafts: Sequence[Sequence[int]], i: int) -> bool:
    """Row i belongs to a request that has rows at draft positions this step."""
    return bool(drafts[i]) or (i + 1 < len(reqs) and reqs[i + 1] is reqs[i] and bool(drafts[i + 1]))


def _edits_logits(r: Request, sp) -> bool:
    return bool(r.logits_processors or sp.logit_bias or sp.repetition_penalty != 1.0
                or sp.presence_penalty or sp.frequency_penalty
                or (r.num_output_tokens < sp.min_tokens
                    and (sp.stop_token_ids or (not sp.ignore_eos and r.eos_token_ids))))
