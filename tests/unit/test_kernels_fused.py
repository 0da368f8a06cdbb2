"""metroline.kernels.fused: rms_norm, add_rms_norm, silu_mul, rope_kv_write against torch.

Each kernel path this CPU runs (scalar, avx2, avx512) is forced in turn; the ones it lacks are
skipped with the reason. Shapes: the default model's (hidden 576, MLP 1536, 9 + 3 heads of 64)
and odd ones (H not a multiple of the vector width, head_dim 40 and 128), at 1 token (decode)
and 300 (a prefill chunk, split over threads).

Tolerances:
* rms_norm / add_rms_norm: |y - ref| <= 1e-5 * max|ref| against F.rms_norm and the HF
  composite (the kernel sums squares in another order; measured ~3e-7). The residual sum is
  one fp32 add: bit-exact.
* silu_mul: relative 2e-6 (+1e-6 absolute) against F.silu(gate) * up (the kernel's exp is
  Cephes', ~2 ulp; torch's Sleef's; measured 2.4e-7), including |x| up to 100.
* rope_kv_write: bit-exact, q, k and both caches, fp32 and fp16 caches: every product and sum
  is rounded once, in llama.py's order, and fp16 is rounded to nearest even as torch's .half().
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metroline.kernels as K
from metroline.kernels import fused
from metroline.kernels.kv_cache import dequantize_int8_rows, quantize_int8_rows, row_width
from metroline.model.llama import apply_rotary

ISAS = ["scalar", "avx2", "avx512"]
EPS = 1e-5


def _isa_or_skip(isa: str) -> str:
    if not fused.available("rms_norm"):
        pytest.skip(f"C++ fused kernels not built: {K.unavailable_reason()}")
    if isa not in fused.supported_isas():
        pytest.skip(f"this CPU lacks {isa} (has: {K.cpu_features() or 'no SIMD'})")
    return isa


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_close_rel(out, ref, rtol=1e-5):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), f"max err {err:.3g} vs max|ref| {ref.abs().max().item():.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (300, 576), (3, 37), (2, 8)])
def test_rms_norm(isa, shape):
    _isa_or_skip(isa)
    g = _gen(shape[0] * 1000 + shape[1])
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[1], generator=g)
    y = fused.rms_norm(x, w, EPS, isa=isa)
    assert_close_rel(y, F.rms_norm(x, (shape[1],), w, EPS))
    assert_close_rel(y, fused.rms_norm_torch(x, w, EPS))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1, 576), (300, 576), (3, 37)])
def test_add_rms_norm_in_place(isa, shape):
    _isa_or_skip(isa)
    g = _gen(shape[0] + shape[1])
    x = torch.randn(shape, generator=g)
    res = torch.randn(shape, generator=g) * 4
    w = torch.randn(shape[1], generator=g)
    x1, res1 = x.clone(), res.clone()
    fused.add_rms_norm(x1, res1, w, EPS, isa=isa)
    assert torch.equal(res1, x + res)
    assert_close_rel(x1, F.rms_norm(x + res, (shape[1],), w, EPS))
    x2, res2 = x.clone(), res.clone()
    fused.add_rms_norm_torch(x2, res2, w, EPS)
    assert torch.equal(res2, res1)
    assert_close_rel(x1, x2)


def test_rms_norm_strided_rows_and_leading_dims():
    _isa_or_skip("scalar")
    g = _gen(5)
    big = torch.randn(4, 1000, generator=g)
    x = big[:, 100:676]  # rows of a wider buffer: stride 1000
    w = torch.randn(576, generator=g)
    assert_close_rel(fused.rms_norm(x, w, EPS), F.rms_norm(x, (576,), w, EPS))
    x3 = torch.randn(2, 3, 576, generator=g)
    assert_close_rel(fused.rms_norm(x3, w, EPS), F.rms_norm(x3, (576,), w, EPS))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1, 1536), (300, 1536), (3, 37)])
def test_silu_mul(isa, shape):
    _isa_or_skip(isa)
    T, I = shape
    g = _gen(T * I)
    x = torch.randn(T, 2 * I, generator=g) * 4
    x[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.5, -88.5, 1e-30, -20.0])
    y = fused.silu_mul(x, isa=isa)
    ref = F.silu(x[:, :I]) * x[:, I:]
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(fused.silu_mul_torch(x), ref, rtol=0, atol=0)


class Rope:
    """A step's q/k/v as views of one qkv buffer (as LlamaAttention has them), tables, caches."""

    def __init__(self, T, hq, hkv, d, dtype, seed=0, num_slots=64, theta=100000.0):
        g = _gen(seed)
        self.hq, self.hkv, self.d = hq, hkv, d
        self.qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=g)
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        freqs = torch.outer(torch.arange(4096).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_table, self.sin_table = emb.cos(), emb.sin()
        self.positions = torch.randint(0, 4096, (T,), generator=g)
        self.slots = torch.randperm(num_slots, generator=g)[:T]
        if T > 1:
            self.slots[1] = -1  # a token whose K/V is not kept
        row = row_width(dtype, d)
        sentinel = torch.full((num_slots, hkv, row), 7.0)
        self.k_cache, self.v_cache = sentinel.to(dtype), sentinel.to(dtype)

    def views(self, qkv):
        T, hq, hkv, d = qkv.shape[0], self.hq, self.hkv, self.d
        q = qkv[:, :hq * d].view(T, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
        return q, k, v


def _rope_reference(r: Rope):
    """llama.py's own apply_rotary, then index_copy_ of the kept slots."""
    q, k, v = r.views(r.qkv)
    cos, sin = r.cos_table[r.positions].unsqueeze(1), r.sin_table[r.positions].unsqueeze(1)
    qk = apply_rotary(torch.cat([q, k], dim=1), cos, sin)
    kc, vc = r.k_cache.clone(), r.v_cache.clone()
    keep = r.slots >= 0
    if kc.dtype == torch.int8:
        kc[r.slots[keep]] = quantize_int8_rows(qk[keep][:, r.hq:])
        vc[r.slots[keep]] = quantize_int8_rows(v[keep])
    else:
        kc[r.slots[keep]] = qk[keep][:, r.hq:].to(kc.dtype)
        vc[r.slots[keep]] = v[keep].to(vc.dtype)
    return qk[:, :r.hq], qk[:, r.hq:], kc, vc


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=["fp32", "fp16", "int8"])
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 128), (2, 1, 40)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("T", [1, 5, 300])
@pytest.mark.parametrize("by_position", [False, True], ids=["rows", "positions"])
def test_rope_kv_write_bit_exact(isa, dtype, heads, T, by_position):
    _isa_or_skip(isa)
    r = Rope(T, *heads, dtype=dtype, seed=T, num_slots=max(64, T + 8))
    ref_q, ref_k, ref_kc, ref_vc = _rope_reference(r)
    qkv = r.qkv.clone()
    q, k, v = r.views(qkv)
    v_before = v.clone()
    kc, vc = r.k_cache.clone(), r.v_cache.clone()
    if by_position:
        fused.rope_kv_write(q, k, v, r.cos_table, r.sin_table, kc, vc, r.slots, positions=r.positions, isa=isa)
    else:  # llama.py's [T, 1, D] rows
        cos, sin = r.cos_table[r.positions].unsqueeze(1), r.sin_table[r.positions].unsqueeze(1)
        fused.rope_kv_write(q, k, v, cos, sin, kc, vc, r.slots, isa=isa)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k) and torch.equal(v, v_before)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)  # untouched slots keep the sentinel


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=["fp16", "int8"])
def test_rope_kv_write_twin_bit_exact(dtype):
    r = Rope(7, 9, 3, 64, dtype, seed=3)
    ref_q, ref_k, ref_kc, ref_vc = _rope_reference(r)
    qkv = r.qkv.clone()
    q, k, v = r.views(qkv)
    kc, vc = r.k_cache.clone(), r.v_cache.clone()
    fused.rope_kv_write_torch(q, k, v, r.cos_table, r.sin_table, kc, vc, r.slots, positions=r.positions)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k) and torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)


