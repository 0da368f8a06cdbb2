"""metroline.kernels: the packed-weight matmul kernels against their references.

Every kernel path this CPU runs (scalar, avx2, avx512) is forced in turn; the ones it lacks
are skipped with the reason. Three references, from loosest to tightest:

* fp32: gguf.quants.dequantize(W) @ x. The kernels quantize x to int8 per 32-block
  (d = amax/127, q = round(x/d)), so each x value moves by at most d/2 = amax/254 and
  |y - y_fp32| <= sum_k |W[n,k]| * amax(block of k)/254 holds element-wise: that bound is
  checked exactly (plus float slack). On Gaussian data the usual summary,
  max|y - y_fp32| / max|y_fp32|, is 0.4-0.8%; checked below 1e-2 for K >= 576 (with outliers in x, the
  blocks around them are coarser and it reaches ~1-2%: there only the element-wise bound).
* quantized-x emulation: (q*d) @ W in float64 with the same q and d. The integer dot products
  are exact, so only float32 accumulation differs: |y - y_emul| <= 1e-5 * (|q*d| @ |W|.T),
  the usual float32 summation bound (<= 48 blocks * 6e-8 per unit of the absolute sum)
  with margin.
* the scalar path: every SIMD path is bit-identical to it (same integer sums, same fused
  multiply-adds per block); rows are also bit-identical alone or batched, at 1 or 2 threads.

Layout conversion is checked bit-exact: C++ repack == torch repack, unpack(repack(raw)) ==
raw, dequant == gguf.quants.dequantize.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize, quantize

import metroline.kernels as K

FMTS = [K.Q8_0, K.Q4_0, K.Q4_1]
ISAS = ["scalar", "avx2", "avx512"]
MS = [1, 2, 3, 7, 16, 33, 64, 200]
# The default model's shapes (out x in) plus odd ones: N not a multiple of the 16-row group.
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (37, 64), (1000, 96), (5, 32)]
BIG = (49152, 576)  # the output matrix: only at a few M

needs_ext = pytest.mark.skipif(not K.available(), reason=f"C++ kernels not built: {K.unavailable_reason()}")


def _isa_or_skip(isa: str):
    if not K.available():
        pytest.skip(f"C++ kernels not built: {K.unavailable_reason()}")
    if isa not in K.supported_isas():
        pytest.skip(f"this CPU lacks {isa} (has: {K.cpu_features() or 'no SIMD'})")
    return K.force_isa(isa)


@functools.lru_cache(maxsize=None)
def weights(fmt: K.Fmt, N: int, Kd: int):
    """(raw GGUF rows, packed, fp32 dequantized reference) for a seeded random weight.

    Small shapes: gguf.quants.quantize of Gaussian weights, reference gguf's dequantize. The
    49152-row matrix: random blocks straight away (numpy's quantizer takes seconds there;
    random int8 also hits -128, which gguf's quantizer never writes), reference the torch
    twin (bit-exact with gguf's, checked on all other shapes and on slices of this one).
    """
    rng = np.random.default_rng(N * 7919 + Kd * 31 + int(fmt))
    if N * Kd <= 1 << 22:
        w = (rng.standard_normal((N, Kd)) * 0.05).astype(np.float32)
        raw = quantize(w, GT(int(fmt)))
        ref = torch.from_numpy(dequantize(raw, GT(int(fmt))).reshape(N, Kd).astype(np.float32))
        return torch.from_numpy(raw), K.repack(raw, fmt), ref
    nb, rb = Kd // 32, {K.Q8_0: 34, K.Q4_0: 18, K.Q4_1: 20}[fmt]
    blocks = rng.integers(0, 256, size=(N, nb, rb), dtype=np.uint8)
    nscale = 2 if fmt == K.Q4_1 else 1
    scales = (rng.standard_normal((N, nb, nscale)) * 0.004).astype(np.float16)
    blocks[..., : 2 * nscale] = scales.view(np.uint8)
    raw = torch.from_numpy(blocks.reshape(N, nb * rb))
    packed = K.repack(raw, fmt)
    return raw, packed, K.dequant_torch(packed, fmt, N, Kd)


@pytest.fixture(scope="module", autouse=True)
def _free_cached_weights():
    yield
    weights.cache_clear()  # the 49152x576 references are ~0.4 GB; give them back after this file


def activations(M: int, Kd: int, seed: int = 0, outliers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + M)
    x = torch.randn(M, Kd, generator=g)
    if outliers:  # a few large values, as real activations have: coarser blocks around them
        x[:, ::97] *= 8
    return x


def check_against_references(y, x, wref, gaussian: bool = True, w64=None):
    """w64: optional (wref.double(), its abs), precomputed for big weights."""
    M, Kd = x.shape
    y64 = y.double()
    w64, wabs = (wref.double(), wref.double().abs()) if w64 is None else w64
    # fp32 reference: the element-wise bound from activation quantization.
    ref = x.double() @ w64.T
    amax = x.reshape(M, Kd // 32, 32).abs().amax(-1).double().repeat_interleave(32, dim=1)
    bound = (amax / 254) @ wabs.T
    slack = 1e-5 * (x.double().abs() @ wabs.T) + 1e-6
    assert ((y64 - ref).abs() <= bound * (1 + 1e-6) + slack).all(), "beyond the int8-activation bound"
    # A statistical figure: it needs many terms (K >= 576) and no outliers (they coarsen
    # their blocks); the element-wise bound above holds always.
    if gaussian and Kd >= 576:
        assert (y64 - ref).abs().max() / ref.abs().max() < 1e-2
    # Emulated quantized x: only float rounding differs.
    q, d = K.quantize_q8_torch(x)
    xq = q.double() * d.double().repeat_interleave(32, dim=1)
    emul = xq @ w64.T
    tight = 1e-5 * (xq.abs() @ wabs.T) + 1e-7
    worst = ((y64 - emul).abs() / tight).max().item()
    assert worst <= 1, f"kernel vs emulated-int8 reference: {worst:.2f}x the float32 bound"


# ------------------------------------------------------------------- layout, bit-exact


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", SHAPES + [BIG], ids=lambda s: f"{s[0]}x{s[1]}")
def test_repack_roundtrip_bit_exact(fmt, shape):
    raw, packed, ref = weights(fmt, *shape)
    N, Kd = shape
    if shape == BIG:  # ref is the torch twin here: tie it to gguf on slices of rows
        for rows in (slice(0, 256), slice(N - 256, N)):
            gg = dequantize(raw[rows].numpy(), GT(int(fmt))).reshape(-1, Kd).astype(np.float32)
            assert torch.equal(ref[rows], torch.from_numpy(gg))
    assert packed.dtype == torch.uint8 and packed.numel() == K.packed_nbytes(fmt, N, Kd)
    assert torch.equal(K.repack_torch(raw, fmt), packed)
    assert torch.equal(K.unpack(packed, fmt, N, Kd), raw)
    assert torch.equal(K.unpack_torch(packed, fmt, N, Kd), raw)
    assert torch.equal(K.dequant(packed, fmt, N, Kd), ref)
    assert torch.equal(K.dequant_torch(packed, fmt, N, Kd), ref)


def test_default_model_tensors_roundtrip():
    """Real weights: every Q4_1 / Q8_0 matrix of the default GGUF, straight from GGUFReader's
    read-only memmap, survives repack bit-exact; two of them also through qmatmul."""
    from gguf import GGUFReader

    from metroline.errors import ModelLoadError
    from metroline.model.default import default_model_path

    try:
        path = default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    seen, n = set(), 0
    for t in GGUFReader(path).tensors:
        if t.tensor_type.name not in ("Q4_0", "Q4_1", "Q8_0"):
            continue
        fmt, (Kd, N) = K.Fmt[t.tensor_type.name], (int(t.shape[0]), int(t.shape[1]))
        raw = np.asarray(t.data).reshape(N, -1)
        packed = K.repack(raw, fmt)
        assert np.array_equal(K.unpack(packed, fmt, N, Kd).numpy(), raw), t.name
        n += 1
        if (fmt, N, Kd) in seen:  # numpy's dequantize is the slow part: once per kind
            continue
        seen.add((fmt, N, Kd))
        ref = torch.from_numpy(dequantize(raw, t.tensor_type).reshape(N, Kd).astype(np.float32))
        assert torch.equal(K.dequant(packed, fmt, N, Kd), ref), t.name
        if K.available():
            x = activations(3, Kd)
            check_against_references(K.qmatmul(x, packed, fmt, N, Kd), x, ref)
    assert n >= 200 and {f for f, _, _ in seen} >= {K.Q4_1, K.Q8_0}


def test_repack_accepts_numpy_and_gguf_types():
    raw, packed, _ = weights(K.Q4_1, 37, 64)
    assert torch.equal(K.repack(raw.numpy(), GT.Q4_1), packed)
    with pytest.raises(ValueError, match="unsupported weight format"):
        K.repack(raw, 12)  # Q4_K: not ours
    with pytest.raises(ValueError, match="uint8"):
        K.repack(raw.float(), K.Q4_1)


# ----------------------------------------------------------------------- quantize_q8


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_q8_matches_torch_twin(isa):
    x = activations(33, 576)
    x[3] = 0  # all-zero blocks: d = 0, q = 0
    x[4, :32] = 2.5  # ties and equal values
    with _isa_or_skip(isa):
        q, d = K.quantize_q8(x)
    qt, dt = K.quantize_q8_torch(x)
    assert torch.equal(q, qt) and torch.equal(d, dt)


# --------------------------------------------------------------------------- qmatmul


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_qmatmul_all_m(isa, fmt, shape):
    _, packed, wref = weights(fmt, *shape)
    N, Kd = shape
    with _isa_or_skip(isa):
        for M in MS:
            x = activations(M, Kd)
            y = K.qmatmul(x, packed, fmt, N, Kd)
            assert y.shape == (M, N) and y.dtype == torch.float32
            check_against_references(y, x, wref)
        for M in (3, 33):
            x = activations(M, Kd, seed=3, outliers=True)
            check_against_references(K.qmatmul(x, packed, fmt, N, Kd), x, wref, gaussian=False)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_qmatmul_output_matrix(isa, fmt):
    _, packed, wref = weights(fmt, *BIG)
    N, Kd = BIG
    with _isa_or_skip(isa):
        w64 = (wref.double(), wref.double().abs())
        for M in [1] if isa == "scalar" else [1, 5, 16]:
            x = activations(M, Kd, seed=1)
            check_against_references(K.qmatmul(x, packed, fmt, N, Kd), x, wref, w64=w64)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_simd_bit_identical_to_scalar(isa, fmt):
    """The paths do the same exact integer sums and the same float operations per block
    (the scalar twin uses fma where the SIMD code uses fmadd): identical bits, so a result
    does not depend on which machine of the project computed it."""
    for N, Kd in [(1000, 96), (37, 64), (576, 1536)]:
        _, packed, _ = weights(fmt, N, Kd)
        for M in (1, 3, 7, 33):
            x = activations(M, Kd, seed=2)
            with _isa_or_skip("scalar"):
                y0 = K.qmatmul(x, packed, fmt, N, Kd)
            with _isa_or_skip(isa):
                y1 = K.qmatmul(x, packed, fmt, N, Kd)
            assert torch.equal(y0, y1), (N, Kd, M)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_rows_independent_of_batch_and_threads(isa, fmt):
    """A row's output is bit-identical whether it is computed alone or in a batch (any tile
    shape), and at 1 or 2 threads: batched decode == solo decode, exactly."""
    N, Kd = 1000, 576
    _, packed, _ = weights(fmt, N, Kd)
    x = activations(21, Kd, seed=4)
    threads = torch.get_num_threads()
    with _isa_or_skip(isa):
        y = K.qmatmul(x, packed, fmt, N, Kd)
        solo = torch.cat([K.qmatmul(x[i:i + 1], packed, fmt, N, Kd) for i in range(x.shape[0])])
        try:
            torch.set_num_threads(2)
            y2 = K.qmatmul(x, packed, fmt, N, Kd)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(y, solo) and torch.equal(y, y2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_qmatmul_extreme_values_exact(isa, fmt):
    """Largest integer sums the kernels meet: int8 weights -128/127 or nibbles 15 against
    activations +-127 (every x in a block equal). The AVX2 paths accumulate Q4 products in
    int16 and take |w| for Q8, so these would expose any overflow or saturation."""
    N, Kd, nb = 24, 128, 4
    rb = {K.Q8_0: 34, K.Q4_0: 18, K.Q4_1: 20}[fmt]
    blocks = np.zeros((N, nb, rb), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    qoff = 4 if fmt == K.Q4_1 else 2
    if fmt == K.Q8_0:
        vals = np.where(np.arange(N)[:, None, None] % 2 == 0, -128, 127).astype(np.int8)
        blocks[..., 2:] = np.broadcast_to(vals, (N, nb, 32)).view(np.uint8)
    else:
        blocks[..., qoff:] = 0xFF  # every nibble 15
    raw = torch.from_numpy(blocks.reshape(N, nb * rb))
    packed = K.repack(raw, fmt)
    wref = torch.from_numpy(dequantize(blocks.reshape(N, -1), GT(int(fmt))).reshape(N, Kd).astype(np.float32))
    x = torch.ones(3, Kd)
    x[1] = -1
    x[2, 64:] = -3
    with _isa_or_skip(isa):
        y = K.qmatmul(x, packed, fmt, N, Kd)
    # x is exactly representable as d*127 * q/127 here, so the result is exact up to rounding.
    torch.testing.assert_close(y, x @ wref.T, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("isa", ISAS)
def test_qmatmul_zero_rows_and_empty(isa):
    _, packed, wref = weights(K.Q4_0, 37, 64)
    with _isa_or_skip(isa):
        y = K.qmatmul(torch.zeros(2, 64), packed, K.Q4_0, 37, 64)
        assert torch.equal(y, torch.zeros(2, 37))
        assert K.qmatmul(torch.zeros(0, 64), packed, K.Q4_0, 37, 64).shape == (0, 37)


@needs_ext
def test_qmatmul_shapes_dtypes_and_errors():
    _, packed, wref = weights(K.Q4_1, 192, 576)
    x = activations(6, 576).reshape(2, 3, 576)
    y = K.qmatmul(x, packed, K.Q4_1, 192, 576)
    assert y.shape == (2, 3, 192)
    torch.testing.assert_close(y.reshape(6, 192), K.qmatmul(x.reshape(6, 576), packed, K.Q4_1, 192, 576))
    yb = K.qmatmul(x.bfloat16(), packed, K.Q4_1, 192, 576)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, 192)
    assert K.qmatmul(x[0, 0], packed, K.Q4_1, 192, 576).shape == (192,)
    assert K.qmatmul(torch.zeros(2, 0, 576), packed, K.Q4_1, 192, 576).shape == (2, 0, 192)
    xt = activations(4, 576).T.contiguous().T  # non-contiguous
    torch.testing.assert_close(K.qmatmul(xt, packed, K.Q4_1, 192, 576), K.qmatmul(xt.contiguous(), packed, K.Q4_1, 192, 576))
    with pytest.raises(RuntimeError, match="columns"):
        K.qmatmul(torch.randn(2, 512), packed, K.Q4_1, 192, 576)
    with pytest.raises(RuntimeError, match="expected"):
        K.qmatmul(torch.randn(2, 576), packed, K.Q4_0, 192, 576)  # wrong format for these bytes
    with pytest.raises(RuntimeError, match="unsupported weight format"):
        K.qmatmul(torch.randn(2, 576), packed, 12, 192, 576)


def test_force_isa_rejects_unknown_and_unsupported():
    with pytest.raises(ValueError, match="unknown isa"):
        with K.force_isa("neon"):
            pass
    for isa in ("avx2", "avx512"):
        if isa not in K.supported_isas():
            with pytest.raises(RuntimeError):
                with K.force_isa(isa):
                    pass
    assert K.cpu_isa() in ("avx512", "avx2", "scalar", "torch")
    if K.available():
        assert K.cpu_isa() == K.supported_isas()[-1]


@needs_ext
def test_qmatmul_under_torch_compile():
    _, packed, wref = weights(K.Q8_0, 192, 576)
    x = activations(4, 576)
    f = torch.compile(lambda x: K.qmatmul(x, packed, K.Q8_0, 192, 576) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), 2 * K.qmatmul(x, packed, K.Q8_0, 192, 576))


# ------------------------------------------------------------------- the torch fallback


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(K, "_ops", None)
    monkeypatch.setattr(K, "_reason", "simulated: extension missing")
    monkeypatch.setattr(K, "_warned", False)
    monkeypatch.setattr(K, "_isa", -1)


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_torch_fallback(no_extension, fmt, caplog):
    raw, packed, wref = weights(fmt, 37, 64)
    assert not K.available() and K.unavailable_reason() == "simulated: extension missing"
    assert K.cpu_isa() == "torch" and K.supported_isas() == []
    with caplog.at_level(logging.WARNING, logger="metroline.kernels"):
        assert torch.equal(K.repack(raw, fmt), packed)
        assert torch.equal(K.unpack(packed, fmt, 37, 64), raw)
        assert torch.equal(K.dequant(packed, fmt, 37, 64), wref)
        for M in (1, 7, 200):
            x = activations(M, 64)
            y = K.qmatmul(x, packed, fmt, 37, 64)
            torch.testing.assert_close(y, x @ wref.T, rtol=1e-5, atol=1e-5)
        q, d = K.quantize_q8(activations(3, 64))
        assert q.dtype == torch.int8 and d.shape == (3, 2)
    warnings = [r for r in caplog.records if r.name == "metroline.kernels"]
    assert len(warnings) == 1 and "torch path" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="cannot force"):
        with K.force_isa("avx2"):
            pass
