// Paged decode attention (attention.h), written once over a vector struct V (vec_*.h) and
// instantiated per ISA by attention_{scalar,avx2,avx512}.cpp. Include inside an anonymous
// namespace, after the vec header.
//
// Keys go by chunks of CH = V::W consecutive positions inside one block (contiguous slots),
// online softmax (running max and sum per row) in fp32:
//   scores  s[m][i] = (scale * q[m]) . k[i]: per key, D/W fused multiply-adds per row give W
//           partial sums; hsum_w turns the W keys' partials into one vector of W scores.
//   softmax mask keys past the row's causal limit (and past the chunk) with -inf, then
//           new max, alpha = exp(old max - new max), p = exp(s - new max), sum = sum*alpha + sum(p)
//   values  o[m] = o[m] * alpha + sum_i p[m][i] * v[i]
// Rows are taken V::MT at a time so a tile's accumulators stay in registers; K/V rows are
// converted from fp16 (or int8) in registers, once per tile. With int8 rows (kv_cache.h) the
// chunk's per-key scales are folded in where they factor out: score_i = (q . k_i) * dk_i, and
// the value sum takes p_i * dv_i in place of p_i (the softmax sum l keeps the plain p_i).
#pragma once
// Needs <cmath>, <cstring>, <limits>, included by the .cpp before its target pragma
// (a system header compiled under the pragma would leak ISA-specific inline copies).

// DC: head_dim known at compile time (64, 128), or 0 for any multiple of 16 (then d = D).
template <class V, class KT, int MT, int DC>
static inline void score_tile(const float* qb, int D_, const KT* kp, int64_t kv_tok, int n,
                              typename V::F* s) {
  using F = typename V::F;
  constexpr int W = V::W;
  // Keys taken KU at a time: KU * MT independent accumulator chains hide the FMA latency.
  constexpr int KU = MT <= 2 ? 4 : 2;
  const int D = DC ? DC : D_;
  F tmp[MT][W];
  int i = 0;
  for (; i + KU <= n; i += KU) {
    F acc[KU][MT];
#pragma GCC unroll 8
    for (int u = 0; u < KU; ++u)
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[u][t] = V::zero();
#pragma GCC unroll 16
    for (int d = 0; d < D; d += W) {
      F kv[KU];
#pragma GCC unroll 8
      for (int u = 0; u < KU; ++u) kv[u] = V::load(kp + (i + u) * kv_tok + d);
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) {
        const F qv = V::load(qb + t * D + d);
#pragma GCC unroll 8
        for (int u = 0; u < KU; ++u) acc[u][t] = V::fmadd(qv, kv[u], acc[u][t]);
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < KU; ++u)
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) tmp[t][i + u] = acc[u][t];
  }
  for (; i < n; ++i) {
    F acc[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) acc[t] = V::zero();
#pragma GCC unroll 16
    for (int d = 0; d < D; d += W) {
      const F kv = V::load(kp + i * kv_tok + d);
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[t] = V::fmadd(V::load(qb + t * D + d), kv, acc[t]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) tmp[t][i] = acc[t];
  }
  for (; i < W; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) tmp[t][i] = V::zero();
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) s[t] = V::hsum_w(tmp[t]);
}

template <class V, class KT, int MT, int DC>
static inline void value_tile(float* ob, const float* pb, const float* alpha, int D_, const KT* vp,
                              int64_t kv_tok, int n) {
  using F = typename V::F;
  constexpr int W = V::W;
  // DB vectors of head_dim per pass: MT * DB accumulators stay in registers over the keys.
  constexpr int DB = V::ACC_REGS / MT >= 8 ? 8 : V::ACC_REGS / MT >= 4 ? 4 : V::ACC_REGS / MT >= 2 ? 2 : 1;
  const int D = DC ? DC : D_;
  for (int d0 = 0; d0 < D; d0 += DB * W) {
    F o[MT][DB];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      const F a = V::set1(alpha[t]);
#pragma GCC unroll 8
      for (int e = 0; e < DB; ++e)
        if (d0 + e * W < D) o[t][e] = V::mul(V::load(ob + t * D + d0 + e * W), a);
    }
    for (int i = 0; i < n; ++i) {
      F v[DB];
#pragma GCC unroll 8
      for (int e = 0; e < DB; ++e)
        if (d0 + e * W < D) v[e] = V::load(vp + i * kv_tok + d0 + e * W);
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) {
        const F p = V::set1(pb[t * W + i]);
#pragma GCC unroll 8
        for (int e = 0; e < DB; ++e)
          if (d0 + e * W < D) o[t][e] = V::fmadd(p, v[e], o[t][e]);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t)
#pragma GCC unroll 8
      for (int e = 0; e < DB; ++e)
        if (d0 + e * W < D) V::store(ob + t * D + d0 + e * W, o[t][e]);
  }
}

