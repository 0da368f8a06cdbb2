"""Paged attention: one interface, and a pure-torch backend that runs on any device.

KV cache layout, per layer: two tensors [num_blocks * block_size, num_kv_heads, R], R = head_dim
(fp32 / fp16 / bf16 / fp8), or head_dim + 2 for int8 rows with their scale (kernels/kv_cache.py).
A token's slot is block_id * block_size + offset; `slot_mapping[i]` is where token i of the
flat batch writes its K and V. Sequences are ordered decode-like first (a few query tokens,
at most MAX_DECODE_QUERY: a decode, or a decode with draft tokens to verify, over a cache),
then prefill chunks (any number of query tokens over any number of cached ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from metroline.kernels.kv_cache import CPU_KERNEL_KV_DTYPES, bytes_per_row, read_rows, row_width, write_rows

# A sequence with at most this many query tokens over a non-empty cache is attended like a
# decode (batched with others, no per-sequence call): speculative verification of k drafts
# has k + 1 query tokens.
MAX_DECODE_QUERY = 16


@dataclass
class SeqInfo:
    """What attention needs to know of one scheduled sequence."""

    num_new_tokens: int  # query tokens this step
    start_pos: int  # tokens already in the cache before this step
    block_ids: Sequence[int]


@dataclass
class PrefillSeq:
    q_start: int  # offset of its first query token in the flat batch
    q_len: int
    start_pos: int
    kv_slots: torch.Tensor | None  # slots of all its tokens (cached + new); None when start_pos == 0


@dataclass
class DecodeBucket:
    """Decode-like sequences of similar context length, attended together in one padded call.

    With one query token each (plain decodes) the bucket's rows are start..start+b. With up to
    Q query tokens each, `q_rows[i, j]` is the flat row of sequence i's query j (padding
    repeats the sequence's last real query), `q_valid` says which are real, and the mask is
    causal: query j of a sequence at position p0 + j sees its keys 0..p0 + j."""

    start: int  # first query row in the flat batch
    slots: torch.Tensor  # [b, L] int64 (padded; see mask)
    mask: torch.Tensor  # [b, 1, Q, L] bool, True where a key is visible
    q_rows: torch.Tensor | None = None  # [b, Q] int64, when Q > 1
    q_valid: torch.Tensor | None = None  # [b, Q] bool, when Q > 1
    num_rows: int = 0  # query rows of the flat batch covered (sum of q_len)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    num_decode_tokens: int = 0
    decode_buckets: list[DecodeBucket] = field(default_factory=list)
    prefills: list[PrefillSeq] = field(default_factory=list)


class AttentionBackend:
    """Interface every attention backend implements. Chosen once, at start-up, by name.

    A backend with `fuses_rope` receives q and k before RoPE, with the model's whole cos/sin
    tables (`rope`), and applies it itself (fused with the K/V write)."""

    name = "abstract"
    fuses_rope = False
    # The cache formats it reads (kernels/kv_cache.py), and the one it takes by default (None:
    # the model's dtype).
    kv_cache_dtypes: tuple[torch.dtype, ...] = ()
    default_kv_cache_dtype: torch.dtype | None = None

    def __init__(self, kv_cache_dtype: torch.dtype | None = None):
        if kv_cache_dtype is not None and kv_cache_dtype not in self.kv_cache_dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.kv_cache_dtypes)
            raise ValueError(f"the {self.name} attention backend keeps its KV cache in {names}, "
                             f"not {str(kv_cache_dtype).removeprefix('torch.')}")
        self.kv_cache_dtype = kv_cache_dtype or self.default_kv_cache_dtype

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return self.kv_cache_dtype or model_dtype

    def kv_bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int,
                           model_dtype: torch.dtype) -> int:
        """K and V of one token in every layer."""
        return 2 * num_layers * num_kv_heads * bytes_per_row(self.cache_dtype(model_dtype), head_dim)

    def allocate_kv_cache(self, num_layers: int, num_blocks: int, block_size: int,
                          num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                          device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`dtype`: the model's (the cache's own when the backend was given none)."""
        # Uninitialised on purpose (the pages are only touched as blocks fill): no slot is read
        # before it is written, since padded decode slots point at a sequence's own first token.
        dtype = self.cache_dtype(dtype)
        shape = (num_blocks * block_size, num_kv_heads, row_width(dtype, head_dim))
        return [(torch.empty(shape, dtype=dtype, device=device),
                 torch.empty(shape, dtype=dtype, device=device)) for _ in range(num_layers)]

    def build_metadata(self, seqs: Sequence[SeqInfo], block_size: int,
                       device: torch.device) -> AttentionMetadata:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def is_decode_like(num_new_tokens: int, start_pos: int) -> bool:
        """Attended in a batched decode call rather than the per-sequence prefill path."""
        return num_new_tokens == 1 or (start_pos > 0 and num_new_tokens <= MAX_DECODE_QUERY)


