// 16 floats in a zmm (AVX-512 F, BW, VL, DQ). Same operations as vec_avx2.h (documented
// there). Include inside an anonymous namespace, after the file's target pragma.
#pragma once
// Needs <immintrin.h>, <cstdint>, included by the .cpp before its target pragma
// (a system header compiled under the pragma would leak ISA-specific inline copies).

struct VAvx512 {
  static constexpr int W = 16;
  static constexpr int MT = 8, ACC_REGS = 24;  // attention rows per tile, accumulators
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static F load(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(uint16_t* p, F v) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F exp(F x) {
    x = _mm512_min_ps(_mm512_max_ps(x, set1(-88.3762626647949f)), set1(88.f));
    const F n = max(_mm512_roundscale_ps(fmadd(x, set1(1.44269504088896341f), set1(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                    set1(-127.f));
    F r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    F p = set1(1.9875691500e-4f);
    p = fmadd(p, r, set1(1.3981999507e-3f));
    p = fmadd(p, r, set1(8.3334519073e-3f));
    p = fmadd(p, r, set1(4.1665795894e-2f));
    p = fmadd(p, r, set1(1.6666665459e-1f));
    p = fmadd(p, r, set1(5.0000001201e-1f));
    p = fmadd(p, mul(r, r), add(r, set1(1.f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return mul(p, _mm512_castsi512_ps(e));  // n = -127 gives +0, as in vec_avx2.h
  }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  static F hsum_w(const F* v) {
    // 16 -> 8: x[i] lanes 0-7 hold halves of v[2i]'s sum, lanes 8-15 of v[2i+1]'s.
    F x[8];
    for (int i = 0; i < 8; ++i)
      x[i] = add(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    // 8 -> 4: z[i]'s 128-bit lane j holds a quarter-sum of v[4i + j].
    F z[4];
    for (int i = 0; i < 4; ++i)
      z[i] = add(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88), _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
    // 4 -> 2 -> 1 inside 128-bit lanes: lane j ends as [v[j], v[4+j], v[8+j], v[12+j]].
    const F r0 = add(_mm512_shuffle_ps(z[0], z[1], 0x44), _mm512_shuffle_ps(z[0], z[1], 0xEE));
    const F r1 = add(_mm512_shuffle_ps(z[2], z[3], 0x44), _mm512_shuffle_ps(z[2], z[3], 0xEE));
    const F s = add(_mm512_shuffle_ps(r0, r1, 0x88), _mm512_shuffle_ps(r0, r1, 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, s);
  }
  static F keep_first(F v, int n, float fill) {
    const __mmask16 keep = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
    return _mm512_mask_blend_ps(keep, set1(fill), v);
  }
};
