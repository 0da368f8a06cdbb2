"""A draft model as a proposer: a small model sharing the target's vocabulary drafts k tokens
greedily, with a paged KV cache of its own kept in step with the target.

Each target request has a shadow request in the draft's own ModelRunner and KV pool. At each
proposal the shadow is brought in step with the target's tokens: the draft KV of the
longest common prefix is kept (accepted drafts were computed already, rejected ones are
rolled back), the rest is computed (the prompt on the first proposal, in chunks as a prefill),
then k greedy decode steps run for all drafting requests together, one batched forward each.
Preemption of the target does not touch the draft KV (the target's tokens are unchanged);
when the draft pool is full, a request simply does not draft this step. Drafts are one-hot
(the draft's argmax), which verification treats exactly (engine/speculative.py).

`layers=N` (self-speculation) builds the draft from the target itself: its embedding, its
first N decoder layers, its final norm and head, sharing the weights (no memory but the
draft KV).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from metroline.engine.request import Request, SamplingParams
from metroline.engine.speculative import Draft, ProposerBase

_DRAFT_PARAMS = SamplingParams(temperature=0, max_tokens=None)


def truncated_model(model, num_layers: int):
    """The target's first num_layers decoder layers as a model of their own (weights shared)."""
    from metroline.model.llama import LlamaForCausalLM

    total = model.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"draft:layers=N needs 1 <= N < {total} (the model's layers)")
    cfg = dataclasses.replace(model.config, num_hidden_layers=num_layers)
    with torch.device("meta"):
        draft = LlamaForCausalLM(cfg, max_positions=1)
    draft.model.embed_tokens = model.model.embed_tokens
    draft.model.layers = nn.ModuleList(list(model.model.layers[:num_layers]))
    draft.model.norm = model.model.norm
    draft.model.rotary_emb = model.model.rotary_emb
    draft.lm_head = model.lm_head
    return draft.eval().requires_grad_(False)


class DraftModelProposer(ProposerBase):
    def __init__(self, model, backend, num_blocks: int, block_size: int, device, dtype,
                 max_chunk: int = 512):
        from metroline.engine.runner import ModelRunner
        from metroline.kv.kv_manager import KVCacheManager

        self.model = model
        self.runner = ModelRunner(model, backend, num_blocks, block_size, device, dtype)
        self.kv = KVCacheManager(num_blocks, block_size, enable_caching=False)
        self.block_size = block_size
        self.max_chunk = max_chunk
        self.shadows: dict[str, Request] = {}
        self.num_catch_up_tokens = 0  # target tokens the draft computed to stay in step

    @classmethod
    def create(cls, spec: str, loaded, core=None, **kwargs) -> "DraftModelProposer":
        """spec: "layers=N" or a model path (loaded like the target)."""
        from metroline.attention.backend import get_attention_backend
        from metroline.platform import resolve_attention_backend

        target = loaded.model
        if spec.startswith("layers="):
            try:
                n = int(spec.removeprefix("layers="))
            except ValueError:
                raise ValueError(f"draft:{spec}: N must be an integer") from None
            model = truncated_model(target, n)
        else:
            from metroline import kernels
            from metroline.model.loader import load_model

            # A checkpoint in 16/32 bits is quantized to Q8_0 at load, as a GGUF is kept packed:
            # the draft runs on the same kernels as the target.
            cpu = next(target.parameters()).device.type == "cpu"
            draft_loaded = load_model(spec, show_progress=False,
                                      weights="packed" if cpu and kernels.available() else "auto")
            if draft_loaded.config.vocab_size != loaded.config.vocab_size:
                raise ValueError(f"draft model {spec} has a vocabulary of {draft_loaded.config.vocab_size} "
                                 f"tokens, the model {loaded.config.vocab_size}: they must share it")
            model = draft_loaded.model
        param = next(target.parameters())
        device, dtype = param.device, param.dtype
        backend = get_attention_backend(resolve_attention_backend("auto", device))
        num_blocks = core.num_blocks if core is not None else 256
        block_size = core.cache_config.block_size if core is not None else 16
        return cls(model, backend, num_blocks, block_size, device, dtype, **kwargs)

    # ------------------------------------------------------------------ in step with the target

    def _sync(self, req: Request) -> Request | None:
        """The request's shadow, its KV valid for the longest prefix it shares with the
        target's tokens; None when the draft pool has no room for it."""
        tokens = req.all_token_ids
        shadow = self.shadows.get(req.request_id)
        if shadow is None:
            shadow = Request(f"draft:{req.request_id}", tokens, _DRAFT_PARAMS, eos_token_ids=frozenset())
            self.shadows[req.request_id] = shadow
        else:
            mine = shadow.all_token_ids[:shadow.num_computed_tokens]
            common = 0
            for a, b in zip(mine, tokens):
                if a != b:
                    break
                common += 1
            if common < shadow.num_computed_tokens:
                self.kv.rollback(shadow, shadow.num_computed_tokens - common)
            shadow.prompt_token_ids = list(tokens)
            shadow.output_token_ids = []
        return shadow

    def _drop(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.kv.free(shadow)

    def request_finished(self, request: Request) -> None:
        self._drop(request.request_id)

    # -------------------------------------------------------------------------- proposing

    def propose(self, request: Request, k: int) -> Draft:
        return self.propose_batch([request], [k])[0]

    def propose_batch(self, requests, ks) -> list[Draft]:
        drafts = {r.request_id: [] for r in requests}
        live = []
        for req, k in zip(requests, ks):
            shadow = self._sync(req)
            # Catch up on the target's tokens (a prompt in chunks), all but the last.
            while shadow.num_tokens - shadow.num_computed_tokens > 1:
                n = min(self.max_chunk, shadow.num_tokens - shadow.num_computed_tokens - 1)
                if self._run([(shadow, n, False)]) is None:
                    self._drop(req.request_id)
                    break
                self.num_catch_up_tokens += n
            else:
                live.append((req, k, shadow))
        for j in range(max((k for _, k, _ in live), default=0)):
            step = [(shadow, 1, True) for req, k, shadow in live if len(drafts[req.request_id]) < k]
            if not step:
                break
            out = self._run(step)
            if out is None:
                break
            for shadow, _, _ in step:
                tok = out[shadow.request_id]
                shadow.output_token_ids.append(tok)
                drafts[shadow.request_id.removeprefix("draft:")].append(tok)
        return [Draft(drafts[r.request_id]) for r in requests]

    def _run(self, items) -> dict[str, int] | None:
        """One draft forward over (shadow, new tokens, sample?) items; the sampled tokens by
        shadow id, or None when the pool has no room for them (nothing computed; slots already
        allocated stay with their shadow)."""
        from metroline.engine.scheduler import ScheduledRequest

        done = []
        for shadow, n, _ in items:
            if self.kv.allocate_slots(shadow, n) is None:
                return None
            done.append(shadow)
        scheduled = [ScheduledRequest(shadow, n, shadow.num_computed_tokens,
                                      self.kv.get_block_ids(shadow.request_id), sample)
                     for shadow, n, sample in items]
        out = self.runner.execute(scheduled)
        for shadow, n, _ in items:
            shadow.num_computed_tokens += n
        return {rid: s.token_ids[0] for rid, s in out.outputs.items()}
