// The torch-facing pieces of paged decode attention that more than one op needs: the checks
// of a step's layout (positions, slots, caches, block tables, context lengths, query starts),
// the work plan and the merge of split items. attention_ops.cpp (one attention call) and layers_ops.cpp (every
// layer of a decode step in one call) both use them, so a layer attends exactly as the
// standalone op does.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "attention.h"

namespace metroline {

using AttendFn = void (*)(const PagedAttnArgs&, const AttnItem&, float*);
AttendFn attend_fn(int vec_isa);

// Checks positions [T] int64 (each a row of the P-row cos/sin tables); returns its data.
const int64_t* check_positions(const char* op, const at::Tensor& positions, int64_t T, int64_t P);
// Checks slot_mapping [T] int64 (each a slot of an S-slot cache, or -1); returns its data.
const int64_t* check_slots(const char* op, const at::Tensor& slot_mapping, int64_t T, int64_t S);

// Checks k_cache / v_cache (one shape [S, Hkv, R] and dtype, contiguous: fp32 or fp16 with
// R = D, int8 with R = D + 2, kv_cache.h) and returns their KvType. D < 0: any R (not checked).
int check_kv_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t Hkv, int64_t D);
// The head_dim D of a cache of type kv whose rows hold R elements.
inline int64_t kv_head_dim(int kv, int64_t R) { return kv == KV_I8 ? R - 2 : R; }

// Checks block_tables [B, max_blocks] int32, context_lens [B] int32 and query_start_loc [B+1]
// int32 against T query rows and a cache of S rows, and fills a's layout fields
// (block_tables, bt_stride, context_lens, query_start_loc, block_size).
void check_paged_layout(const char* op, const at::Tensor& block_tables, const at::Tensor& context_lens,
                        const at::Tensor& query_start_loc, int64_t T, int64_t S, int64_t block_size,
                        PagedAttnArgs& a);

// The step's work: items in the order threads should take them (longest first), each item's
// offset in the partials buffer (-1: it writes out itself), and the merges of split items.
struct AttnPlan {
  std::vector<AttnItem> items;
  std::vector<int64_t> part_off;
  struct Merge {
    int32_t b, h, j0, nj;
    int64_t first, count;  // items[first, first + count) are its splits (before reordering)
  };
  std::vector<Merge> merges;
  std::vector<int64_t> order;  // longest item first
  int64_t part_floats = 0, work = 0;
};
AttnPlan attention_plan(const PagedAttnArgs& a);

// out rows of one split item group from its partials.
void attention_merge(const PagedAttnArgs& a, const AttnPlan& p, const AttnPlan::Merge& mg, const float* parts);

}  // namespace metroline
