"""Paged attention: one interface, and a pure-torch backend that runs on any device.

KV cache layout, per layer: two tensors [num_blocks * block_size, num_kv_heads, head_dim].
A token's slot is block_id * block_size + offset; `slot_mapping[i]` is where token i of the
flat batch writes its K and V. Sequences are ordered decodes first (one query token each),
then prefill chunks (any number of query tokens over any number of cached ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F


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
    """Decodes of similar context length, attended together in one padded call."""

    start: int  # first query row in the flat batch
    slots: torch.Tensor  # [b, L] int64 (padded; see mask)
    mask: torch.Tensor  # [b, 1, 1, L] bool, True where a real token is


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    num_decode_tokens: int = 0
    decode_buckets: list[DecodeBucket] = field(default_factory=list)
    prefills: list[PrefillSeq] = field(default_factory=list)


class AttentionBackend:
    """Interface every attention backend implements. Chosen once, at start-up, by name."""

    name = "abstract"

    def allocate_kv_cache(self, num_layers: int, num_blocks: int, block_size: int,
                          num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                          device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Uninitialised on purpose (the pages are only touched as blocks fill): no slot is read
        # before it is written, since padded decode slots point at a sequence's own first token.
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        return [(torch.empty(shape, dtype=dtype, device=device),
                 torch.empty(shape, dtype=dtype, device=device)) for _ in range(num_layers)]

    def build_metadata(self, seqs: Sequence[SeqInfo], block_size: int,
                       device: torch.device) -> AttentionMetadata:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        raise NotImplementedError


def _slots_of(block_ids: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _length_buckets(decodes: list[SeqInfo], max_waste: float = 1.5, min_size: int = 4) -> list[list[SeqInfo]]:
    """Split consecutive decodes (the runner sorts them by length) into groups whose longest
    context is at most `max_waste` times the shortest, so padding inside a group stays small;
    tiny groups are merged, since each group costs a few extra ops per layer."""
    groups: list[list[SeqInfo]] = []
    for s in decodes:
        if (groups and (s.start_pos + 1 <= max_waste * (groups[-1][0].start_pos + 1)
                        or len(groups[-1]) < min_size)):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def _decode_bucket(start: int, group: list[SeqInfo], block_size: int, device) -> DecodeBucket:
    seq_lens = torch.tensor([s.start_pos + 1 for s in group], dtype=torch.int64)
    max_blocks = max(s.start_pos // block_size + 1 for s in group)
    table = torch.zeros(len(group), max_blocks, dtype=torch.int64)
    for i, s in enumerate(group):
        n = s.start_pos // block_size + 1
        table[i, :n] = torch.as_tensor(list(s.block_ids[:n]), dtype=torch.int64)
    slots = (table.unsqueeze(-1) * block_size + torch.arange(block_size)).reshape(len(group), -1)
    L = int(seq_lens.max())
    slots = slots[:, :L]
    mask = torch.arange(L).unsqueeze(0) < seq_lens.unsqueeze(1)
    # Padding points at a real slot (the sequence's first); the mask hides it.
    slots = torch.where(mask, slots, slots[:, :1])
    return DecodeBucket(start, slots.to(device), mask.view(len(group), 1, 1, L).to(device))


class TorchAttentionBackend(AttentionBackend):
    """Runs anywhere torch runs. Decodes are batched into a few padded attention calls per
    layer over gathered K/V, grouped by context length so the padding stays small (padding
    exists only inside attention, never in the flat token batch); prefill chunks
    use scaled_dot_product_attention per sequence, with a bottom-right causal mask when part
    of the sequence is already cached."""

    name = "torch"

    def build_metadata(self, seqs, block_size, device):
        slot_mapping: list[int] = []
        decodes = []
        prefills: list[PrefillSeq] = []
        q_start = 0
        for s in seqs:
            slot_mapping += _slots_of(s.block_ids, s.start_pos, s.start_pos + s.num_new_tokens, block_size)
            if s.num_new_tokens == 1 and not prefills:
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
            meta.decode_buckets.append(_decode_bucket(start, group, block_size, device))
            start += len(group)
        return meta

    def forward(self, q, k, v, kv_cache, meta, scale):
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for b in meta.decode_buckets:
            rows = slice(b.start, b.start + b.slots.shape[0])
            kd = k_cache[b.slots].transpose(1, 2)  # [b, Hkv, L, D]
            vd = v_cache[b.slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(q[rows].unsqueeze(2), kd, vd, attn_mask=b.mask,
                                               scale=scale, enable_gqa=True)  # [b, Hq, 1, D]
            out[rows] = o.squeeze(2)
        for p in meta.prefills:
            qs = q[p.q_start:p.q_start + p.q_len].transpose(0, 1)  # [Hq, Lq, D]
            if p.kv_slots is None:
                ks = k[p.q_start:p.q_start + p.q_len].transpose(0, 1)
                vs = v[p.q_start:p.q_start + p.q_len].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                   enable_gqa=True)
            else:
                ks = k_cache[p.kv_slots].transpose(0, 1)
                vs = v_cache[p.kv_slots].transpose(0, 1)
                Lk = ks.shape[1]
                # Query i sits at absolute position start_pos + i and sees keys 0..start_pos + i.
                mask = (torch.arange(Lk, device=q.device).unsqueeze(0)
                        <= torch.arange(p.q_len, device=q.device).unsqueeze(1) + p.start_pos)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                                   enable_gqa=True)
            out[p.q_start:p.q_start + p.q_len] = o.transpose(0, 1)
        return out


_BACKENDS = {"torch": TorchAttentionBackend}


def get_attention_backend(name: str = "auto", device: torch.device | None = None) -> AttentionBackend:
    """Resolve a backend by name. 'auto' picks the best one available for the device; a CUDA
    backend (flash-attn / FlashInfer) registers here when present."""
    if name == "auto":
        name = "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (available: {sorted(_BACKENDS)})")
    return _BACKENDS[name]()
