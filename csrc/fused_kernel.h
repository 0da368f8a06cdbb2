// The fused ops of fused.h, written once over a vector struct V (vec_*.h) and instantiated
// per ISA by fused_{scalar,avx2,avx512}.cpp. Include inside an anonymous namespace, after the
// vec headers (vec_scalar.h too: tails use its fp16 conversion). Each loop runs W lanes at a
// time, then a scalar tail for the last H % W elements.
#pragma once
// Needs <cmath>, <cstdint>, <cstring>, included by the .cpp before its target pragma.

template <class V>
static void rms_norm_rows(const metroline::NormArgs& a, int64_t t0, int64_t t1) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t H = a.H;
  for (int64_t t = t0; t < t1; ++t) {
    const float* x = a.x + t * a.x_tok;
    const float* src = x;
    // Four accumulators: independent FMA chains, and a shorter summation tree.
    F acc[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    float tail = 0.f;
    int64_t i = 0;
    if (a.res != nullptr) {
      float* r = a.res + t * a.res_tok;
      for (; i + W <= H; i += W) {
        const F s = V::add(V::load(x + i), V::load(r + i));
        V::store(r + i, s);
        acc[(i / W) & 3] = V::fmadd(s, s, acc[(i / W) & 3]);
      }
      for (; i < H; ++i) {
        r[i] += x[i];
        tail += r[i] * r[i];
      }
      src = r;
    } else {
      for (; i + 4 * W <= H; i += 4 * W)
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const F s = V::load(x + i + u * W);
          acc[u] = V::fmadd(s, s, acc[u]);
        }
      for (; i + W <= H; i += W) {
        const F s = V::load(x + i);
        acc[0] = V::fmadd(s, s, acc[0]);
      }
      for (; i < H; ++i) tail += x[i] * x[i];
    }
    const float ss = V::hsum(V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3]))) + tail;
    const float inv = 1.f / std::sqrt(ss / float(H) + a.eps);
    // (x * inv) * w, rounded in that order as torch does.
    const F vinv = V::set1(inv);
    float* y = a.y + t * a.y_tok;
    for (i = 0; i + W <= H; i += W) V::store(y + i, V::mul(V::mul(V::load(src + i), vinv), V::load(a.w + i)));
    for (; i < H; ++i) y[i] = src[i] * inv * a.w[i];
  }
}

template <class V>
static void silu_mul_rows(const metroline::SiluArgs& a, int64_t t0, int64_t t1) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t I = a.I;
  const F one = V::set1(1.f);
  for (int64_t t = t0; t < t1; ++t) {
    const float* g = a.x + t * a.x_tok;
    const float* u = g + I;
    float* y = a.y + t * a.y_tok;
    int64_t i = 0;
    // silu(x) = x / (1 + exp(-x)), as torch computes it; then times up.
    for (; i + W <= I; i += W) {
      const F x = V::load(g + i);
      V::store(y + i, V::mul(V::div(x, V::add(one, V::exp(V::sub(V::zero(), x)))), V::load(u + i)));
    }
    for (; i < I; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
}

template <class V>
static inline void rope_row(float* x, const float* c, const float* s, int64_t D) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t h = D / 2;
  int64_t i = 0;
  for (; i + W <= h; i += W) {
    const F x1 = V::load(x + i), x2 = V::load(x + h + i);
    V::store(x + i, V::sub(V::mul(x1, V::load(c + i)), V::mul(x2, V::load(s + i))));
    V::store(x + h + i, V::add(V::mul(x2, V::load(c + h + i)), V::mul(x1, V::load(s + h + i))));
  }
  for (; i < h; ++i) {
    const float x1 = x[i], x2 = x[h + i];
    x[i] = x1 * c[i] - x2 * s[i];
    x[h + i] = x2 * c[h + i] + x1 * s[h + i];
  }
}

template <class V, class CT>
static inline void cache_row(CT* dst, const float* src, int64_t D) {
  constexpr int W = V::W;
  int64_t i = 0;
  for (; i + W <= D; i += W) V::store(dst + i, V::load(src + i));
  for (; i < D; ++i) {
    if constexpr (sizeof(CT) == 2)
      dst[i] = float_to_half(src[i]);
    else
      dst[i] = src[i];
  }
}

// An int8 row (kv_cache.h): D values, then the fp16 scale. Scalar: exact, and ~D ns per row.
static inline void cache_row_i8(int8_t* dst, const float* src, int64_t D) {
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::fabs(src[i]) > amax ? std::fabs(src[i]) : amax;
  const uint16_t dh = float_to_half(amax / 127.f);
  const float d = half_to_float(dh), inv = d > 0.f ? 1.f / d : 0.f;
  for (int64_t i = 0; i < D; ++i) {
    // Round half to even by the 1.5 * 2^23 trick (|x * inv| <= 128 here), as torch.round.
    float v = (src[i] * inv + 12582912.f) - 12582912.f;
    v = v > 127.f ? 127.f : v >= -127.f ? v : -127.f;  // (a NaN lands on -127)
    dst[i] = int8_t(v);
  }
  std::memcpy(dst + D, &dh, 2);
}

template <class V, class CT>
static void rope_kv_rows(const metroline::RopeArgs& a, int64_t t0, int64_t t1) {
  constexpr bool i8 = sizeof(CT) == 1;
  const int64_t D = a.D, row = i8 ? D + 2 : D, cache_tok = a.Hkv * row;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t p = a.pos != nullptr ? a.pos[t] : t;
    const float *c = a.cos + p * a.cos_tok, *s = a.sin + p * a.sin_tok;
    for (int64_t h = 0; h < a.Hq; ++h) rope_row<V>(a.q + t * a.q_tok + h * a.q_head, c, s, D);
    const int64_t slot = a.slots[t];
    for (int64_t h = 0; h < a.Hkv; ++h) {
      float* k = a.k + t * a.k_tok + h * a.k_head;
      rope_row<V>(k, c, s, D);
      if (slot < 0) continue;
      CT* kd = static_cast<CT*>(a.k_cache) + slot * cache_tok + h * row;
      CT* vd = static_cast<CT*>(a.v_cache) + slot * cache_tok + h * row;
      const float* v = a.v + t * a.v_tok + h * a.v_head;
      if constexpr (i8) {
        cache_row_i8(kd, k, D);
        cache_row_i8(vd, v, D);
      } else {
        cache_row<V>(kd, k, D);
        cache_row<V>(vd, v, D);
      }
    }
  }
}

template <class V>
static void rope_kv_any(const metroline::RopeArgs& a, int64_t t0, int64_t t1) {
  if (a.kv == metroline::KV_F16)
    rope_kv_rows<V, uint16_t>(a, t0, t1);
  else if (a.kv == metroline::KV_I8)
    rope_kv_rows<V, int8_t>(a, t0, t1);
  else
    rope_kv_rows<V, float>(a, t0, t1);
}
