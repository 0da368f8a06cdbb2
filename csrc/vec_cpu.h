// Which vector path the attention and fused kernels (attention_*.cpp, fused_*.cpp) may run,
// read from the CPU (cpuid, and xgetbv for the OS's register saving) at run time. Paths are
// numbered as in qmm.h's Isa (-1 auto, 0 scalar, 1 avx2, 2 avx512), so metroline.kernels'
// force_isa value can be passed straight through.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace metroline {

enum VecIsa : int { VEC_AUTO = -1, VEC_SCALAR = 0, VEC_AVX2 = 1, VEC_AVX512 = 2 };

inline int vec_detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return VEC_SCALAR;
  const bool fma = c >> 12 & 1, f16c = c >> 29 & 1, osxsave = c >> 27 & 1, avx = c >> 28 & 1;
  if (!(osxsave && avx)) return VEC_SCALAR;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const bool os_avx = (lo & 0x6) == 0x6, os_avx512 = os_avx && (lo & 0xe0) == 0xe0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return VEC_SCALAR;
  const bool avx2 = b >> 5 & 1, f = b >> 16 & 1, dq = b >> 17 & 1, bw = b >> 30 & 1, vl = b >> 31 & 1;
  if (!(os_avx && avx2 && fma && f16c)) return VEC_SCALAR;
  return os_avx512 && f && dq && bw && vl ? VEC_AVX512 : VEC_AVX2;
#else
  return VEC_SCALAR;
#endif
}

inline int vec_best_isa() {
  static const int best = vec_detect_isa();
  return best;
}

inline const char* vec_isa_name(int isa) {
  return isa == VEC_AVX512 ? "avx512" : isa == VEC_AVX2 ? "avx2" : "scalar";
}

inline int vec_resolve_isa(int64_t isa) {
  if (isa == VEC_AUTO) return vec_best_isa();
  TORCH_CHECK(isa >= VEC_SCALAR && isa <= VEC_AVX512, "metroline: unknown isa ", isa);
  TORCH_CHECK(isa <= vec_best_isa(), "metroline: this CPU cannot run the ", vec_isa_name(int(isa)),
              " kernels (best: ", vec_isa_name(vec_best_isa()), ")");
  return int(isa);
}

}  // namespace metroline
