"""GGUF export (`metroline quantize`): re-quantized files re-load in metroline with the
outputs they must have, keep every metadata key (tokenizer, chat template), stay within
each format's quantization error, and load in llama.cpp when its binaries are at hand."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from metroline.model.default import default_model_path
from metroline.model.gguf_meta import open_gguf

PEERS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "peers", "llama.cpp")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from metroline.model.gguf_export import export_gguf

    d = tmp_path_factory.mktemp("export")
    out = {}
    for fmt in ("q4_1", "q8_0"):
        out[fmt] = str(d / f"smol-{fmt}.gguf")
        export_gguf(default_model_path(), out[fmt], fmt, progress=False)
    out["q8_0-again"] = str(d / "smol-q8_0-again.gguf")
    export_gguf(out["q8_0"], out["q8_0-again"], "q8_0", progress=False)
    return out


def _greedy(path, prompt: str, n: int = 24):
    from metroline.engine.llm import LLM
    from metroline.engine.request import SamplingParams

    llm = LLM(path, num_blocks=64, show_progress=False)
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, logprobs=0),
                        use_tqdm=False)[0].outputs[0]


def test_same_format_is_a_byte_copy_with_the_same_outputs(exported, default_loaded):
    src, dst = open_gguf(default_model_path()), open_gguf(exported["q4_1"])
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for a, b in zip(src.tensors, dst.tensors):
        assert (a.shape, a.tensor_type) == (b.shape, b.tensor_type) and np.array_equal(a.data, b.data), a.name
    assert {k: v for k, v in dst.metadata.items() if k != "general.file_type"} == \
        {k: v for k, v in src.metadata.items() if k != "general.file_type"}
    prompt = "The capital of France is"
    a, b = _greedy(default_model_path(), prompt), _greedy(exported["q4_1"], prompt)
    assert a.token_ids == b.token_ids and [x[1] for x in a.logprobs] == [x[1] for x in b.logprobs]


def test_q8_0_export_keeps_metadata_and_stays_close(exported):
    from gguf import GGMLQuantizationType as Q

    src, dst = open_gguf(default_model_path()), open_gguf(exported["q8_0"])
    assert dst.metadata["tokenizer.chat_template"] == src.metadata["tokenizer.chat_template"]
    assert dst.metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
    assert dst.metadata["general.file_type"] == 7  # MOSTLY_Q8_0
    kinds = {t.tensor_type for t in dst.tensors if len(t.shape) == 2}
    assert kinds == {Q.Q8_0} and {t.tensor_type for t in dst.tensors if len(t.shape) == 1} == {Q.F32}
    # Q4_1 values re-quantized to 8 bits: the same greedy text on a short prompt, logprobs close.
    prompt = "Write a haiku about the sea."
    a, b = _greedy(default_model_path(), prompt), _greedy(exported["q8_0"], prompt)
    agree = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
    assert agree >= len(a.token_ids) // 2
    assert abs(a.logprobs[0][1] - b.logprobs[0][1]) < 0.1
    # Exporting the export again in its own format changes nothing.
    again = open_gguf(exported["q8_0-again"])
    assert all(np.array_equal(x.data, y.data) for x, y in zip(dst.tensors, again.tensors))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "f16"])
def test_quantization_error_bounds(fmt):
    """Per 32-value block: Q8_0 within half a step of absmax/127, Q4_0 of absmax/8, Q4_1 of
    (max - min)/15, plus what the fp16 rounding of the scale (and minimum) adds: up to the
    largest quant (127, 8, 15) times half an fp16 ulp of the step; f16 within its half ulp.
    Q4_0's grid is -8..7 steps from the signed extreme, so a value at the other extreme may
    be a whole step off."""
    from gguf.quants import dequantize, quantize

    from metroline.model.gguf_export import _qtype

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 3, (64, 1))).astype(np.float32)
    q = _qtype(fmt)
    y = quantize(x, q) if fmt != "f16" else x.astype(np.float16)
    back = dequantize(y, q) if fmt != "f16" else y.astype(np.float32)
    err = np.abs(back - x).reshape(64, -1, 32)
    blocks = x.reshape(64, -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    step = {"q8_0": amax / 127, "q4_0": amax / 8,
            "q4_1": (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15,
            "f16": np.abs(blocks) * 2.0 ** -10}[fmt]
    qmax = {"q8_0": 127, "q4_0": 8, "q4_1": 15, "f16": 0}[fmt]
    half = 1.0 if fmt == "q4_0" else 0.5
    bound = step * (half + qmax * 2.0 ** -11) + (amax * 2.0 ** -11 if fmt == "q4_1" else 0) + 1e-7
    assert np.all(err <= bound), float((err / bound).max())
    assert float((err / bound).max()) > 0.3  # and not trivially: some error is near the bound


def test_cli_quantize_and_bad_arguments(tmp_path):
    from metroline.cli import main

    out = tmp_path / "m.gguf"
    assert main(["quantize", "--to", "q4_0", "-o", str(out)]) == 0
    from gguf import GGMLQuantizationType as Q

    f = open_gguf(out)
    types = {t.name: t.tensor_type for t in f.tensors}
    assert types["blk.0.ffn_down.weight"] == Q.Q4_0 and types["token_embd.weight"] == Q.Q8_0
    assert main(["quantize", str(out), "--to", "q8_0", "-o", str(out)]) == 2  # onto itself
    assert main(["quantize", str(tmp_path / "missing.gguf"), "--to", "q8_0", "-o", str(tmp_path / "x.gguf")]) == 2
    with pytest.raises(SystemExit):
        main(["quantize", "--to", "q3_k", "-o", str(tmp_path / "y.gguf")])


@pytest.mark.skipif(not os.path.exists(os.path.join(PEERS, "llama-bench")), reason="llama.cpp binaries not here")
def test_llama_cpp_loads_the_export(exported):
    """llama.cpp's own llama-bench loads the exported file and generates from it."""
    exe = os.path.join(PEERS, "llama-bench")
    r = subprocess.run([exe, "-m", exported["q8_0"], "-p", "8", "-n", "4", "-t", "1", "-r", "1", "-o", "json"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"n_gen": 4' in r.stdout.replace(" ", "").replace('"n_gen":4', '"n_gen": 4')


def test_eval_perplexity_and_agreement(tmp_path, default_loaded, default_loaded_fp32):
    """`metroline eval`: the packed default model's perplexity on the held-out slice is what
    the library computes, agreement of a model with itself is exact, and packed against fp32
    agrees closely (the figures of the compression table)."""
    import json

    from metroline.cli import main
    from metroline.quant.evaluate import agreement, held_out, perplexity

    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--num-seqs", "2", "--tokens", "64", "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    seqs = held_out(default_loaded.tokenizer, 2, 64)
    assert got["perplexity"] == pytest.approx(perplexity(default_loaded, seqs).perplexity, rel=1e-9)
    assert 1 < got["perplexity"] < 100 and got["tokens_scored"] == 2 * 63
    same = agreement(default_loaded, default_loaded, seqs)
    assert same.top1_agreement == 1.0 and abs(same.mean_kl) < 1e-12
    close = agreement(default_loaded_fp32, default_loaded, seqs)
    assert close.top1_agreement > 0.85 and 0 < close.mean_kl < 0.05
    assert main(["eval", "perplexity", "--tokens", "1"]) == 2


def test_weights_quantized_at_load_equal_the_exported_file(exported):
    """`--weights q8_0` quantizes at load exactly as `metroline quantize --to q8_0` writes:
    the exported file, loaded as stored, gives the same tokens and logprobs; `--weights q4_1`
    on a Q4_1 file keeps its bytes (the same outputs as `packed`)."""
    from metroline.engine.llm import LLM
    from metroline.engine.request import SamplingParams

    def run(model, weights):
        llm = LLM(model, weights=weights, num_blocks=64, show_progress=False)
        o = llm.generate(["Name three rivers of Europe:"], SamplingParams(temperature=0, max_tokens=16, logprobs=0),
                         use_tqdm=False)[0].outputs[0]
        return llm.loaded.weights, o.token_ids, [x[1] for x in o.logprobs]

    held, ids, lps = run(None, "q8_0")
    assert "Q8_0" in held and "Q4_1" not in held
    assert run(exported["q8_0"], "packed")[1:] == (ids, lps)
    assert run(None, "q4_1")[1:] == run(None, "packed")[1:]
    held4, ids4, _ = run(None, "q4_0")
    assert "Q4_0+Q8_0" in held4 and len(ids4) == 16  # 4-bit matrices, the embedding kept in Q8_0


def test_max_memory_plans_weights_and_kv_or_refuses(capsys):
    """--max-memory: the most faithful format that leaves room for one sequence of the
    context, the rest as KV; q4_0 when only that fits; a one-line refusal saying what would
    (naming the smallest candidate, int4-g128)."""
    from metroline.cli import main
    from metroline.model.memory import MemoryBudgetError, parse_size, plan_memory

    assert parse_size("300MB") == 300_000_000 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(1234) == 1234
    with pytest.raises(Exception, match="cannot read"):
        parse_size("lots")
    per_token = 2 * 30 * 3 * 64 * 2
    p = plan_memory(None, parse_size("300MB"))
    assert p.weights == "packed" and p.weight_bytes + p.kv_cache_memory == 300_000_000
    assert p.kv_tokens >= 8192 and p.kv_tokens * per_token <= p.kv_cache_memory
    small = plan_memory(None, parse_size("150MB"), max_model_len=2048)
    assert small.weights == "packed" and small.kv_tokens >= 2048
    tight = plan_memory(None, 96_000_000 + 2048 * per_token, max_model_len=2048)
    assert tight.weights == "q4_0"  # as stored (96.6 MB) no longer leaves room: 4-bit Q4_0
    with pytest.raises(MemoryBudgetError, match=r"smallest format \(int4-g128\) .* give at least 275 MB"):
        plan_memory(None, parse_size("200MB"))  # int4-g128 (g64 / q4_0 where 128 does not divide K): 86 MB
    # An int8 KV cache: 66 bytes per head row against 128, so the same budget plans 1.94x the tokens,
    # and 200 MB (too small with fp16 KV for one 8192-token sequence) now fits.
    p8 = plan_memory(None, parse_size("300MB"), kv_cache_dtype="int8")
    assert p8.weights == p.weights and abs(p8.kv_tokens / p.kv_tokens - 128 / 66) < 0.01
    assert plan_memory(None, parse_size("200MB"), kv_cache_dtype="int8").kv_tokens >= 8192
    assert main(["generate", "hi", "--max-memory", "50MB"]) == 2
    assert "give at least" in capsys.readouterr().err
    assert main(["generate", "Hello", "--max-memory", "200MB", "--max-model-len", "1024", "--max-tokens", "3"]) == 0
    assert "--max-memory: weights packed" in capsys.readouterr().err


def test_ternary_export_is_tq2_0_that_metroline_and_llama_cpp_load(tmp_path):
    """--to ternary writes GGUF TQ2_0 (absmean per 256, matrices whose rows are not a multiple
    of 256 in Q4_0, the embedding in Q8_0): metroline loads it packed with the same values
    gguf.quants dequantizes, and llama.cpp's llama-bench runs it when its binaries are here."""
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    from metroline.model.gguf_export import export_gguf
    from metroline.model.loader import load_model
    from metroline.quant.packed import PackedLinear

    out = str(tmp_path / "smol-ternary.gguf")
    info = export_gguf(default_model_path(), out, "ternary", progress=False)
    f = open_gguf(out)
    types = {t.name: t.tensor_type for t in f.tensors}
    assert types["blk.0.ffn_down.weight"] == Q.TQ2_0 and types["blk.0.ffn_up.weight"] == Q.Q4_0
    assert types["token_embd.weight"] == Q.Q8_0 and info["tensors"]["TQ2_0"] == 30
    down = next(t for t in f.tensors if t.name == "blk.3.ffn_down.weight")
    rows = np.asarray(down.data).view(np.uint8).reshape(int(down.shape[1]), -1)
    d = rows[:, 64:66].copy().view(np.float16).astype(np.float32)  # the first block's scale
    src = next(t for t in open_gguf(default_model_path()).tensors if t.name == down.name)
    w = dequantize(np.asarray(src.data).view(np.uint8).reshape(rows.shape[0], -1), src.tensor_type)
    absmean = np.abs(w.reshape(rows.shape[0], -1)[:, :256]).mean(1, keepdims=True)
    assert np.allclose(d, absmean.astype(np.float16).astype(np.float32), rtol=2e-3)  # BitNet's absmean
    loaded = load_model(out, show_progress=False, weights="packed")
    layer = loaded.model.model.layers[3].mlp.down_proj
    assert isinstance(layer, PackedLinear) and layer.fmt == int(Q.TQ2_0)
    ref = dequantize(rows, Q.TQ2_0).reshape(rows.shape[0], -1)
    assert torch.equal(layer.dequantized(), torch.from_numpy(ref))
    assert set(np.unique(np.rint(ref[:, :256] / np.where(d == 0, 1, d)))) <= {-1.0, 0.0, 1.0}
    exe = os.path.join(PEERS, "llama-bench")
    if not os.path.exists(exe):
        pytest.skip("llama.cpp binaries not here")
    r = subprocess.run([exe, "-m", out, "-p", "8", "-n", "4", "-t", "1", "-r", "1", "-o", "json"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"n_gen":4' in r.stdout.replace(" ", "")
