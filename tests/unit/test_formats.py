"""The packed formats beyond GGUF's 32-blocks: int8 per output row (I8_ROW), int4 with groups
of 64 / 128 (symmetric and asymmetric), ternary (TQ2_0).

For each: the quantizer's own error bound (round to nearest with the stored scale), the
importance-weighted scale search never worse than RTN under its own weights, dequant ==
the numpy reference (bit-exact; TQ2_0 also == gguf.quants.dequantize), repack / unpack /
dequant == their torch twins, qmatmul within the activation-quantization bound of
dequant-matmul on every ISA and bit-identical across ISAs, batch sizes and thread counts,
decode_layers bit-identical to op-by-op, the default model loading and generating under
each --weights choice, and one-line errors for bad arguments.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metroline.kernels as K
from metroline.quant import formats as QF
from tests.model.test_model_vs_hf import tiny_tokenizer  # noqa: F401  (a fixture)
from tests.unit.test_kernels import _isa_or_skip, activations, check_against_references, no_extension  # noqa: F401

NEW = [K.I8_ROW, K.I4_G64, K.I4_G64_ASYM, K.I4_G128, K.I4_G128_ASYM, K.TQ2_0]
ISAS = ["scalar", "avx2", "avx512"]
# (N, K): N off the 16-row group, K several groups (256 / 512 / 768 hold every format).
SHAPES = [(37, 256), (100, 512), (40, 768), (5, 256)]
ids = lambda f: f.name  # noqa: E731


def _weights(N, Kd, seed=0, outliers=False):
    rng = np.random.default_rng(seed * 1009 + N * 7 + Kd)
    w = (rng.standard_normal((N, Kd)) * 0.05).astype(np.float32)
    if outliers:
        w[:, ::37] *= 6
    return w


_cache: dict = {}


def packed(fmt, N, Kd):
    """(raw rows, packed, fp32 dequantized reference) for a seeded Gaussian weight."""
    key = (fmt, N, Kd)
    if key not in _cache:
        raw = QF.quantize(_weights(N, Kd), fmt)
        _cache[key] = (torch.from_numpy(raw), K.repack(raw, fmt), torch.from_numpy(QF.dequantize(raw, fmt, Kd)))
    return _cache[key]


# --------------------------------------------------------------- quantizer error bounds


@pytest.mark.parametrize("fmt", NEW, ids=ids)
def test_rtn_error_bounds(fmt):
    """Round to nearest with the stored scale: |w - deq| <= |d|/2 where w is in the grid's
    range (int4 symmetric clips the far side at 7*|d|, at most |d|; asymmetric adds the fp16
    rounding of m); ternary: <= max(d/2, |w| - d), d = fp16(mean |w|) per 256."""
    w = _weights(64, 1024, seed=1, outliers=True)
    raw = QF.quantize(w, fmt)
    assert raw.shape == (64, K.raw_row_bytes(fmt, 1024)) and raw.dtype == np.uint8
    deq = QF.dequantize(raw, fmt, 1024).astype(np.float64)
    d, m = QF.scales(raw, fmt, 1024)
    d = np.abs(d.astype(np.float64))
    err = np.abs(w - deq)
    tiny = 1e-7 * np.abs(w) + 1e-9
    if fmt == K.I8_ROW:
        assert np.allclose(d[:, 0], np.float32(np.abs(w).max(1)) / 127, rtol=1e-6)
        bound = d / 2
    elif fmt == K.TQ2_0:
        mean = np.abs(w.reshape(64, -1, 256)).mean(-1)
        assert np.array_equal(d[:, ::256], mean.astype(np.float16).astype(np.float64))
        bound = np.maximum(d / 2, np.abs(w) - d)
        assert set(np.unique(np.rint(deq / np.where(d == 0, 1, d)))) <= {-1.0, 0.0, 1.0}
    elif m is not None:
        bound = d / 2 + 2.0 ** -11 * (np.abs(m) + 15 * d)
    else:
        inside = np.abs(w) <= 7.5 * d  # the side of the extreme value reaches -8*d
        bound = np.where(inside, d / 2, d) * (1 + 2.0 ** -10)
    assert np.all(err <= bound + tiny), float((err / (bound + tiny)).max())
    assert float((err / (bound + tiny)).max()) > 0.3  # and not trivially loose
    # Round trip through the packed form is exact.
    p = K.repack(raw, fmt)
    assert torch.equal(K.unpack(p, fmt, 64, 1024), torch.from_numpy(raw))


@pytest.mark.parametrize("fmt", NEW + [K.Q8_0, K.Q4_0, K.Q4_1], ids=ids)
def test_importance_search_never_worse_than_rtn(fmt):
    """With importance the block scales minimize sum_k imp_k (w_k - deq_k)^2 over candidates
    that include RTN's: per row never above RTN, and clearly below it in total."""
    Kd = 512
    w = _weights(48, Kd, seed=2, outliers=True)
    imp = np.random.default_rng(5).gamma(0.5, 1.0, Kd)  # skewed, as activation energies are
    rtn = QF.dequantize(QF.quantize(w, fmt), fmt, Kd).astype(np.float64)
    raw = QF.quantize(w, fmt, importance=imp)
    assert raw.shape == (48, K.raw_row_bytes(fmt, Kd))
    got = QF.dequantize(raw, fmt, Kd).astype(np.float64)
    e_rtn = ((w - rtn) ** 2 * imp).sum(1)
    e_imp = ((w - got) ** 2 * imp).sum(1)
    assert np.all(e_imp <= e_rtn * (1 + 1e-6) + 1e-12)
    assert e_imp.sum() < 0.97 * e_rtn.sum(), (e_imp.sum(), e_rtn.sum())
    assert torch.equal(K.dequant(K.repack(raw, fmt), fmt, 48, Kd), torch.from_numpy(QF.dequantize(raw, fmt, Kd)))


