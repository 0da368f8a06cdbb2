"""decode_layers (every decoder layer in one C++ call) against the op-by-op path it replaces.

Both run the same kernels in the same order, so they must agree bit for bit: hidden states,
logits and the KV cache they leave, for prefill chunks, decodes over long contexts (split
attention items and their merge), speculative-style q_len > 1 steps, batched requests, every
weight format and SIMD path, and 1 or 2 threads. METROLINE_DECODE_LAYERS=0 selects the
op-by-op path."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from metroline import kernels
from metroline.attention.backend import CpuPagedAttentionBackend, SeqInfo
from metroline.engine.llm import LLM
from metroline.engine.request import SamplingParams
from metroline.kernels import fused
from metroline.kernels import layers as klayers
from metroline.model.loader import load_model
from tests.model.test_model_vs_hf import _tiny_prompt, paged_logits, tiny_tokenizer, write_tiny_gguf  # noqa: F401

pytestmark = pytest.mark.skipif(not klayers.available(), reason="C++ kernels not built")


def both_paths(monkeypatch, fn):
    """fn() on the op-by-op path, then on decode_layers."""
    monkeypatch.setenv("METROLINE_DECODE_LAYERS", "0")
    ref = fn()
    monkeypatch.setenv("METROLINE_DECODE_LAYERS", "1")
    return ref, fn()


def with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def caches_after(loaded, ids, chunks, block_size=16, kv_cache_dtype=None):
    """Logits and the KV cache left by running ids in `chunks` steps on the CPU backend."""
    model, cfg = loaded.model, loaded.config
    backend = CpuPagedAttentionBackend(kv_cache_dtype)
    need = -(-len(ids) // block_size)
    block_ids = list(range(need, 0, -1))  # out of order: a wrong slot shows
    kv = backend.allocate_kv_cache(cfg.num_hidden_layers, need + 1, block_size, cfg.num_key_value_heads,
                                   cfg.head_dim, torch.float32, torch.device("cpu"))
    for k, v in kv:
        k.zero_()
        v.zero_()
    out, start = [], 0
    for n in chunks:
        meta = backend.build_metadata([SeqInfo(n, start, block_ids)], block_size, torch.device("cpu"))
        with torch.inference_mode():
            hidden = model(torch.tensor(ids[start:start + n]), torch.arange(start, start + n), backend, meta, kv)
            out.append(model.compute_logits(hidden))
        start += n
    return torch.cat(out), kv


def assert_both_paths_identical(monkeypatch, loaded, ids, chunks, threads=(1, 2), kv_cache_dtype=None):
    """For every SIMD path this CPU runs and each thread count: the op-by-op path and
    decode_layers give the same logits and leave the same KV cache, bit for bit."""
    for isa in fused.supported_isas():
        for n in threads:
            def run():
                with kernels.force_isa(isa):
                    return with_threads(n, lambda: caches_after(loaded, ids, chunks, kv_cache_dtype=kv_cache_dtype))
            (ref_logits, ref_kv), (logits, kv) = both_paths(monkeypatch, run)
            assert torch.isfinite(logits).all()
            assert torch.equal(logits, ref_logits), (isa, n)
            for (k0, v0), (k1, v1) in zip(ref_kv, kv):
                assert kv_cache_dtype is None or k0.dtype == kv_cache_dtype
                assert torch.equal(k0, k1) and torch.equal(v0, v1), (isa, n)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_tiny_model_every_format_isa_and_thread_count(qtype, tiny_tokenizer, tmp_path, monkeypatch):
    tok = tiny_tokenizer[1]
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_gguf(path, tok, Q[qtype], tied=True, seed=3)
    loaded = load_model(str(path), device="cpu", show_progress=False, weights="packed")
    assert loaded.model._layer_stack([]) is not None, "the tiny packed model should run in decode_layers"
    ids = _tiny_prompt(tok, 60)
    chunks = [37, 1, 3, 1, 18]
    assert_both_paths_identical(monkeypatch, loaded, ids, chunks)


def test_int8_kv_cache_bit_identical(tiny_tokenizer, tmp_path, monkeypatch):
    """int8 K/V rows (written by the fused RoPE, read by attention): same logits and bytes."""
    tok = tiny_tokenizer[1]
    path = tmp_path / "tiny-q4_0.gguf"
    write_tiny_gguf(path, tok, Q.Q4_0, tied=True, seed=5)
    loaded = load_model(str(path), device="cpu", show_progress=False, weights="packed")
    ids = _tiny_prompt(tok, 60)
    assert_both_paths_identical(monkeypatch, loaded, ids, [37, 1, 3, 1, 18], threads=(2,), kv_cache_dtype=torch.int8)


def test_default_model_long_context_bit_identical(default_loaded, monkeypatch):
    """600-token prefill chunk, then decodes and a 3-token step over > 512 keys: attention
    items are split and merged inside decode_layers as in paged_attention_decode."""
    if default_loaded.model._layer_stack([]) is None:
        pytest.skip("default model not on packed weights here")
    ids = [(7 * i + 11) % 40000 + 100 for i in range(700)]
    backend = CpuPagedAttentionBackend()
    ref, got = both_paths(monkeypatch, lambda: with_threads(
        2, lambda: paged_logits(default_loaded, ids, [600, 1, 3, 96], backend=backend)))
    assert torch.equal(got, ref)


def test_batched_engine_outputs_identical(default_loaded, monkeypatch):
    """Several requests decoding together (and finishing at different steps) through the engine."""
    if default_loaded.model._layer_stack([]) is None:
        pytest.skip("default model not on packed weights here")
    llm = LLM(loaded=default_loaded, num_blocks=256, show_progress=False)
    prompts = ["The capital of France is", "Write a haiku about rain.", "1, 2, 3, 4,",
               "Explain what a KV cache is in one sentence."]
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=2) for n in (12, 20, 7, 16)]

    def run():
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    ref, got = both_paths(monkeypatch, run)
    assert got == ref
    assert [len(t) for t, _ in got] == [12, 20, 7, 16]


def test_bad_arguments_raise_clear_errors(default_loaded):
    model = default_loaded.model
    if model._layer_stack([]) is None:
        pytest.skip("default model not on packed weights here")
    cfg = default_loaded.config
    backend = CpuPagedAttentionBackend()
    kv = backend.allocate_kv_cache(cfg.num_hidden_layers, 4, 16, cfg.num_key_value_heads, cfg.head_dim,
                                   torch.float32, torch.device("cpu"))
    stack = model._layer_stack(kv)
    meta = backend.build_metadata([SeqInfo(2, 0, [1])], 16, torch.device("cpu"))
    cos, sin = model.model.rotary_emb.tables()
    h, res = torch.zeros(2, cfg.hidden_size), torch.zeros(2, cfg.hidden_size)

    def call(stack=stack, positions=meta.positions, h=h):
        klayers.decode_layers(h, res, stack, cos, sin, positions, meta.slot_mapping, meta.block_tables,
                              meta.context_lens, meta.query_start_loc, 16, 0.125, 1e-5)

    call()  # the good call works
    short = klayers.LayerStack(stack.weights[:-1], stack.fmts, stack.k_caches, stack.v_caches,
                               stack.num_heads, stack.num_kv_heads, stack.intermediate_size)
    with pytest.raises(RuntimeError, match="6 weights"):
        call(short)
    with pytest.raises(RuntimeError, match="outside the"):
        call(positions=torch.tensor([0, 10 ** 6]))
    with pytest.raises(RuntimeError, match="float32"):
        call(h=h.double())
    swapped = list(stack.weights)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(RuntimeError, match="layer 0 qkv"):
        call(klayers.LayerStack(swapped, stack.fmts, stack.k_caches, stack.v_caches, stack.num_heads,
                                stack.num_kv_heads, stack.intermediate_size))


def test_thread_policy_uses_every_thread_with_decode_layers(default_loaded):
    from metroline.platform import threads_for_step

    assert threads_for_step(1, 2, whole_step_kernel=True) == 2
    assert threads_for_step(1, 2) == 1 and threads_for_step(8, 2) == 2  # the op-by-op path
    llm = LLM(loaded=default_loaded, num_blocks=64, show_progress=False)
    assert llm.engine.runner._whole_step_kernel == (default_loaded.model._layer_stack([]) is not None)
