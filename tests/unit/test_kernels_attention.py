"""metroline.kernels.attention: paged decode attention against its pure-torch twin.

Each kernel path this CPU runs (scalar, avx2, avx512) is forced in turn; the ones it lacks are
skipped with the reason. The reference is the twin: per sequence, K/V gathered by slot (fp16
caches cast to fp32), then scaled_dot_product_attention with the bottom-right causal mask; the
twin itself is checked against the engine's TorchAttentionBackend on the same cache.

Tolerance: max|out - ref| <= 1e-5 * max|ref| per call, fp32, fp16 and int8 caches alike (the
kernel widens fp16 and int8 exactly and sums in fp32; int8 rows' scales are folded into the scores
and the softmax weights, where the twin dequantizes the rows first; measured 1e-7..3e-6, growing
with the context). Against the fp32 values a cache was rounded from, the bound is the format's:
2e-3 relative for fp16, 2e-2 for int8 rows (each value within amax/254 of its row).
"""

from __future__ import annotations

import pytest
import torch

import metroline.kernels as K
from metroline.attention.backend import SeqInfo, TorchAttentionBackend
from metroline.kernels import fused
from metroline.kernels.attention import paged_attention_decode, paged_attention_decode_torch
from metroline.kernels.kv_cache import quantize_int8_rows

ISAS = ["scalar", "avx2", "avx512"]
HEADS = [(9, 3, 64), (4, 4, 128)]  # the default model (GQA 3:1), and MHA with a wider head
CONTEXTS = [1, 15, 16, 17, 300, 2000]
RTOL = 1e-5

needs_op = pytest.mark.skipif(not fused.available("paged_attention_decode"),
                              reason=f"C++ attention kernel not built: {K.unavailable_reason()}")


def _isa_or_skip(isa: str) -> str:
    if not fused.available("paged_attention_decode"):
        pytest.skip(f"C++ attention kernel not built: {K.unavailable_reason()}")
    if isa not in fused.supported_isas():
        pytest.skip(f"this CPU lacks {isa} (has: {K.cpu_features() or 'no SIMD'})")
    return isa


