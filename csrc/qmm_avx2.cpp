// AVX2 + FMA + F16C instantiation of qmm_kernel.h. The whole file is compiled for that
// target (pragma below); ops.cpp only calls it after checking the CPU at run time.
#include <cstdint>
#include <cstring>

#include "qmm.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace metroline {
namespace {

struct Avx2 {
  static constexpr int R = 8, MT_MAX = 4, RV_FULL_UPTO = 2, Q8_OFF = 0;
  static constexpr bool ROLL_CHUNKS = true;
  using I = __m256i;
  using F = __m256;
  static I load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  static I zero_i() { return _mm256_setzero_si256(); }
  static F zero_f() { return _mm256_setzero_ps(); }
  static I lo4(I w) { return _mm256_and_si256(w, _mm256_set1_epi8(15)); }
  static I hi4(I w) { return _mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi8(15)); }
  static I crumb(I w, int l) { return _mm256_and_si256(_mm256_srli_epi16(w, 2 * l), _mm256_set1_epi8(3)); }
  // Nibbles (<= 15) times int8 (|x| <= 127): a pair is <= 3810, so the 8 products of one
  // 32-block (<= 30480) fit int16 lanes; widen once per block.
  static I dot_q4(I acc, I w, I x) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x)); }
  static I fin_q4(I acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
  // maddubs wants unsigned x signed: |w| times x with w's sign; a pair is <= 2*128*127.
  struct W8 {
    I a, s;
  };
  static W8 prep_q8(I w) { return {_mm256_abs_epi8(w), w}; }
  static I dot_q8(I acc, W8 w, I x) {
    const I p = _mm256_maddubs_epi16(w.a, _mm256_sign_epi8(x, w.s));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  static I fin_q8(I acc) { return acc; }
  static F load_h(const uint8_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  }
  static F load_f(const float* p) { return _mm256_loadu_ps(p); }
  static F bcastf(float f) { return _mm256_set1_ps(f); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static I sub_bcast(I v, int32_t s) { return _mm256_sub_epi32(v, _mm256_set1_epi32(s)); }
  static void store(float* p, F v, int n) {
    if (n == R) return _mm256_storeu_ps(p, v);
    alignas(32) float t[R];
    _mm256_store_ps(t, v);
    for (int i = 0; i < n; ++i) p[i] = t[i];
  }
};

#include "qmm_kernel.h"

}  // namespace

void qmm_avx2(const QArgs& a, int64_t g0, int64_t g1) { qmm_any<Avx2>(a, g0, g1); }

void quantize_x_avx2(const float* x, int64_t K, int64_t m0, int64_t m1, QXBuf out) {
  const int64_t nb = K / QK;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = x + m * K + b * QK;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(p + 8 * i);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      __m128 t = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      t = _mm_max_ps(t, _mm_movehl_ps(t, t));
      t = _mm_max_ss(t, _mm_movehdup_ps(t));
      const float amax = _mm_cvtss_f32(t);
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      const __m256 vid = _mm256_set1_ps(id);
      __m256i q[4];
      for (int i = 0; i < 4; ++i)
        q[i] = _mm256_cvtps_epi32(
            _mm256_round_ps(_mm256_mul_ps(v[i], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
      const int32_t sum = _mm_cvtsi128_si32(s4);
      // packs interleave 128-bit lanes; the permute puts the 4-byte groups back in order.
      const __m256i b16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256((__m256i*)(out.q + m * K + b * QK), _mm256_permutevar8x32_epi32(b16, order));
      out.d[m * nb + b] = d;
      out.s[m * nb + b] = sum;
      out.ds[m * nb + b] = d * float(sum);
    }
  }
}

bool built_avx2() { return true; }

}  // namespace metroline

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: no AVX2 code in this build

namespace metroline {
void qmm_avx2(const QArgs&, int64_t, int64_t) {}
void quantize_x_avx2(const float*, int64_t, int64_t, int64_t, QXBuf) {}
bool built_avx2() { return false; }
}  // namespace metroline

#endif
