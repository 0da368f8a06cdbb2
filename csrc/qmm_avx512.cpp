// AVX-512 (F, BW, VL, VNNI) instantiation of qmm_kernel.h: 16 output rows per zmm, byte dot
// products with vpdpbusd. Compiled for that target; ops.cpp checks the CPU first.
#include <cstdint>
#include <cstring>

#include "qmm.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// GCC 12 warns inside its own avx512fintrin.h (_mm_undefined_si128) and about the zmm ABI of
// these file-local helpers; neither concerns this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#endif

namespace metroline {
namespace {

struct Avx512 {
  static constexpr int R = 16, MT_MAX = 8, RV_FULL_UPTO = 8, Q8_OFF = 128;
  static constexpr bool ROLL_CHUNKS = false;
  using I = __m512i;
  using F = __m512;
  static I load(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
  static I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static I zero_i() { return _mm512_setzero_si512(); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static I lo4(I w) { return _mm512_and_si512(w, _mm512_set1_epi8(15)); }
  static I hi4(I w) { return _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(15)); }
  static I crumb(I w, int l) { return _mm512_and_si512(_mm512_srli_epi16(w, 2 * l), _mm512_set1_epi8(3)); }
  static I dot_q4(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static I fin_q4(I acc) { return acc; }
  // vpdpbusd multiplies unsigned by signed bytes: feed w + 128 and subtract 128 * sum(x).
  using W8 = I;
  static W8 prep_q8(I w) { return _mm512_xor_si512(w, _mm512_set1_epi8(char(0x80))); }
  static I dot_q8(I acc, W8 w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static I fin_q8(I acc) { return acc; }
  static F load_h(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
  }
  static F load_f(const float* p) { return _mm512_loadu_ps(p); }
  static F bcastf(float f) { return _mm512_set1_ps(f); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static I sub_bcast(I v, int32_t s) { return _mm512_sub_epi32(v, _mm512_set1_epi32(s)); }
  static void store(float* p, F v, int n) {
    if (n == R) return _mm512_storeu_ps(p, v);
    _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v);
  }
};

#include "qmm_kernel.h"

}  // namespace

void qmm_avx512(const QArgs& a, int64_t g0, int64_t g1) { qmm_any<Avx512>(a, g0, g1); }

void quantize_x_avx512(const float* x, int64_t K, int64_t m0, int64_t m1, QXBuf out) {
  const int64_t nb = K / QK;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = x + m * K + b * QK;
      const __m512 v0 = _mm512_loadu_ps(p), v1 = _mm512_loadu_ps(p + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      const __m512 vid = _mm512_set1_ps(id);
      const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      int8_t* q = out.q + m * K + b * QK;
      _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(q1));
      out.d[m * nb + b] = d;
      out.s[m * nb + b] = sum;
      out.ds[m * nb + b] = d * float(sum);
    }
  }
}

bool built_avx512() { return true; }

}  // namespace metroline

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64

namespace metroline {
void qmm_avx512(const QArgs&, int64_t, int64_t) {}
void quantize_x_avx512(const float*, int64_t, int64_t, int64_t, QXBuf) {}
bool built_avx512() { return false; }
}  // namespace metroline

#endif
