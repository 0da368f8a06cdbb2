"""ModelRunner: one scheduler step -> one flat forward pass -> a ModelRunnerOutput.

The batch is the concatenation of every scheduled request's new tokens (known tokens, then
its drafts), decode-like sequences first (a few query tokens over a cache: the attention
backend batches them), then prefill chunks. Logits are computed only for the positions that
need them: the last position of a request that samples this step, and each draft position
of a speculating one. A prefill chunk that does not end its prompt needs none, and the
vocabulary projection is the largest single matmul of a small model.

Drafts are verified here, in the same pass: draft i is accepted while it equals the token the
sampler returns at its position (the argmax, a draw from the target with the position's own
random number, or, for a draft with probabilities, the draft itself with probability
min(1, p/q)); the first mismatch, or the bonus position after k accepted drafts, supplies the
next token.
"""

from __future__ import annotations

import torch

from metroline import faults
from metroline.attention.backend import AttentionBackend, SeqInfo
from metroline.engine.request import ModelRunnerOutput, SampledTokens
from metroline.engine.sampler import Sampler
from metroline.engine.speculative import num_taken
from metroline.model.llama import LlamaForCausalLM
from metroline.platform import threads_for_step


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, num_blocks: int,
                 block_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
        cfg = model.config
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.kv_caches = backend.allocate_kv_cache(cfg.num_hidden_layers, num_blocks, block_size,
                                                   cfg.num_key_value_heads, cfg.head_dim, dtype, device)
        self.sampler = Sampler(cfg.vocab_size, seed)
        # The thread count set at start-up (--threads) is the most a step uses.
        self.max_threads = torch.get_num_threads()
        self._whole_step_kernel = model.runs_layers_in_one_call(backend)

    @staticmethod
    def kv_bytes_per_token(model: LlamaForCausalLM, backend: AttentionBackend, dtype: torch.dtype) -> int:
        """Bytes of K and V per token in `backend`'s cache format (`dtype`: the model's)."""
        cfg = model.config
        return backend.kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype)

    @torch.inference_mode()
    def execute(self, scheduled) -> ModelRunnerOutput:
        """`scheduled`: ScheduledRequests (.request, .num_new_tokens, .start_pos, .block_ids,
        .spec_token_ids, .num_logits)."""
        out = ModelRunnerOutput()
        if not scheduled:
            return out
        # Decode-like first, shortest context first (the attention backend groups them).
        items = sorted(scheduled, key=lambda s: (not self.backend.is_decode_like(s.num_new_tokens, s.start_pos),
                                                 s.start_pos))
        input_ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqInfo] = []
        logit_rows: list[int] = []
        sampling: list = []  # (scheduled request, first logits row)
        for s in items:
            req = s.request
            num_known = s.num_new_tokens - len(s.spec_token_ids)
            input_ids += req.token_ids_slice(s.start_pos, s.start_pos + num_known)
            input_ids += s.spec_token_ids
            positions += range(s.start_pos, s.start_pos + s.num_new_tokens)
            seqs.append(SeqInfo(s.num_new_tokens, s.start_pos, s.block_ids))
            if s.num_logits:
                sampling.append((s, len(logit_rows)))
                logit_rows += range(len(input_ids) - s.num_logits, len(input_ids))
        dev = self.device
        if dev.type == "cpu":
            threads = threads_for_step(len(input_ids), self.max_threads, self._whole_step_kernel)
            if threads != torch.get_num_threads():  # another runner (a draft model's) may have set it
                torch.set_num_threads(threads)
        meta = self.backend.build_metadata(seqs, self.block_size, dev)
        faults.hit("step")
        hidden = self.model(torch.tensor(input_ids, dtype=torch.int64, device=dev),
                            torch.tensor(positions, dtype=torch.int64, device=dev),
                            self.backend, meta, self.kv_caches)
        faults.hit("kernel")  # after the layers wrote this step's KV, before the logits
        if not logit_rows:
            return out
        if len(logit_rows) == len(input_ids):  # every row (a batch of plain decodes): no gather
            logits = self.model.compute_logits(hidden)
        else:
            rows = torch.tensor(logit_rows, dtype=torch.int64, device=dev)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        row_reqs = [s.request for s, _ in sampling for _ in range(s.num_logits)]
        row_drafts = [s.spec_token_ids[:j] for s, _ in sampling for j in range(s.num_logits)]
        row_q = None
        if any(s.spec_probs is not None for s, _ in sampling):
            row_q = [s.spec_probs[j] if s.spec_probs is not None and j < len(s.spec_token_ids) else None
                     for s, _ in sampling for j in range(s.num_logits)]
        results = self.sampler(logits, row_reqs, row_drafts, row_q)
        for s, first in sampling:
            res = results[first:first + s.num_logits]
            res = res[:num_taken([r.token_id for r in res], s.spec_token_ids)]
            error = next((r.error for r in res if r.error), None)
            lps = ([(r.token_id, r.logprob, r.top_logprobs) for r in res]
                   if res[0].logprob is not None else None)
            out.outputs[s.request.request_id] = SampledTokens([r.token_id for r in res], lps, error)
        return out
