// 8 floats in a ymm (AVX2 + FMA + F16C). Include inside an anonymous namespace, after the
// translation unit's target pragma, so every helper stays local to that ISA's file.
//
// The operations the kernels use (W lanes of fp32; vec_avx512.h has the same, W = 16):
//   MT, ACC_REGS: register budget of the attention tiles (rows per tile, live accumulators)
//   load(float* | uint16_t* fp16 | int8_t*), store(float* | uint16_t* fp16, round to nearest even)
//   add sub mul div max, fmadd(a, b, c) = a*b + c (fused), set1, zero
//   exp: Cephes expf (Cody-Waite reduction, degree-5 polynomial), ~2 ulp; results below
//        fp32's normal range flush to 0 (so exp(-inf) == 0 exactly), x > 88 gives exp(88)
//   hsum, hmax: horizontal sum / max to a float
//   hsum_w(v[W]): W vectors -> one vector whose lane i is the sum of v[i]'s lanes
//   keep_first(v, n, fill): lanes >= n replaced by fill
#pragma once
// Needs <immintrin.h>, <cstdint>, included by the .cpp before its target pragma
// (a system header compiled under the pragma would leak ISA-specific inline copies).

struct VAvx2 {
  static constexpr int W = 8;
  static constexpr int MT = 4, ACC_REGS = 12;  // attention rows per tile, accumulators
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static F load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(uint16_t* p, F v) {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F exp(F x) {
    x = _mm256_min_ps(_mm256_max_ps(x, set1(-88.3762626647949f)), set1(88.f));
    const F n = max(_mm256_floor_ps(fmadd(x, set1(1.44269504088896341f), set1(0.5f))), set1(-127.f));
    F r = _mm256_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    F p = set1(1.9875691500e-4f);
    p = fmadd(p, r, set1(1.3981999507e-3f));
    p = fmadd(p, r, set1(8.3334519073e-3f));
    p = fmadd(p, r, set1(4.1665795894e-2f));
    p = fmadd(p, r, set1(1.6666665459e-1f));
    p = fmadd(p, r, set1(5.0000001201e-1f));
    p = fmadd(p, mul(r, r), add(r, set1(1.f)));
    // 2^n built in the exponent field; n = -127 gives +0.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return mul(p, _mm256_castsi256_ps(e));
  }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float hmax(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static F hsum_w(const F* v) {
    const F t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const F t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    // u0 = [s0 s1 s2 s3 | s0' s1' s2' s3'] (halves of each sum in the two 128-bit lanes)
    const F u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return add(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
  static F keep_first(F v, int n, float fill) {
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(set1(fill), v, _mm256_castsi256_ps(keep));
  }
};
