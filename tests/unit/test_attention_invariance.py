"""The paged-attention kernel is batch-invariant: a query's output is bit-identical whatever
else is in the call, however its prompt was chunked, and at any thread count. The packed
matmuls quantize activations to int8, which turns a last-bit difference into a different
rounding; invariance is what keeps batched == alone exact on the packed path."""

from __future__ import annotations

import pytest
import torch

from metroline.kernels import fused
from metroline.kernels.attention import paged_attention_decode

pytestmark = pytest.mark.skipif(not fused.available("paged_attention_decode"),
                                reason="C++ kernels not built")

HQ, HKV, D, BS = 9, 3, 64, 16


@pytest.fixture(scope="module")
def cache():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(700 * BS, HKV, D, generator=g).half()
    v = torch.randn(700 * BS, HKV, D, generator=g).half()
    q = torch.randn(3000, HQ, D, generator=g)
    return k, v, q


def attend(cache, seqs, q):
    k, v, _ = cache
    width = max(len(b) for *_, b in seqs)
    table = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, (_, _, b) in enumerate(seqs):
        table[i, :len(b)] = torch.tensor(b)
    ctx = torch.tensor([c for c, _, _ in seqs], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor([n for _, n, _ in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    return paged_attention_decode(q, k, v, table, ctx, qsl, D ** -0.5, BS)


@pytest.mark.parametrize("threads", [1, 2])
def test_bit_identical_alone_batched_chunked_and_speculative(cache, threads):
    _, _, q = cache
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        long_seq = (1200, 1, list(range(75)))
        alone = attend(cache, [long_seq], q[:1])
        batched = attend(cache, [(40, 1, list(range(100, 103))), long_seq, (300, 5, list(range(200, 219)))],
                         torch.cat([q[1:2], q[:1], q[2:7]]))
        assert torch.equal(alone[0], batched[1])
        blocks = list(range(300, 369))
        whole = attend(cache, [(1100, 1100, blocks)], q[:1100])
        first = attend(cache, [(600, 600, blocks)], q[:600])
        rest = attend(cache, [(1100, 500, blocks)], q[600:1100])
        assert torch.equal(whole, torch.cat([first, rest]))
        verify = attend(cache, [(900, 4, blocks)], q[:4])
        decodes = torch.cat([attend(cache, [(897 + i, 1, blocks)], q[i:i + 1]) for i in range(4)])
        assert torch.equal(verify, decodes)
    finally:
        torch.set_num_threads(old)
