"""ModelRunner: one scheduler step -> one flat forward pass -> sampled tokens.

The batch is the concatenation of every scheduled request's new tokens, decodes first (the
attention backend batches them), then prefill chunks. Logits are computed only for the last
token of the requests that sample this step: a prefill chunk that does not end its prompt
needs none, and the vocabulary projection is the largest single matmul of a small model.
"""

from __future__ import annotations

import torch

from metroline.attention.backend import AttentionBackend, SeqInfo
from metroline.engine.request import Request
from metroline.engine.sampler import SampleResult, Sampler
from metroline.model.llama import LlamaForCausalLM


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

    @staticmethod
    def kv_bytes_per_token(model: LlamaForCausalLM, dtype: torch.dtype) -> int:
        cfg = model.config
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem

    @torch.inference_mode()
    def execute(self, scheduled) -> dict[str, SampleResult]:
        """`scheduled`: items with .request, .num_new_tokens, .start_pos, .block_ids, .sample."""
        if not scheduled:
            return {}
        # Decodes first, shortest context first (the attention backend groups them by length).
        items = sorted(scheduled, key=lambda s: (s.num_new_tokens != 1, s.start_pos if s.num_new_tokens == 1 else 0))
        input_ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqInfo] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        for s in items:
            req = s.request
            input_ids += req.token_ids_slice(s.start_pos, s.start_pos + s.num_new_tokens)
            positions += range(s.start_pos, s.start_pos + s.num_new_tokens)
            seqs.append(SeqInfo(s.num_new_tokens, s.start_pos, s.block_ids))
            if s.sample:
                sample_rows.append(len(input_ids) - 1)
                sample_reqs.append(req)
        dev = self.device
        meta = self.backend.build_metadata(seqs, self.block_size, dev)
        hidden = self.model(torch.tensor(input_ids, dtype=torch.int64, device=dev),
                            torch.tensor(positions, dtype=torch.int64, device=dev),
                            self.backend, meta, self.kv_caches)
        if not sample_rows:
            return {}
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=dev)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        results = self.sampler(logits, sample_reqs)
        return {r.request_id: res for r, res in zip(sample_reqs, results)}
