// The torch-facing side of paged decode attention (attention.h): schema, argument checks,
// cutting the work into items, threads, and merging split items. Registered as a fragment
// of the metroline library, so ops.cpp's TORCH_LIBRARY stays untouched.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "attention_ops.h"
#include "vec_cpu.h"

namespace metroline {

// Below this much work (keys x query rows, ~2 ns each) one thread does it all: waking the
// pool costs a few us.
constexpr int64_t kParallelMinWork = 1 << 13;
// Long contexts are split (flash-decoding) at fixed key positions, multiples of this: where a
// row's keys are cut depends on nothing but its own context, never on the batch or the
// threads, so a query's result is bit-identical whatever else is in the step (batched ==
// alone, chunked prefill == whole prefill, speculative q_len k+1 == k+1 decodes).
constexpr int64_t kSplitKeys = 512;

AttendFn attend_fn(int isa) {
  return isa == VEC_AVX512 ? attend_avx512 : isa == VEC_AVX2 ? attend_avx2 : attend_scalar;
}

// The data of a contiguous int64 CPU vector of T entries named `name`.
static const int64_t* int64_vector(const char* op, const at::Tensor& t, const char* name, int64_t T) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == T &&
                  t.is_contiguous(),
              op, name, " must be a contiguous int64 CPU vector of T = ", T, " entries");
  return t.data_ptr<int64_t>();
}

const int64_t* check_positions(const char* op, const at::Tensor& positions, int64_t T, int64_t P) {
  const int64_t* pos = int64_vector(op, positions, "positions", T);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, op, "position ", pos[t], " of token ", t, " is outside the ", P,
                " rows of cos/sin");
  return pos;
}

const int64_t* check_slots(const char* op, const at::Tensor& slot_mapping, int64_t T, int64_t S) {
  const int64_t* slots = int64_vector(op, slot_mapping, "slot_mapping", T);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] >= -1 && slots[t] < S, op, "slot ", slots[t], " of token ", t, " is outside the cache's ",
                S, " slots (-1 skips)");
  return slots;
}

int check_kv_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t Hkv,
                    int64_t D) {
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              op, "k_cache and v_cache must be contiguous CPU tensors of one shape [S, Hkv, D] and dtype");
  const auto t = k_cache.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kFloat || t == at::kChar, op,
              "the cache must be float16, float32 or int8 rows, got ", t);
  const int kv = t == at::kHalf ? KV_F16 : t == at::kChar ? KV_I8 : KV_F32;
  TORCH_CHECK(kv != KV_I8 || k_cache.size(2) > 2, op, "an int8 cache's rows are head_dim + 2 bytes, got ",
              k_cache.sizes());
  TORCH_CHECK(Hkv < 0 || (k_cache.size(1) == Hkv && k_cache.size(2) == kv_row_elems(kv, D)), op, "the cache is ",
              k_cache.sizes(), ", expected [S, ", Hkv, ", ", kv_row_elems(kv, D), "]");
  return kv;
}