class Batch:
    """Sequences over a shuffled block pool: caches, block tables, lengths, queries."""

    def __init__(self, contexts, q_lens, hq=9, hkv=3, d=64, dtype=torch.float32, block_size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.block_size, self.hq, self.hkv, self.d = block_size, hq, hkv, d
        need = [-(-c // block_size) for c in contexts]
        num_blocks = sum(need) + 3
        self.k32 = torch.randn(num_blocks * block_size, hkv, d, generator=g)
        self.v32 = torch.randn(num_blocks * block_size, hkv, d, generator=g)
        if dtype == torch.int8:
            self.k_cache, self.v_cache = quantize_int8_rows(self.k32), quantize_int8_rows(self.v32)
        else:
            self.k_cache, self.v_cache = self.k32.to(dtype), self.v32.to(dtype)
        perm = torch.randperm(num_blocks, generator=g).tolist()
        self.block_ids, at = [], 0
        for n in need:
            self.block_ids.append(perm[at:at + n])
            at += n
        width = max(need) + 2  # unused trailing entries, as a real table has
        self.block_tables = torch.full((len(contexts), width), 10 ** 6, dtype=torch.int32)
        for b, ids in enumerate(self.block_ids):
            self.block_tables[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        self.context_lens = torch.tensor(contexts, dtype=torch.int32)
        self.query_start_loc = torch.tensor([0] + list(q_lens), dtype=torch.int32).cumsum(0).int()
        self.q = torch.randn(int(self.query_start_loc[-1]), hq, d, generator=g)
        self.scale = d ** -0.5

    def args(self, q=None, k_cache=None, v_cache=None):
        return (self.q if q is None else q, self.k_cache if k_cache is None else k_cache,
                self.v_cache if v_cache is None else v_cache, self.block_tables, self.context_lens,
                self.query_start_loc, self.scale, self.block_size)

    def run(self, isa, **kw):
        return paged_attention_decode(*self.args(**kw), isa=isa)

    def ref(self, **kw):
        return paged_attention_decode_torch(*self.args(**kw))


def assert_close_rel(out, ref, rtol=RTOL):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), f"max err {err:.3g} vs max|ref| {ref.abs().max().item():.3g}"


@needs_op
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=["fp32", "fp16", "int8"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
def test_each_context_alone(isa, dtype, heads):
    _isa_or_skip(isa)
    for ctx in CONTEXTS:
        for q_len in sorted({1, min(ctx, 3)}):
            b = Batch([ctx], [q_len], *heads, dtype=dtype, seed=ctx)
            assert_close_rel(b.run(isa), b.ref())


@needs_op
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=["fp32", "fp16", "int8"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
def test_mixed_batch(isa, dtype, heads):
    """One call over sequences of mixed lengths, q_len 1..5 (speculative verification rows)."""
    _isa_or_skip(isa)
    contexts = [1, 15, 16, 17, 300, 2000, 40, 5]
    q_lens = [1, 2, 5, 3, 4, 1, 5, 5]
    b = Batch(contexts, q_lens, *heads, dtype=dtype, seed=1)
    assert_close_rel(b.run(isa), b.ref())


@needs_op
@pytest.mark.parametrize("isa", ISAS)
def test_fp16_cache_within_fp16_rounding_of_fp32_values(isa):
    _isa_or_skip(isa)
    b = Batch([300, 17], [1, 4], dtype=torch.float16, seed=2)
    out = b.run(isa)
    ref32 = b.ref(k_cache=b.k32, v_cache=b.v32)
    assert_close_rel(out, ref32, rtol=2e-3)


@needs_op
@pytest.mark.parametrize("isa", ISAS)
def test_int8_cache_within_int8_rounding_of_fp32_values(isa):
    _isa_or_skip(isa)
    b = Batch([300, 17, 2000], [1, 4, 2], dtype=torch.int8, seed=2)
    out = b.run(isa)
    ref32 = b.ref(k_cache=b.k32, v_cache=b.v32)
    assert_close_rel(out, ref32, rtol=2e-2)
    # and not within fp16's bound: the test sees the format's loss
    assert (out - ref32).abs().max().item() > 2e-3 * ref32.abs().max().item()


@needs_op
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=["fp16", "int8"])
def test_simd_agrees_with_scalar(isa, dtype):
    _isa_or_skip(isa)
    b = Batch([2000, 33, 1], [16, 1, 1], dtype=dtype, seed=3)
    assert_close_rel(b.run(isa), b.run("scalar"))


@needs_op
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_other_block_sizes(isa, block_size):
    _isa_or_skip(isa)
    b = Batch([1, 70, 301], [1, 3, 2], block_size=block_size, seed=4)
    assert_close_rel(b.run(isa), b.ref())


@needs_op
@pytest.mark.parametrize("isa", ISAS)
def test_long_context_split_over_threads(isa):
    """One sequence, few kv heads: two threads cut the keys into splits (flash-decoding) and
    merge them; the result matches the one-thread run and the reference."""
    _isa_or_skip(isa)
    b = Batch([5000], [2], dtype=torch.float16, seed=5)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = b.run(isa)
        torch.set_num_threads(2)
        two = b.run(isa)
    finally:
        torch.set_num_threads(old)
    ref = b.ref()
    assert_close_rel(one, ref)
    assert_close_rel(two, ref)
    assert_close_rel(two, one)


@needs_op
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=["fp16", "int8"])
def test_prefill_shapes_agree_with_scalar(isa, dtype):
    """The engine's prefill calls: a whole prompt (q_len == context, 34 as the chat-templated
    default prompt, not a multiple of the chunk or the block), a prefill chunk over a cache and a
    decode in one batch; q_len past one item's rows, so queries run in several tiles."""
    _isa_or_skip(isa)
    b = Batch([34, 61, 300], [34, 29, 1], dtype=dtype, seed=8)
    out = b.run(isa)
    assert_close_rel(out, b.ref())
    assert_close_rel(out, b.run("scalar"))


@needs_op
def test_long_query_runs_in_tiles():
    """q_len beyond one item's rows (64 // G queries) is cut into query tiles."""
    b = Batch([400, 90], [60, 30], seed=6)
    assert_close_rel(b.run("auto"), b.ref())


@needs_op
def test_strided_q_rows_outside_and_empty_sequences():
    """q may be a view of the qkv projection; rows no sequence owns come back 0."""
    b = Batch([50, 20, 33], [2, 0, 1], seed=7)
    T, hq, d = b.q.shape
    qkv = torch.randn(T + 2, (hq + 6) * d)
    q = qkv[1:T + 1, :hq * d].view(T, hq, d)
    q.copy_(b.q)
    assert not q.is_contiguous()
    assert_close_rel(b.run("auto", q=q), b.ref())
    # Offsets: the sequences own rows 1..T of a longer batch.
    b.query_start_loc += 1
    q2 = torch.cat([torch.randn(1, hq, d), b.q, torch.randn(2, hq, d)])
    out = b.run("auto", q=q2)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    assert_close_rel(out, b.ref(q=q2))


@needs_op
def test_matches_the_engine_backend():
    """Same cache, same sequences: the kernel equals TorchAttentionBackend.forward (decodes with
    and without drafts, one of them at a block edge)."""
    hq, hkv, d, bs = 9, 3, 64, 16
    g = torch.Generator().manual_seed(8)
    seqs = [SeqInfo(1, 15, [3]), SeqInfo(4, 40, [5, 0, 7]), SeqInfo(1, 299, list(range(8, 27))),
            SeqInfo(2, 16, [1, 2])]
    backend = TorchAttentionBackend()
    meta = backend.build_metadata(seqs, bs, torch.device("cpu"))
    T = sum(s.num_new_tokens for s in seqs)
    k_cache = torch.randn(32 * bs, hkv, d, generator=g)
    v_cache = torch.randn(32 * bs, hkv, d, generator=g)
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hkv, hkv))
    ref = backend.forward(q, k, v, (k_cache, v_cache), meta, d ** -0.5)  # writes k, v first
    width = max(len(s.block_ids) for s in seqs)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, s in enumerate(seqs):
        tables[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
    ctx = torch.tensor([s.start_pos + s.num_new_tokens for s in seqs], dtype=torch.int32)
    qsl = torch.tensor([0] + [s.num_new_tokens for s in seqs]).cumsum(0).int()
    out = paged_attention_decode(q, k_cache, v_cache, tables, ctx, qsl, d ** -0.5, bs)
    assert_close_rel(out, ref)
    assert_close_rel(paged_attention_decode_torch(q, k_cache, v_cache, tables, ctx, qsl, d ** -0.5, bs), ref)


@needs_op
def test_bad_arguments_raise():
    b = Batch([40, 3], [1, 1], seed=9)
    bad = b.block_tables.clone()
    bad[0, 1] = 999  # a block the cache does not have, inside the context
    with pytest.raises(RuntimeError, match="outside the cache"):
        paged_attention_decode(b.q, b.k_cache, b.v_cache, bad, b.context_lens, b.query_start_loc, 0.1, 16)
    with pytest.raises(RuntimeError, match="q_len"):
        long_ctx = torch.tensor([40, 10 ** 5], dtype=torch.int32)
        paged_attention_decode(b.q, b.k_cache, b.v_cache, b.block_tables, long_ctx, b.query_start_loc, 0.1, 16)
    with pytest.raises(RuntimeError, match="float16, float32 or int8"):  # the wrapper would run the twin
        torch.ops.metroline.paged_attention_decode(b.q, b.k_cache.bfloat16(), b.v_cache.bfloat16(), b.block_tables,
                                                   b.context_lens, b.query_start_loc, 0.1, 16)
    i8 = quantize_int8_rows(b.k32)
    with pytest.raises(RuntimeError, match="head_dim"):  # int8 rows without their scale bytes
        paged_attention_decode(b.q, i8[..., :-2].contiguous(), i8[..., :-2].contiguous(), b.block_tables,
                               b.context_lens, b.query_start_loc, 0.1, 16)
    with pytest.raises(RuntimeError, match="int32"):
        paged_attention_decode(b.q, b.k_cache, b.v_cache, b.block_tables.long(), b.context_lens,
                               b.query_start_loc, 0.1, 16)
    with pytest.raises(ValueError, match="unknown isa"):
        b.run("sse9")
    missing = [i for i in ISAS if i not in fused.supported_isas()]
    if missing:
        with pytest.raises(RuntimeError, match="cannot run"):
            b.run(missing[-1])


@needs_op
def test_force_isa_and_fake_registration():
    b = Batch([33], [2], seed=10)
    with K.force_isa("scalar"):
        assert_close_rel(b.run(None), b.ref())
    torch.library.opcheck(torch.ops.metroline.paged_attention_decode.default, b.args() + (-1,))