struct AttnRows {
  float* q;      // [M][D], pre-scaled
  float* o;      // [M][D]
  float* p;      // [M][W]
  float* mx;     // [M] running max
  float* l;      // [M] running sum
  float* alpha;  // [M]
  int64_t* lim;  // [M] last visible position
};

// One chunk of n keys at positions p0.. for rows [m0, m0 + MT).
// ksc / vsc: the chunk's key and value scales, fp16 (W entries, int8 rows only).
template <class V, class KT, int MT, int DC>
static void chunk_tile(const AttnRows& r, int m0, int D, const KT* kp, const KT* vp, int64_t kv_tok,
                       int64_t p0, int n, const uint16_t* ksc, const uint16_t* vsc) {
  using F = typename V::F;
  constexpr int W = V::W;
  constexpr bool scaled = sizeof(KT) == 1;
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  F s[MT];
  score_tile<V, KT, MT, DC>(r.q + m0 * D, D, kp, kv_tok, n, s);
  if constexpr (scaled) {
    const F dk = V::load(ksc);
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) s[t] = V::mul(s[t], dk);
  }
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) {
    const int m = m0 + t;
    const int64_t vis = r.lim[m] - p0 + 1;  // keys of the chunk this row sees
    const F sm = V::keep_first(s[t], vis < n ? int(vis) : n, NEG_INF);
    const float cmax = V::hmax(sm);
    if (cmax == NEG_INF) {  // none (causal limit before the chunk): row unchanged
      r.alpha[m] = 1.f;
      std::memset(r.p + m * W, 0, W * sizeof(float));
      continue;
    }
    const float mnew = r.mx[m] > cmax ? r.mx[m] : cmax;
    r.alpha[m] = mnew == r.mx[m] ? 1.f : std::exp(r.mx[m] - mnew);  // 0 on a row's first chunk
    const F p = V::exp(V::sub(sm, V::set1(mnew)));
    r.l[m] = r.l[m] * r.alpha[m] + V::hsum(p);
    if constexpr (scaled)
      V::store(r.p + m * W, V::mul(p, V::load(vsc)));
    else
      V::store(r.p + m * W, p);
    r.mx[m] = mnew;
  }
  value_tile<V, KT, MT, DC>(r.o + m0 * D, r.p + m0 * W, r.alpha + m0, D, vp, kv_tok, n);
}

template <class V, class KT, int DC, int MT>
static inline void chunk_tail(const AttnRows& r, int m, int rem, int D, const KT* kp, const KT* vp,
                              int64_t kv_tok, int64_t p0, int n, const uint16_t* ksc, const uint16_t* vsc) {
  if constexpr (MT >= 1) {
    if (rem == MT) return chunk_tile<V, KT, MT, DC>(r, m, D, kp, vp, kv_tok, p0, n, ksc, vsc);
    chunk_tail<V, KT, DC, MT - 1>(r, m, rem, D, kp, vp, kv_tok, p0, n, ksc, vsc);
  }
}

template <class V, class KT, int DC>
static void chunk_rows(const AttnRows& r, int M, int D, const KT* kp, const KT* vp, int64_t kv_tok,
                       int64_t p0, int n, const uint16_t* ksc, const uint16_t* vsc) {
  int m = 0;
  for (; M - m >= V::MT; m += V::MT) chunk_tile<V, KT, V::MT, DC>(r, m, D, kp, vp, kv_tok, p0, n, ksc, vsc);
  if (m < M) chunk_tail<V, KT, DC, V::MT - 1>(r, m, M - m, D, kp, vp, kv_tok, p0, n, ksc, vsc);
}

