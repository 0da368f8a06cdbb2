"""`metroline quantize --to executorch`: the .pte, run by ExecuTorch's own Python runtime, gives
metroline's logits (fp32: to rounding; 4-bit: close to the same network quantized in eager
torchao), its static KV cache decodes as the whole-sequence forward does, and without the
optional extra the command fails with one line naming it.

The export tests need `pip install 'metroline[executorch]'` (a venv of its own: see
benchmarks/README.md, "ExecuTorch") and skip without it; each export takes ~30-60 s here."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from metroline.model.llama import LlamaConfig, LlamaForCausalLM


def _has_executorch() -> bool:
    try:
        return importlib.util.find_spec("executorch") is not None and \
            importlib.util.find_spec("executorch.exir") is not None
    except Exception:
        return False


needs_et = pytest.mark.skipif(not _has_executorch(), reason="executorch not installed (metroline[executorch])")


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer GQA Llama (4 q heads on 2 kv heads, tied embedding) as the loader
    builds it, in a LoadedModel-like holder (what metroline.quant.evaluate.logits_of reads)."""
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(cfg, max_positions=128)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    model.eval().requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (48,), generator=g).tolist()
    return types.SimpleNamespace(model=model, config=cfg), ids


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    from metroline.model.executorch_export import export_pte

    d = tmp_path_factory.mktemp("pte")
    return {bits: export_pte(tiny[0].model, str(d / f"tiny-{bits}.pte"), bits=bits, group_size=32,
                             max_seq_len=64) for bits in (32, 4)}


@needs_et
def test_fp32_pte_gives_metroline_logits(tiny, exported):
    from metroline.model.executorch_export import PteRunner, compare

    loaded, ids = tiny
    r = exported[32]
    assert r.delegated > 0 and r.bytes > 0  # XNNPACK took part of the graph
    # Against metroline's fp32 K/V path: only float rounding apart.
    c = compare(PteRunner(r.output), loaded, [ids], attention="torch")
    assert c["top1_agreement"] == 1.0 and c["max_abs_logprob_diff"] < 1e-3, c
    # Against what the engine serves on this CPU (K/V stored fp16 when the kernels are built).
    c = compare(PteRunner(r.output), loaded, [ids])
    assert c["top1_agreement"] > 0.95 and c["mean_kl"] < 1e-4, c


@needs_et
def test_kv_cache_decode_equals_the_whole_sequence(exported, tiny):
    from metroline.model.executorch_export import PteRunner

    ids = tiny[1]
    run = PteRunner(exported[4].output)
    full = run.forward(ids[:40], 0)  # one prefill of 40 tokens
    run.reset()
    run.forward(ids[:30], 0)
    steps = torch.stack([run.forward([ids[30 + i]], 30 + i)[0] for i in range(10)])
    assert torch.allclose(steps, full[30:40], atol=1e-4, rtol=1e-4)
    out, _, _ = run.greedy(ids[:8], 5)
    assert len(out) == 5 and all(0 <= t < tiny[0].config.vocab_size for t in out)


@needs_et
def test_4bit_pte_matches_its_eager_quantized_network(tiny, exported):
    from metroline.model.executorch_export import PteRunner, build, compare

    loaded, ids = tiny
    r = exported[4]
    assert r.schemes["lm_head"] == "8da8w per-row" and r.schemes["layers.0.qkv"] == "8da4w g32"
    assert r.bytes < exported[32].bytes / 2
    net = build(loaded.model, 4, 32, 64)
    with torch.no_grad():
        eager = torch.log_softmax(net(torch.tensor(ids), torch.arange(len(ids)))[:-1].double(), -1)
    pte = PteRunner(r.output).logprobs(ids)
    # Not bit-equal: XNNPACK quantizes the activations with its own rounding (eager torchao
    # simulates it in fp32); the two stay within a small KL.
    kl = float((eager.exp() * (eager - pte)).sum(-1).mean())
    assert kl < 2e-3 and float((pte - eager).abs().max()) < 0.3, (kl, float((pte - eager).abs().max()))
    c = compare(PteRunner(r.output), loaded, [ids], attention="torch")
    assert c["mean_kl"] < 0.1, c  # random weights: near-flat distributions, so top-1 is fragile


def test_missing_extra_is_one_line(monkeypatch, capsys, tmp_path):
    from metroline.cli import main

    for name in [m for m in sys.modules if m == "executorch" or m.startswith("executorch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "executorch", None)  # import executorch -> ImportError
    assert main(["quantize", "--to", "executorch", "-o", str(tmp_path / "m.pte")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'metroline[executorch]'" in err, err
    assert not (tmp_path / "m.pte").exists()
