// Scalar "vector" of one float: the slow twin every SIMD path is tested against. Same
// operations as vec_avx2.h / vec_avx512.h (see there), so attention_kernel.h and
// fused_kernel.h instantiate over it unchanged. Include inside an anonymous namespace.
#pragma once
// Needs <cmath>, <cstdint>, <cstring>, included by the .cpp before its target pragma
// (a system header compiled under the pragma would leak ISA-specific inline copies).

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE fp16 <-> fp32 without F16C, bit-identical to c10::Half (both from the FP16 library):
// round to nearest even, subnormals, inf and nan kept.
inline float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return f32_from_bits(sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized)));
}
inline uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

struct VScalar {
  static constexpr int W = 1;
  static constexpr int MT = 4, ACC_REGS = 8;  // attention rows per tile, accumulators
  using F = float;
  static F zero() { return 0.f; }
  static F set1(float x) { return x; }
  static F load(const float* p) { return *p; }
  static F load(const uint16_t* p) { return half_to_float(*p); }
  static F load(const int8_t* p) { return float(*p); }
  static void store(float* p, F v) { *p = v; }
  static void store(uint16_t* p, F v) { *p = float_to_half(v); }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F max(F a, F b) { return a > b ? a : b; }
  static F fmadd(F a, F b, F c) { return a * b + c; }  // not fused: -ffp-contract=off
  static F exp(F x) { return std::exp(x); }
  static float hsum(F v) { return v; }
  static float hmax(F v) { return v; }
  static F hsum_w(const F* v) { return v[0]; }
  static F keep_first(F v, int n, float fill) { return n > 0 ? v : fill; }
};