def _slots_of(block_ids: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _length_buckets(decodes: list[SeqInfo], max_waste: float = 1.5, min_size: int = 4) -> list[list[SeqInfo]]:
    """Split consecutive decode-likes (the runner sorts them by length) into groups whose
    longest context is at most `max_waste` times the shortest, so padding inside a group stays
    small; tiny groups are merged, since each group costs a few extra ops per layer."""
    groups: list[list[SeqInfo]] = []
    for s in decodes:
        if (groups and (s.start_pos + 1 <= max_waste * (groups[-1][0].start_pos + 1)
                        or len(groups[-1]) < min_size)):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def _decode_bucket(start: int, group: list[SeqInfo], block_size: int, device) -> DecodeBucket:
    seq_lens = torch.tensor([s.start_pos + s.num_new_tokens for s in group], dtype=torch.int64)
    max_blocks = max((s.start_pos + s.num_new_tokens - 1) // block_size + 1 for s in group)
    table = torch.zeros(len(group), max_blocks, dtype=torch.int64)
    for i, s in enumerate(group):
        n = (s.start_pos + s.num_new_tokens - 1) // block_size + 1
        table[i, :n] = torch.as_tensor(list(s.block_ids[:n]), dtype=torch.int64)
    slots = (table.unsqueeze(-1) * block_size + torch.arange(block_size)).reshape(len(group), -1)
    L = int(seq_lens.max())
    slots = slots[:, :L]
    key_ok = torch.arange(L).unsqueeze(0) < seq_lens.unsqueeze(1)  # [b, L]
    # Padding points at a real slot (the sequence's first); the mask hides it.
    slots = torch.where(key_ok, slots, slots[:, :1])
    q_lens = [s.num_new_tokens for s in group]
    Q = max(q_lens)
    num_rows = sum(q_lens)
    if Q == 1:
        return DecodeBucket(start, slots.to(device), key_ok.view(len(group), 1, 1, L).to(device),
                            num_rows=num_rows)
    q_len = torch.tensor(q_lens, dtype=torch.int64)
    j = torch.arange(Q).unsqueeze(0)  # [1, Q]
    q_valid = j < q_len.unsqueeze(1)
    firsts = torch.tensor([0] + q_lens[:-1], dtype=torch.int64).cumsum(0) + start
    q_rows = firsts.unsqueeze(1) + torch.minimum(j, q_len.unsqueeze(1) - 1)
    # Query j sits at position start_pos + j: it sees keys < start_pos + j + 1.
    start_pos = torch.tensor([s.start_pos for s in group], dtype=torch.int64)
    limit = (start_pos.unsqueeze(1) + torch.minimum(j, q_len.unsqueeze(1) - 1) + 1)  # [b, Q]
    mask = torch.arange(L).view(1, 1, L) < limit.unsqueeze(2)  # [b, Q, L]
    return DecodeBucket(start, slots.to(device), mask.unsqueeze(1).to(device),
                        q_rows.to(device), q_valid.to(device), num_rows)


class TorchAttentionBackend(AttentionBackend):
    """Runs anywhere torch runs. Decodes are batched into a few padded attention calls per
    layer over gathered K/V, grouped by context length so the padding stays small (padding
    exists only inside attention, never in the flat token batch); prefill chunks
    use scaled_dot_product_attention per sequence, with a bottom-right causal mask when part
    of the sequence is already cached. A cache in a lossy format (int8, fp8) is read back for
    every query, the chunk's own keys included, so attention sees what is stored, as the C++
    backend does."""

    name = "torch"
    kv_cache_dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8)

    def build_metadata(self, seqs, block_size, device):
        slot_mapping: list[int] = []
        decodes = []
        prefills: list[PrefillSeq] = []
        q_start = 0
        for s in seqs:
            slot_mapping += _slots_of(s.block_ids, s.start_pos, s.start_pos + s.num_new_tokens, block_size)
            if self.is_decode_like(s.num_new_tokens, s.start_pos) and not prefills:
                decodes.append(s)
            else:
                assert s.num_new_tokens >= 1
                kv_slots = None
                if s.start_pos > 0:
                    kv_slots = torch.tensor(
                        _slots_of(s.block_ids, 0, s.start_pos + s.num_new_tokens, block_size),
                        dtype=torch.int64, device=device)
                prefills.append(PrefillSeq(q_start, s.num_new_tokens, s.start_pos, kv_slots))
            q_start += s.num_new_tokens
        meta = AttentionMetadata(torch.tensor(slot_mapping, dtype=torch.int64, device=device),
                                 num_decode_tokens=len(decodes), prefills=prefills)
        start = 0
        for group in _length_buckets(decodes):
            bucket = _decode_bucket(start, group, block_size, device)
            meta.decode_buckets.append(bucket)
            start += bucket.num_rows
        meta.num_decode_tokens = start
        return meta

    def forward(self, q, k, v, kv_cache, meta, scale):
        k_cache, v_cache = kv_cache
        write_rows(k_cache, meta.slot_mapping, k)
        write_rows(v_cache, meta.slot_mapping, v)
        lossy = k_cache.dtype in (torch.int8, torch.float8_e4m3fn)
        out = torch.empty_like(q)
        for b in meta.decode_buckets:
            kd = read_rows(k_cache, b.slots, q.dtype).transpose(1, 2)  # [b, Hkv, L, D]
            vd = read_rows(v_cache, b.slots, q.dtype).transpose(1, 2)
            if b.q_rows is None:  # one query each: rows are contiguous
                rows = slice(b.start, b.start + b.num_rows)
                o = F.scaled_dot_product_attention(q[rows].unsqueeze(2), kd, vd, attn_mask=b.mask,
                                                   scale=scale, enable_gqa=True)  # [b, Hq, 1, D]
                out[rows] = o.squeeze(2)
            else:
                qb = q[b.q_rows].transpose(1, 2)  # [b, Hq, Q, D]
                o = F.scaled_dot_product_attention(qb, kd, vd, attn_mask=b.mask, scale=scale,
                                                   enable_gqa=True).transpose(1, 2)  # [b, Q, Hq, D]
                out[b.q_rows[b.q_valid]] = o[b.q_valid]
        for p in meta.prefills:
            qs = q[p.q_start:p.q_start + p.q_len].transpose(0, 1)  # [Hq, Lq, D]
            if p.kv_slots is None:
                rows = slice(p.q_start, p.q_start + p.q_len)
                if lossy:
                    ks = read_rows(k_cache, meta.slot_mapping[rows], q.dtype).transpose(0, 1)
                    vs = read_rows(v_cache, meta.slot_mapping[rows], q.dtype).transpose(0, 1)
                else:
                    ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                   enable_gqa=True)
            else:
                ks = read_rows(k_cache, p.kv_slots, q.dtype).transpose(0, 1)
                vs = read_rows(v_cache, p.kv_slots, q.dtype).transpose(0, 1)
                Lk = ks.shape[1]
                # Query i sits at absolute position start_pos + i and sees keys 0..start_pos + i.
                mask = (torch.arange(Lk, device=q.device).unsqueeze(0)
                        <= torch.arange(p.q_len, device=q.device).unsqueeze(1) + p.start_pos)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                                   enable_gqa=True)
            out[p.q_start:p.q_start + p.q_len] = o.transpose(0, 1)
        return out


