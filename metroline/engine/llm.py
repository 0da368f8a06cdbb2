"""Offline API: `LLM(model=...).generate(prompts, SamplingParams)`."""

from __future__ import annotations

import itertools
from typing import Sequence

from metroline.config import CacheConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from metroline.engine.core import EngineCore
from metroline.engine.request import CompletionOutput, RequestHints, RequestOutput, SamplingParams


def accumulate(final: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a delta RequestOutput into the accumulated one."""
    if final is None:
        final = RequestOutput(delta.request_id, delta.prompt_token_ids, [], False)
    by_index = {o.index: o for o in final.outputs}
    for d in delta.outputs:
        o = by_index.get(d.index)
        if o is None:
            o = by_index[d.index] = CompletionOutput(d.index, "", [], logprobs=[] if d.logprobs is not None else None)
        o.text += d.text
        o.token_ids = o.token_ids + list(d.token_ids)
        if d.logprobs is not None:
            o.logprobs = (o.logprobs or []) + list(d.logprobs)
        o.finish_reason, o.stop_reason = d.finish_reason or o.finish_reason, d.stop_reason or o.stop_reason
    final.outputs = [by_index[i] for i in sorted(by_index)]
    final.finished = delta.finished
    final.num_cached_tokens = max(final.num_cached_tokens, delta.num_cached_tokens)
    final.error = delta.error or final.error
    return final


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "auto",
                 weights: str = "auto", quant_method: str = "rtn", imatrix: str | None = None,
                 max_model_len: int | None = None, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory: int | None = None, enable_prefix_caching: bool = True,
                 host_kv_cache_memory: int | None = None, kv_cache_dtype: str = "auto",
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 64, policy="fcfs",
                 enable_chunked_prefill: bool = True, grammar_fast_forward: bool = True, seed: int = 0,
                 speculative: str | SpeculativeConfig | None = None, num_speculative_tokens: int = 4,
                 show_progress: bool = True, loaded=None):
        """`speculative`: "ngram", "suffix" or "draft:MODEL" (or a SpeculativeConfig) turns on
        speculative decoding with up to `num_speculative_tokens` drafts per step.
        `quant_method` "imatrix" (with weights q8_0 / q4_0 / q4_1) quantizes importance-weighted
        (metroline.quant.calibrate; `imatrix`: the importance file to read or write)."""
        from metroline.model.loader import load_model

        if isinstance(speculative, str):
            speculative = SpeculativeConfig(method=speculative, num_speculative_tokens=num_speculative_tokens)
        self.model_config = ModelConfig(model=model, dtype=dtype, device=device, weights=weights,
                                        quant_method=quant_method, imatrix=imatrix,
                                        max_model_len=max_model_len, seed=seed)
        self.loaded = loaded or load_model(model, dtype=dtype, device=device, weights=weights,
                                           quant_method=quant_method, imatrix=imatrix,
                                           max_model_len=max_model_len, show_progress=show_progress)
        self.tokenizer = self.loaded.tokenizer
        self.engine = EngineCore(
            self.loaded,
            CacheConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_memory=kv_cache_memory,
                        enable_prefix_caching=enable_prefix_caching,
                        host_kv_cache_memory=host_kv_cache_memory, kv_cache_dtype=kv_cache_dtype),
            SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                            max_model_len=max_model_len, policy=policy,
                            enable_chunked_prefill=enable_chunked_prefill,
                            grammar_fast_forward=grammar_fast_forward),
            self.model_config, speculative_config=speculative)
        self._ids = itertools.count()

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            return list(prompt["prompt_token_ids"])
        return list(prompt)

    def generate(self, prompts: str | Sequence, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt_token_ids": [...]}) in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = []
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            rid = f"gen-{next(self._ids)}"
            self.engine.add_request(rid, self._encode(p), sp,
                                    RequestHints(priority=priority[i] if priority else 0))
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             *, use_tqdm: bool = True) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c, add_generation_prompt=True),
                                         add_special_tokens=False) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        pending = set(ids)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req", delay=1.0, leave=False)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id not in pending and out.request_id not in results:
                        continue
                    results[out.request_id] = accumulate(results.get(out.request_id), out)
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in pending:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in ids]