# ------------------------------------------------------------- layout and dequant, exact


@pytest.mark.parametrize("fmt", NEW, ids=ids)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layout_and_dequant_bit_exact(fmt, shape):
    N, Kd = shape
    raw, p, ref = packed(fmt, N, Kd)
    assert p.numel() == K.packed_nbytes(fmt, N, Kd) == K.repack_torch(raw, fmt).numel()
    assert torch.equal(K.repack_torch(raw, fmt), p)
    assert torch.equal(K.unpack(p, fmt, N, Kd), raw) and torch.equal(K.unpack_torch(p, fmt, N, Kd), raw)
    assert torch.equal(K.dequant(p, fmt, N, Kd), ref) and torch.equal(K.dequant_torch(p, fmt, N, Kd), ref)
    # Packed bytes = raw bytes (one scale per group, not per 32-block) + zero rows to 16.
    assert p.numel() == -(-N // 16) * 16 * K.raw_row_bytes(fmt, Kd)


def test_ternary_is_gguf_tq2_0():
    """TQ2_0 rows are GGUF's own: gguf.quants dequantizes them to our values exactly."""
    from gguf import GGMLQuantizationType as GT
    from gguf.quants import dequantize

    raw, p, ref = packed(K.TQ2_0, 37, 256)
    assert int(K.TQ2_0) == int(GT.TQ2_0)
    assert np.array_equal(dequantize(raw.numpy(), GT.TQ2_0).reshape(37, 256), ref.numpy())


def test_bits_per_weight_and_aliases():
    assert [K.bits_per_weight(f) for f in (K.I4_G64, K.I4_G64_ASYM, K.I4_G128, K.I4_G128_ASYM, K.TQ2_0)] == \
        [4.25, 4.5, 4.125, 4.25, 2.0625]
    assert K.bits_per_weight(K.I8_ROW, 576) == 8 + 32 / 576
    assert QF.TARGETS["int4-g32"] == K.Q4_0 and QF.TARGETS["int4-g32-asym"] == K.Q4_1
    assert QF.format_for(K.I4_G128, 576) == K.I4_G64 and QF.format_for(K.TQ2_0, 576) == K.Q4_0
    assert QF.format_for(K.I4_G128_ASYM, 96) == K.Q4_1 and QF.format_for(K.TQ2_0, 48) is None
    from metroline.model.memory import weight_bytes

    tensors = [("blk.0.ffn_down.weight", 1536 * 576, "Q4_1", 1536), ("blk.0.ffn_up.weight", 576 * 1536, "Q4_1", 576),
               ("token_embd.weight", 100 * 576, "Q4_1", 576), ("blk.0.attn_norm.weight", 576, "F32", 576)]
    assert weight_bytes(tensors, "int4-g128") == int(1536 * 576 * 4.125 / 8 + 576 * 1536 * 4.25 / 8
                                                     + 100 * 576 * 8.5 / 8 + 4 * 576)
    assert weight_bytes(tensors, "ternary") == int(1536 * 576 * 2.0625 / 8 + 576 * 1536 * 4.5 / 8
                                                   + 100 * 576 * 8.5 / 8 + 4 * 576)


# ------------------------------------------------------------------------------ qmatmul


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", NEW, ids=ids)
def test_qmatmul_within_activation_bound(isa, fmt):
    for N, Kd in SHAPES:
        _, p, ref = packed(fmt, N, Kd)
        for M in (1, 5, 16):
            x = activations(M, Kd)
            with _isa_or_skip(isa):
                y = K.qmatmul(x, p, fmt, N, Kd)
            assert y.shape == (M, N)
            check_against_references(y, x, ref, gaussian=N >= 32)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("fmt", NEW, ids=ids)
def test_simd_bit_identical_to_scalar_batch_and_threads(isa, fmt):
    """Every path does the same integer sums and float operations per block (I8_ROW: per
    block isum * d_x, the row scale once at the end): identical bits across ISAs, whether a
    row is alone or in a batch (any tile height), at 1 or 2 threads."""
    N, Kd = 100, 512
    _, p, _ = packed(fmt, N, Kd)
    x = activations(21, Kd, seed=3, outliers=True)
    with _isa_or_skip("scalar"):
        y0 = K.qmatmul(x, p, fmt, N, Kd)
    threads = torch.get_num_threads()
    with _isa_or_skip(isa):
        y = K.qmatmul(x, p, fmt, N, Kd)
        solo = torch.cat([K.qmatmul(x[i:i + 1], p, fmt, N, Kd) for i in range(x.shape[0])])
        parts = torch.cat([K.qmatmul(x[:7], p, fmt, N, Kd), K.qmatmul(x[7:], p, fmt, N, Kd)])
        try:
            torch.set_num_threads(2)
            y2 = K.qmatmul(x, p, fmt, N, Kd)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(y, y0) and torch.equal(y, solo) and torch.equal(y, parts) and torch.equal(y, y2)


@pytest.mark.parametrize("fmt", NEW, ids=ids)
def test_extreme_codes_exact(fmt):
    """Every code at its extreme (int8 +-127, nibbles 0/15, ternary -1/+1) with exactly
    representable activations: the kernels' integer sums cannot overflow (AVX2 sums a block's
    products in int16 lanes), so the result is the exact dot product on every path."""
    N, Kd = 32, 256
    rng = np.random.default_rng(9)
    # Values whose scales are exact: int8 d = 2^-7 (codes +-127), int4 d = 0.5 (codes 0 and
    # 15), ternary d = mean |w| = 0.5 (codes -1 and +1).
    lo, hi = {K.I8_ROW: (-127 / 128, 127 / 128), K.TQ2_0: (-0.5, 0.5), K.I4_G64_ASYM: (0.0, 7.5),
              K.I4_G128_ASYM: (0.0, 7.5)}.get(fmt, (-4.0, 3.5))
    w = np.where(rng.random((N, Kd)) < 0.5, lo, hi).astype(np.float32)
    raw = QF.quantize(w, fmt)
    deq = QF.dequantize(raw, fmt, Kd)
    assert np.array_equal(deq, w)
    p = K.repack(raw, fmt)
    x = torch.from_numpy(np.where(rng.random((3, Kd)) < 0.5, -127.0, 127.0).astype(np.float32))
    exact = (x.double() @ torch.from_numpy(w).double().T).float()
    for isa in K.supported_isas():
        with K.force_isa(isa):
            assert torch.equal(K.qmatmul(x, p, fmt, N, Kd), exact), isa


# ---------------------------------------------------------------- errors and fallback


def test_bad_arguments_are_one_line_errors():
    w = _weights(16, 96)
    for fmt, mult in ((K.I4_G64, 64), (K.I4_G128_ASYM, 128), (K.TQ2_0, 256)):
        with pytest.raises(ValueError, match=f"needs K a positive multiple of {mult}, got K=96") as e:
            QF.quantize(w, fmt)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=f"multiple of {mult}"):
            K.packed_nbytes(fmt, 16, 96)
    with pytest.raises(ValueError, match="importance must be 96 finite values"):
        QF.quantize(w, K.I8_ROW, importance=np.ones(95))
    with pytest.raises(ValueError, match="importance must be"):
        QF.quantize(w, K.Q4_0, importance=-np.ones(96))
    with pytest.raises(ValueError, match="unknown packed format 'int3'"):
        QF.target_format("int3")
    raw, p, _ = packed(K.I4_G128, 37, 256)
    if K.available():
        with pytest.raises(RuntimeError, match="K a positive multiple of 128 for fmt 103") as e:
            torch.ops.metroline.qmatmul(torch.zeros(1, 192), p, int(K.I4_G128), 37, 192, -1)
        assert "\n" not in str(e.value).strip().split("\n")[0] and "multiple of 128" in str(e.value).split("\n")[0]
        with pytest.raises(RuntimeError, match="row_bytes 67 is not a multiple of the block size 66"):
            K.repack(torch.zeros(4, 67, dtype=torch.uint8), K.I4_G128)
        with pytest.raises(RuntimeError, match="4 \\+ a multiple of 32"):
            K.repack(torch.zeros(4, 40, dtype=torch.uint8), K.I8_ROW)
        with pytest.raises(RuntimeError, match="unsupported table format 35"):
            torch.ops.metroline.embed_rows(raw, torch.zeros(1, dtype=torch.long), 35)
    with pytest.raises(ValueError, match="block size 66"):
        K.repack_torch(torch.zeros(4, 67, dtype=torch.uint8), K.I4_G128)


