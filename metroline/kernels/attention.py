"""Paged decode attention on metroline's C++ kernels (csrc/attention*.cpp), and its pure-torch twin.

`paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
scale, block_size)` attends a flat batch of query rows over the paged KV cache in one call:

* q [T, Hq, D] fp32 (a strided view is fine: last dim contiguous); the caches
  [num_blocks * block_size, Hkv, R], fp16 or fp32 (R = D) or int8 rows with their fp16 scale
  (R = D + 2, kernels/kv_cache.py), with position p of sequence b in slot
  block_tables[b, p // block_size] * block_size + p % block_size (int32 [B, max_blocks]).
* Sequence b owns rows query_start_loc[b] .. query_start_loc[b+1] (int32 [B+1]): q_len query
  tokens, the last q_len of its context_lens[b] (int32 [B]) positions, already written to the
  cache. Query j sits at position context_len - q_len + j and sees keys 0..that position
  (causal), so q_len > 1 is speculative verification (or a chunk of prefill over a cache).
* Returns out [T, Hq, D] fp32; rows outside query_start_loc[0] .. query_start_loc[B] are 0.

K/V are read straight from their blocks (no gather copy), each K/V row once for the Hq/Hkv
query heads it serves, with fp32 online softmax; fp16 K/V are widened in registers, int8 K/V
too, their row scales folded into the scores and the softmax weights. Threads
take (sequence, kv head) items, and split long contexts (flash-decoding) when there are too
few items for the threads. Matches scaled_dot_product_attention on the gathered K/V (cast to
fp32) to ~1e-6 relative; tests/unit/test_kernels_attention.py states the tolerances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metroline.kernels.fused import _fallback, _isa, _op
from metroline.kernels.kv_cache import read_rows

__all__ = ["paged_attention_decode", "paged_attention_decode_torch"]

_attend = _op("paged_attention_decode")

if _attend is not None:
    @torch.library.register_fake("metroline::paged_attention_decode")
    def _paged_attention_decode_fake(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
                                     block_size, isa=-1):
        return q.new_empty(q.shape)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float, block_size: int,
                           isa: str | None = None) -> torch.Tensor:
    """Causal attention of each sequence's query rows over its cached keys (see the module doc)."""
    if _attend is not None and q.dtype is torch.float32 and k_cache.dtype in (torch.float32, torch.float16,
                                                                              torch.int8):
        return _attend(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, block_size,
                       _isa(isa))
    if _attend is None:
        _fallback("paged_attention_decode")
    return paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                        scale, block_size)


def paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                 scale: float, block_size: int) -> torch.Tensor:
    """Pure-torch twin: per sequence, gather its K/V by slot (as q's dtype) and call
    scaled_dot_product_attention with the bottom-right causal mask."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    qsl = query_start_loc.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = read_rows(k_cache, slots, q.dtype).transpose(0, 1)  # [Hkv, L, D]
        v = read_rows(v_cache, slots, q.dtype).transpose(0, 1)
        rows = torch.arange(q1 - q0, device=q.device) + (ctx - (q1 - q0))
        mask = pos.unsqueeze(0) <= rows.unsqueeze(1)  # [q_len, L]
        o = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k, v, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out[q0:q1] = o.transpose(0, 1)
    return out