@dataclass
class PagedMetadata:
    """One step's layout for CpuPagedAttentionBackend: every sequence in one kernel call."""

    slot_mapping: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: tokens in the cache after this step's writes
    query_start_loc: torch.Tensor  # [B + 1] int32
    block_size: int = 16


class CpuPagedAttentionBackend(AttentionBackend):
    """metroline's C++ kernels (metroline.kernels): RoPE and the K/V write fused in one call per
    layer, then one paged-attention call for the whole batch, decodes and prefill chunks alike,
    reading K/V straight from the blocks. The cache is fp16 by default (half the bytes of fp32;
    widened in registers), or int8 rows with a per-token, per-head scale (--kv-cache-dtype int8:
    1.94x the tokens of fp16 at head_dim 64; the scales folded into scores and weights), or
    fp32. Each query's result depends only on its own keys, whatever else is batched."""

    name = "cpu"
    fuses_rope = True
    kv_cache_dtypes = CPU_KERNEL_KV_DTYPES
    default_kv_cache_dtype = torch.float16

    def build_metadata(self, seqs, block_size, device):
        # Plain lists, then one tensor each: this runs every step, ~5 tensors for any batch.
        slot_mapping: list[int] = []
        positions: list[int] = []
        qsl = [0]
        ctx = []
        rows = []
        for s in seqs:
            start, end = s.start_pos, s.start_pos + s.num_new_tokens
            slot_mapping += _slots_of(s.block_ids, start, end, block_size)
            positions += range(start, end)
            qsl.append(end - start + qsl[-1])
            ctx.append(end)
            rows.append(list(s.block_ids[:-(-end // block_size)]))
        width = max([len(r) for r in rows] + [1])
        table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)
        return PagedMetadata(torch.tensor(slot_mapping, dtype=torch.int64, device=device),
                             torch.tensor(positions, dtype=torch.int64, device=device),
                             table.view(len(seqs), width), torch.tensor(ctx, dtype=torch.int32, device=device),
                             torch.tensor(qsl, dtype=torch.int32, device=device), block_size)

    def forward(self, q, k, v, kv_cache, meta, scale, rope=None):
        from metroline.kernels.attention import paged_attention_decode
        from metroline.kernels.fused import rope_kv_write

        k_cache, v_cache = kv_cache
        if rope is not None:  # full cos/sin tables: the kernel picks each token's row
            rope_kv_write(q, k, v, rope[0], rope[1], k_cache, v_cache, meta.slot_mapping,
                          positions=meta.positions)
        else:
            write_rows(k_cache, meta.slot_mapping, k)
            write_rows(v_cache, meta.slot_mapping, v)
        return paged_attention_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                      meta.query_start_loc, scale, meta.block_size)


_BACKENDS = {"torch": TorchAttentionBackend, "cpu": CpuPagedAttentionBackend}


def get_attention_backend(name: str, kv_cache_dtype: torch.dtype | None = None) -> AttentionBackend:
    """A backend by name ('auto' is resolved by metroline.platform; a CUDA backend, e.g.
    flash-attn or FlashInfer, registers here when present), with its KV cache format (None: the
    backend's default); ValueError when it cannot keep that format."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (available: {sorted(_BACKENDS)})")
    return _BACKENDS[name](kv_cache_dtype)