void check_paged_layout(const char* op, const at::Tensor& block_tables, const at::Tensor& context_lens,
                        const at::Tensor& query_start_loc, int64_t T, int64_t S, int64_t block_size,
                        PagedAttnArgs& a) {
  TORCH_CHECK(block_size > 0 && S % block_size == 0, op, "cache rows ", S, " are not a multiple of block_size ",
              block_size);
  auto int32_vec = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous(), op,
                name, " must be a contiguous int32 CPU vector");
  };
  int32_vec(context_lens, "context_lens");
  int32_vec(query_start_loc, "query_start_loc");
  const int64_t B = context_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == B + 1, op, "query_start_loc needs B + 1 = ", B + 1, " entries");
  TORCH_CHECK(block_tables.device().is_cpu() && block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.size(0) == B && (block_tables.stride(1) == 1 || block_tables.size(1) <= 1),
              op, "block_tables must be an int32 CPU tensor [B, max_blocks] with contiguous rows");
  const int32_t *ctx = context_lens.data_ptr<int32_t>(), *qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1), bt_stride = block_tables.stride(0), num_blocks = S / block_size;
  TORCH_CHECK(qsl[0] >= 0 && qsl[B] <= T, op, "query_start_loc runs outside q's ", T, " rows");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t q_len = qsl[b + 1] - qsl[b];
    TORCH_CHECK(q_len >= 0 && ctx[b] >= q_len && ctx[b] <= max_blocks * block_size, op, "sequence ", b,
                ": q_len ", q_len, ", context_len ", ctx[b], " (need 0 <= q_len <= context_len <= ",
                max_blocks * block_size, ")");
    if (q_len == 0) continue;
    for (int64_t i = 0; i < (ctx[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(bt[b * bt_stride + i] >= 0 && bt[b * bt_stride + i] < num_blocks, op, "sequence ", b,
                  " block ", i, " is ", bt[b * bt_stride + i], ", outside the cache's ", num_blocks, " blocks");
  }
  a.block_tables = bt;
  a.bt_stride = bt_stride;
  a.context_lens = ctx;
  a.query_start_loc = qsl;
  a.B = B;
  a.block_size = block_size;
}

AttnPlan attention_plan(const PagedAttnArgs& a) {
  const int64_t G = a.Hq / a.Hkv, D = a.D, Hkv = a.Hkv;
  const int64_t nj_max = std::max<int64_t>(1, std::min(kAttnMaxRows / G, kAttnMaxRowElems / (G * D)));
  const int32_t *ctx = a.context_lens, *qsl = a.query_start_loc;
  AttnPlan p;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t q_len = qsl[b + 1] - qsl[b];
    for (int64_t j0 = 0; j0 < q_len; j0 += nj_max) {
      const int64_t nj = std::min(nj_max, q_len - j0), keys = ctx[b] - q_len + j0 + nj;
      for (int64_t h = 0; h < Hkv; ++h) {
        const AttnItem it{int32_t(b), int32_t(h), int32_t(j0), int32_t(nj), 0, int32_t(keys)};
        p.work += keys * nj * G;
        if (keys <= kSplitKeys) {
          p.items.push_back(it);
          p.part_off.push_back(-1);
          continue;
        }
        const int64_t M = nj * G;
        AttnPlan::Merge mg{it.b, it.h, it.j0, it.nj, int64_t(p.items.size()), 0};
        for (int64_t k0 = 0; k0 < keys; k0 += kSplitKeys, ++mg.count) {
          AttnItem s = it;
          s.k0 = int32_t(k0);
          s.k1 = int32_t(std::min(keys, k0 + kSplitKeys));
          p.items.push_back(s);
          p.part_off.push_back(p.part_floats);
          p.part_floats += M * (D + 2);
        }
        p.merges.push_back(mg);
      }
    }
  }
  // Longest first, handed out one at a time: contexts of a batch differ a lot.
  const int64_t n = int64_t(p.items.size());
  p.order.resize(n);
  for (int64_t i = 0; i < n; ++i) p.order[i] = i;
  std::stable_sort(p.order.begin(), p.order.end(), [&](int64_t x, int64_t y) {
    const AttnItem &u = p.items[x], &v = p.items[y];
    return int64_t(u.k1 - u.k0) * u.nj > int64_t(v.k1 - v.k0) * v.nj;
  });
  return p;
}