def test_fp16_conversion_edges_bit_exact():
    """Ties, subnormals, overflow to inf, -0: the scalar path's software fp16 and F16C's agree with torch."""
    vals = torch.tensor([0.0, -0.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8,
                         2 ** -24, 1.5 * 2 ** -24, 6.1e-5, -2.5e-6, float("inf"), 0.1])
    d = 64
    row = torch.cat([vals, torch.linspace(-70000, 70000, d - len(vals))])
    for isa in fused.supported_isas():
        q, k, v = torch.zeros(1, 1, d), torch.zeros(1, 1, d), row.view(1, 1, d).clone()
        kc, vc = torch.zeros(4, 1, d, dtype=torch.float16), torch.zeros(4, 1, d, dtype=torch.float16)
        ones, zeros = torch.ones(1, d), torch.zeros(1, d)
        fused.rope_kv_write(q, k, v, ones, zeros, kc, vc, torch.tensor([2]), isa=isa)
        assert torch.equal(vc[2, 0].view(torch.int16), row.half().view(torch.int16)), isa


def test_int8_rows_edges_bit_exact():
    """Zero rows (scale 0), ties at .5, values at +-amax, tiny and huge rows: the C++ writer's bytes
    equal kv_cache.quantize_int8_rows', and every value is within half a step of its row's scale d,
    plus what the clamp at 127 d cuts off when fp16 rounded d down (d = 0 for a row below fp16's range)."""
    d = 64
    g = _gen(11)
    rows = torch.stack([torch.zeros(d), torch.arange(d) - 31.5, torch.randn(d, generator=g) * 1e-6,
                        torch.randn(d, generator=g) * 3e3, torch.full((d,), -2.0),
                        torch.linspace(-127, 127, d) / 127 * 0.5])
    n = rows.shape[0]
    ref = quantize_int8_rows(rows.view(n, 1, d))
    for isa in fused.supported_isas():
        q, k = torch.zeros(n, 1, d), torch.zeros(n, 1, d)
        kc, vc = torch.zeros(n, 1, d + 2, dtype=torch.int8), torch.zeros(n, 1, d + 2, dtype=torch.int8)
        fused.rope_kv_write(q, k, rows.view(n, 1, d).clone(), torch.ones(n, d), torch.zeros(n, d), kc, vc,
                            torch.arange(n), isa=isa)
        assert torch.equal(vc, ref), isa
    back = dequantize_int8_rows(ref).view(n, d)
    scale = ref[..., -2:].contiguous().view(torch.float16).float().view(n, 1)
    amax = rows.abs().amax(-1, keepdim=True)
    bound = scale / 2 * (1 + 1e-3) + (amax - 127 * scale).clamp(min=0) + 1e-12
    assert torch.all((back - rows).abs() <= bound)
    assert torch.all(scale[[1, 3, 4, 5]] > 0) and scale[2] < 1e-7  # the 1e-6 row is below fp16's range
    assert torch.equal(back[0], torch.zeros(d)) and ref[:, 0, :d].abs().max() <= 127


