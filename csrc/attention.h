// Paged decode attention over the KV cache: plain C++, no torch headers (attention_ops.cpp is
// the torch-facing side). One kernel, attention_kernel.h, instantiated per ISA.
//
// KV cache, per layer: k_cache, v_cache [num_blocks * block_size, Hkv, R], fp16 or fp32 with
// R = D, or int8 with R = D + 2: a head's row is D int8 values q then their fp16 scale d
// (2 bytes, little-endian), x ~ d * q (kv_cache.h); position p of sequence b lives in slot block_tables[b][p / block_size] * block_size +
// p % block_size. Sequence b has q_len = query_start_loc[b+1] - query_start_loc[b] query
// tokens, the last q_len of its context_lens[b] positions (already in the cache): query j
// sits at position context_len - q_len + j and sees keys 0..that position.
//
// Work is cut into items: one kv head of one sequence, a run of its queries (all G = Hq/Hkv
// query heads of that kv head together, so each K/V row is read once for all of them) and a
// range of keys. An item covering every key it needs writes normalised rows to out; a split
// item (flash-decoding) leaves its unnormalised rows, maxima and sums in `part`, and
// attention_ops.cpp merges the splits.
#pragma once

#include <cstdint>

#include "kv_cache.h"

namespace metroline {

struct PagedAttnArgs {
  const float* q;  // [T, Hq, D], strides below (elements), last dim contiguous
  int64_t q_tok, q_head;
  const void* k_cache;  // float, uint16_t (fp16) or int8 rows (KvType), contiguous
  const void* v_cache;
  int kv;  // KvType
  const int32_t* block_tables;  // [B, bt_stride]
  int64_t bt_stride;
  const int32_t* context_lens;     // [B]
  const int32_t* query_start_loc;  // [B + 1]
  int64_t B;
  int64_t Hq, Hkv, D, block_size;
  float scale;
  float* out;  // [T, Hq, D] contiguous
};

// Kv head h of sequence b, queries [j0, j0 + nj) of its q_len, keys [k0, k1) (the kernel
// stops earlier where the causal limit of its last query says so). M = nj * G rows, row
// m = j * G + g is query j, query head h * G + g.
struct AttnItem {
  int32_t b, h, j0, nj, k0, k1;
};

// Rows an item may hold, and rows * D (the kernel keeps q and o for them on its stack).
constexpr int kAttnMaxRows = 64;
constexpr int kAttnMaxRowElems = 4096;

// part == nullptr: write out. Else part = o [M][D] (unnormalised), then max [M], sum [M];
// a row that saw no key of the item has max -inf and sum 0.
void attend_scalar(const PagedAttnArgs& a, const AttnItem& it, float* part);
void attend_avx2(const PagedAttnArgs& a, const AttnItem& it, float* part);
void attend_avx512(const PagedAttnArgs& a, const AttnItem& it, float* part);

}  // namespace metroline