// o = sum_s e^(m_s - m) o_s / sum_s e^(m_s - m) l_s.
void attention_merge(const PagedAttnArgs& a, const AttnPlan& p, const AttnPlan::Merge& mg, const float* parts) {
  const int64_t G = a.Hq / a.Hkv, D = a.D, M = mg.nj * G, qs = a.query_start_loc[mg.b];
  for (int64_t m = 0; m < M; ++m) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < mg.count; ++s) mx = std::max(mx, parts[p.part_off[mg.first + s] + M * D + m]);
    float* dst = a.out + ((qs + mg.j0 + m / G) * a.Hq + mg.h * G + m % G) * D;
    std::fill(dst, dst + D, 0.f);
    float l = 0.f;
    for (int64_t s = 0; s < mg.count; ++s) {
      const float* part = parts + p.part_off[mg.first + s];
      const float ms = part[M * D + m];
      if (ms == -std::numeric_limits<float>::infinity()) continue;
      const float w = std::exp(ms - mx);
      l += w * part[M * D + M + m];
      for (int64_t d = 0; d < D; ++d) dst[d] += w * part[m * D + d];
    }
    const float inv = 1.f / l;
    for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
  }
}

namespace {

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  const at::Tensor& query_start_loc, double scale, int64_t block_size,
                                  int64_t isa) {
  const char* op = "metroline.paged_attention_decode: ";
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 && q.stride(2) == 1, op,
              "q must be a float32 CPU tensor [T, Hq, D] with a contiguous last dim");
  const int kv = check_kv_caches(op, k_cache, v_cache, -1, 0);
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), S = k_cache.size(0), Hkv = k_cache.size(1);
  TORCH_CHECK(kv_head_dim(kv, k_cache.size(2)) == D, op, "q has head_dim ", D, ", the cache ",
              kv_head_dim(kv, k_cache.size(2)));
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, "Hq = ", Hq, " is not a multiple of Hkv = ", Hkv);
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(D > 0 && D % 16 == 0 && G <= kAttnMaxRows && G * D <= kAttnMaxRowElems, op,
              "need head_dim a multiple of 16, Hq/Hkv <= 64 and Hq/Hkv * head_dim <= 4096, got D=", D,
              " Hq/Hkv=", G);
  PagedAttnArgs a;
  check_paged_layout(op, block_tables, context_lens, query_start_loc, T, S, block_size, a);
  const AttendFn fn = attend_fn(vec_resolve_isa(isa));

  at::Tensor out = at::empty({T, Hq, D}, q.options());
  float* o = out.data_ptr<float>();
  const int32_t* qsl = a.query_start_loc;
  if (qsl[0] > 0) std::fill(o, o + qsl[0] * Hq * D, 0.f);
  if (qsl[a.B] < T) std::fill(o + qsl[a.B] * Hq * D, o + T * Hq * D, 0.f);

  a.q = q.data_ptr<float>();
  a.q_tok = q.stride(0);
  a.q_head = q.stride(1);
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.kv = kv;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.D = D;
  a.scale = float(scale);
  a.out = o;

  const int64_t threads = at::get_num_threads();
  const AttnPlan p = attention_plan(a);
  const int64_t n = int64_t(p.items.size());
  at::Tensor parts_t;
  float* parts = nullptr;
  if (p.part_floats > 0) {
    parts_t = at::empty({p.part_floats}, q.options());
    parts = parts_t.data_ptr<float>();
  }
  auto run = [&](int64_t i) { fn(a, p.items[i], p.part_off[i] < 0 ? nullptr : parts + p.part_off[i]); };
  if (threads <= 1 || p.work < kParallelMinWork || n <= 1) {
    for (int64_t i = 0; i < n; ++i) run(i);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, n), 1, [&](int64_t, int64_t) {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) run(p.order[i]);
    });
  }
  for (const AttnPlan::Merge& mg : p.merges) attention_merge(a, p, mg, parts);
  return out;
}

std::string simd_isa() { return vec_isa_name(vec_best_isa()); }

}  // namespace
}  // namespace metroline

TORCH_LIBRARY_FRAGMENT(metroline, m) {
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, Tensor query_start_loc, float scale, int block_size, int isa=-1) -> Tensor");
  m.def("simd_isa() -> str", &metroline::simd_isa);
}

TORCH_LIBRARY_IMPL(metroline, CPU, m) { m.impl("paged_attention_decode", &metroline::paged_attention_decode); }