def test_gguf_export_refuses_formats_without_a_gguf_type(tmp_path):
    from metroline.model.gguf_export import ExportError, _format, tensor_target

    for fmt in ("int8", "int4-g64", "int4-g128-asym"):
        with pytest.raises(ExportError, match=f"{fmt} has no GGUF type.*writes q8_0, q4_0, q4_1, ternary") as e:
            _format(fmt)
        assert "\n" not in str(e.value)
    assert _format("int4-g32") == "q4_0" and _format("int4-g32-asym") == "q4_1" and _format("ternary") == "ternary"
    from gguf import GGMLQuantizationType as Q

    assert tensor_target("blk.0.ffn_down.weight", (1536, 576), "ternary") == Q.TQ2_0
    assert tensor_target("blk.0.ffn_up.weight", (576, 1536), "ternary") == Q.Q4_0  # 576 % 256: llama.cpp's fallback
    assert tensor_target("token_embd.weight", (576, 49152), "ternary") == Q.Q8_0


@pytest.mark.parametrize("fmt", NEW, ids=ids)
def test_torch_fallback(no_extension, fmt):
    raw, p, ref = packed(fmt, 37, 256)
    assert torch.equal(K.repack(raw, fmt), p)
    assert torch.equal(K.unpack(p, fmt, 37, 256), raw)
    assert torch.equal(K.dequant(p, fmt, 37, 256), ref)
    x = activations(3, 256)
    torch.testing.assert_close(K.qmatmul(x, p, fmt, 37, 256), x @ ref.T, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ layers and the model


@pytest.mark.parametrize("weights", ["int4-g128-asym", "ternary", "int8"])
def test_decode_layers_bit_identical_for_new_formats(weights, tiny_tokenizer, tmp_path, monkeypatch):
    """decode_layers calls the same kernels by fmt: the tiny model quantized at load into a
    new format gives op-by-op's logits and KV cache exactly (every ISA, 1 and 2 threads)."""
    from metroline.kernels import layers as klayers
    from metroline.model.loader import load_model
    from metroline.quant.packed import PackedLinear
    from tests.model.test_model_vs_hf import _tiny_prompt, write_tiny_gguf
    from tests.unit.test_decode_layers import assert_both_paths_identical

    if not klayers.available():
        pytest.skip("C++ kernels not built")
    from gguf import GGMLQuantizationType as Q

    tok = tiny_tokenizer[1]
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tok, Q.Q8_0, tied=True, seed=3)
    loaded = load_model(str(path), device="cpu", show_progress=False, weights=weights)
    fmts = {K.Fmt(m.fmt) for m in loaded.model.modules() if isinstance(m, PackedLinear)}
    assert QF.TARGETS[weights] in fmts, fmts
    assert loaded.model._layer_stack([]) is not None
    ids = _tiny_prompt(tok, 40)
    chunks = [29, 1, 3, 1, 6]
    assert_both_paths_identical(monkeypatch, loaded, ids, chunks)


