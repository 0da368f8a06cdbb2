"""Per-request logits processors (a grammar mask is one): how they are built and told of tokens.

A processor is a callable `(output_token_ids, logits_row) -> logits_row`. A plain function is
stateless and may be shared. A stateful one subclasses LogitsProcessor: each sample of a
request gets its own copy (`fork`), and the engine tells it which tokens were accepted and,
after speculative verification, how many it saw that were rolled back. A processor that
raises fails only its own request.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

ProcessorFn = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


class LogitsProcessor:
    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accept(self, token_ids: Sequence[int]) -> None:
        """These tokens were appended to the request's output (in order)."""

    def rollback(self, num_tokens: int) -> None:
        """Forget the last num_tokens tokens given to accept() (rejected drafts)."""

    def fork(self) -> "LogitsProcessor":
        """A fresh copy for another sample of the same request (n > 1)."""
        return copy.deepcopy(self)


class MaskingProcessor(LogitsProcessor):
    """A processor that only forbids tokens (a grammar). The sampler collects a step's masking
    processors and asks each class for all of its masks in one call (`allowed_batch`, which
    may compute them in parallel, off the GIL), then applies them in one op, after the
    request's other processors."""

    def allowed(self) -> torch.Tensor:
        """Boolean [vocab] row: the tokens that may come next."""
        raise NotImplementedError

    @classmethod
    def allowed_batch(cls, processors: Sequence["MaskingProcessor"]) -> torch.Tensor:
        """Boolean [len(processors), vocab]; default: one at a time."""
        return torch.stack([p.allowed() for p in processors])

    def allowed_ahead(self, drafts: Sequence[int]) -> torch.Tensor:
        """Boolean [len(drafts) + 1, vocab]: the mask now and after each draft token (for
        speculative verification). The state is left as it was. Once a draft is not allowed,
        the later rows repeat the last mask (verification stops at that draft anyway)."""
        rows = [self.allowed()]
        taken = 0
        try:
            for t in drafts:
                if not (0 <= t < rows[-1].shape[0] and bool(rows[-1][t])):
                    break
                self.accept([t])
                taken += 1
                rows.append(self.allowed())
        finally:
            self.rollback(taken)
        rows += [rows[-1]] * (len(drafts) + 1 - len(rows))
        return torch.stack(rows)

    def forced(self) -> list[int]:
        """Tokens that are the only continuation the processor allows from here (in order);
        the engine appends them without sampling (grammar fast-forward). Default: none."""
        return []

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        allowed = fit_mask(self.allowed(), logits.shape[-1])
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def fit_mask(allowed: torch.Tensor, vocab: int) -> torch.Tensor:
    """A mask ([..., n] boolean) cut or padded with False to the logits' width: the model's
    head may be wider than the tokenizer's vocabulary."""
    n = allowed.shape[-1]
    if n < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(*allowed.shape[:-1], vocab - n)], dim=-1)
    return allowed[..., :vocab]


def build_processors(specs: Sequence) -> list:
    """One sample's processors: stateful ones forked, plain functions shared."""
    return [p.fork() if isinstance(p, LogitsProcessor) else p for p in specs]


def notify_accept(processors: Sequence, token_ids: Sequence[int]) -> None:
    for p in processors:
        if isinstance(p, LogitsProcessor):
            p.accept(token_ids)


def forced_tokens(processors: Sequence) -> list[int]:
    """The tokens a request's processors force next: only when its one processor is a mask
    (another processor could see the forced tokens differently)."""
    if len(processors) == 1 and isinstance(processors[0], MaskingProcessor):
        return list(processors[0].forced())
    return []


def can_look_ahead(processors: Sequence) -> bool:
    """Whether a request's processors can score draft positions: masks (allowed_ahead) and
    plain functions of the token ids; a stateful processor of another kind cannot."""
    return all(isinstance(p, MaskingProcessor) or not isinstance(p, LogitsProcessor) for p in processors)


def notify_rollback(processors: Sequence, num_tokens: int) -> None:
    if num_tokens:
        for p in processors:
            if isinstance(p, LogitsProcessor):
                p.rollback(num_tokens)