def test_bad_arguments_raise():
    _isa_or_skip("scalar")
    r = Rope(3, 9, 3, 64, torch.float32)
    q, k, v = r.views(r.qkv.clone())
    cos, sin = r.cos_table[:3], r.sin_table[:3]
    with pytest.raises(RuntimeError, match="outside the cache"):
        fused.rope_kv_write(q, k, v, cos, sin, r.k_cache, r.v_cache, torch.tensor([0, 1, 64]))
    with pytest.raises(RuntimeError, match="outside the"):
        fused.rope_kv_write(q, k, v, cos, sin, r.k_cache, r.v_cache, r.slots, positions=torch.tensor([0, 1, 3]))
    with pytest.raises(RuntimeError, match="expected"):  # int8 rows need head_dim + 2 bytes
        fused.rope_kv_write(q, k, v, cos, sin, r.k_cache.to(torch.int8), r.v_cache.to(torch.int8), r.slots)
    with pytest.raises(RuntimeError, match="float16, float32 or int8"):
        torch.ops.metroline.rope_kv_write(q, k, v, cos, sin, None, r.k_cache.bfloat16(), r.v_cache.bfloat16(),
                                          r.slots)
    with pytest.raises(RuntimeError, match="weight"):
        fused.rms_norm(torch.randn(2, 576), torch.randn(575), EPS)
    with pytest.raises(RuntimeError, match="2 \\* I"):
        fused.silu_mul(torch.randn(2, 5))
    with pytest.raises(ValueError, match="unknown isa"):
        fused.silu_mul(torch.randn(2, 8), isa="neon")


def test_force_isa_and_fake_registrations():
    _isa_or_skip("scalar")
    x = torch.randn(4, 576)
    w = torch.randn(576)
    with K.force_isa("scalar"):
        assert_close_rel(fused.rms_norm(x, w, EPS), F.rms_norm(x, (576,), w, EPS))
    ops = torch.ops.metroline
    torch.library.opcheck(ops.rms_norm.default, (x, w, EPS))
    torch.library.opcheck(ops.add_rms_norm.default, (x.clone(), x.clone(), w, EPS))
    torch.library.opcheck(ops.silu_mul.default, (torch.randn(3, 64),))
    r = Rope(3, 9, 3, 64, torch.float16)
    q, k, v = r.views(r.qkv.clone())
    torch.library.opcheck(ops.rope_kv_write.default, (q, k, v, r.cos_table, r.sin_table, r.positions, r.k_cache,
                                                      r.v_cache, r.slots))