@pytest.fixture(scope="session")
def first_tokens_packed(default_llm):
    from metroline.engine.request import SamplingParams

    return default_llm.generate([_PROMPT], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0]


_PROMPT = "The capital of France is"


@pytest.mark.parametrize("weights", ["int8", "int4-g64", "int4-g64-asym", "int4-g128", "int4-g128-asym", "ternary"])
def test_default_model_loads_and_generates(weights, first_tokens_packed):
    """Each --weights choice loads the default model quantized at load and generates; the
    8- and 4-bit ones agree with the model as stored on the first greedy token."""
    from metroline.engine.llm import LLM
    from metroline.engine.request import SamplingParams
    from metroline.quant.packed import PackedLinear

    llm = LLM(None, weights=weights, num_blocks=32, show_progress=False)
    held = llm.loaded.weights
    target = QF.TARGETS[weights]
    layers = [m for m in llm.loaded.model.modules() if isinstance(m, PackedLinear)]
    fmts = {K.Fmt(m.fmt) for m in layers}
    assert target.name in held and target in fmts and K.Q8_0 in fmts  # the head stays Q8_0
    for m in layers:  # a layer's fmt is its target or the fallback its K needs
        assert K.Fmt(m.fmt) in (K.Q8_0, QF.format_for(target, m.in_features)), (m, target)
    o = llm.generate([_PROMPT], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0]
    assert len(o.token_ids) == 4
    if weights != "ternary":
        assert o.token_ids[0] == first_tokens_packed.token_ids[0], (o.text, first_tokens_packed.text)