template <class V, class KT, int DC>
static void attend_any(const metroline::PagedAttnArgs& a, const metroline::AttnItem& it, float* part) {
  using metroline::kAttnMaxRowElems;
  using metroline::kAttnMaxRows;
  constexpr int W = V::W;
  const int G = int(a.Hq / a.Hkv), D = int(a.D), M = it.nj * G;
  alignas(64) float qb[kAttnMaxRowElems], ob[kAttnMaxRowElems], pb[kAttnMaxRows * W];
  float mx[kAttnMaxRows], l[kAttnMaxRows], alpha[kAttnMaxRows];
  int64_t lim[kAttnMaxRows];
  const AttnRows r{qb, ob, pb, mx, l, alpha, lim};

  const int64_t qs = a.query_start_loc[it.b], q_len = a.query_start_loc[it.b + 1] - qs;
  const int64_t base = a.context_lens[it.b] - q_len;  // position of query 0
  for (int j = 0; j < it.nj; ++j)
    for (int g = 0; g < G; ++g) {
      const int m = j * G + g;
      const float* src = a.q + (qs + it.j0 + j) * a.q_tok + (int64_t(it.h) * G + g) * a.q_head;
      for (int d = 0; d < D; ++d) qb[m * D + d] = src[d] * a.scale;
      lim[m] = base + it.j0 + j;
      mx[m] = -std::numeric_limits<float>::infinity();
      l[m] = 0.f;
    }
  std::memset(ob, 0, sizeof(float) * M * D);

  constexpr bool scaled = sizeof(KT) == 1;
  const int64_t row = scaled ? D + 2 : D;  // a head's row (kv_cache.h)
  const int64_t bs = a.block_size, kv_tok = a.Hkv * row;
  const int64_t k_end = it.k1 < base + it.j0 + it.nj ? it.k1 : base + it.j0 + it.nj;
  const KT* kc = static_cast<const KT*>(a.k_cache) + int64_t(it.h) * row;
  const KT* vc = static_cast<const KT*>(a.v_cache) + int64_t(it.h) * row;
  const int32_t* bt = a.block_tables + it.b * a.bt_stride;
  alignas(64) uint16_t ksc[W < 8 ? 8 : W] = {}, vsc[W < 8 ? 8 : W] = {};
  for (int64_t p0 = it.k0; p0 < k_end;) {
    const int64_t off = p0 % bs;
    int64_t n = bs - off < W ? bs - off : W;
    if (k_end - p0 < n) n = k_end - p0;
    const int64_t slot = int64_t(bt[p0 / bs]) * bs + off;
    const KT *kp = kc + slot * kv_tok, *vp = vc + slot * kv_tok;
    if constexpr (scaled) {  // the chunk's fp16 scales side by side, widened by one vector load
      for (int i = 0; i < n; ++i) {
        std::memcpy(ksc + i, kp + i * kv_tok + D, 2);
        std::memcpy(vsc + i, vp + i * kv_tok + D, 2);
      }
      for (int i = int(n); i < W; ++i) ksc[i] = vsc[i] = 0;
    }
    chunk_rows<V, KT, DC>(r, M, D, kp, vp, kv_tok, p0, int(n), ksc, vsc);
    p0 += n;
  }

  if (part == nullptr) {
    for (int m = 0; m < M; ++m) {
      const int j = m / G, g = m % G;
      float* dst = a.out + ((qs + it.j0 + j) * a.Hq + int64_t(it.h) * G + g) * D;
      const float inv = 1.f / l[m];
      for (int d = 0; d < D; ++d) dst[d] = ob[m * D + d] * inv;
    }
  } else {
    std::memcpy(part, ob, sizeof(float) * M * D);
    std::memcpy(part + M * D, mx, sizeof(float) * M);
    std::memcpy(part + M * D + M, l, sizeof(float) * M);
  }
}

template <class V, class KT>
static void attend_dims(const metroline::PagedAttnArgs& a, const metroline::AttnItem& it, float* part) {
  if (a.D == 64) return attend_any<V, KT, 64>(a, it, part);
  if (a.D == 128) return attend_any<V, KT, 128>(a, it, part);
  attend_any<V, KT, 0>(a, it, part);
}

template <class V>
static void attend_dispatch(const metroline::PagedAttnArgs& a, const metroline::AttnItem& it, float* part) {
  if (a.kv == metroline::KV_F16) return attend_dims<V, uint16_t>(a, it, part);
  if (a.kv == metroline::KV_I8) return attend_dims<V, int8_t>(a, it, part);
  attend_dims<V, float>(a, it, part);
}