def test_load_model_passes_importance_to_the_quantizer():
    """load_model(importance=...) reaches the quantizer by checkpoint name: a matrix given
    importance is quantized with the weighted search (different bytes from RTN), the others
    are not."""
    import metroline.model.loader as L
    from metroline.quant.packed import RawWeight

    rng = np.random.default_rng(3)
    w = {"model.layers.0.mlp.down_proj.weight": torch.from_numpy(_weights(16, 256, seed=7, outliers=True)),
         "model.layers.0.self_attn.q_proj.weight": torch.from_numpy(_weights(16, 256, seed=8))}
    targets = {"model.layers.0.mlp.down_proj.weight": int(K.I4_G128),
               "model.layers.0.self_attn.qkv_proj.weight:q": int(K.I4_G128)}
    imp = {"model.layers.0.mlp.down_proj.weight": rng.gamma(0.5, 1.0, 256)}
    got = dict(L._quantized(iter(w.items()), targets, imp))
    assert all(isinstance(r, RawWeight) and r.fmt == int(K.I4_G128) for r in got.values())
    down, q = got["model.layers.0.mlp.down_proj.weight"], got["model.layers.0.self_attn.q_proj.weight"]
    name = "model.layers.0.mlp.down_proj.weight"
    assert np.array_equal(down.data.numpy(), QF.quantize(w[name].numpy(), K.I4_G128, imp[name]))
    assert not np.array_equal(down.data.numpy(), QF.quantize(w[name].numpy(), K.I4_G128))
    assert np.array_equal(q.data.numpy(), QF.quantize(w["model.layers.0.self_attn.q_proj.weight"].numpy(), K.I4_G128))
