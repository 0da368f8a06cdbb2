// AVX-512 (F, BW, VL, DQ) instantiation of attention_kernel.h, compiled for that target by the
// pragma below; attention_ops.cpp calls it only after checking the CPU at run time.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// GCC 12 warns inside its own avx512fintrin.h and about the zmm ABI of file-local helpers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#endif

namespace metroline {
namespace {
#include "vec_avx512.h"
#include "attention_kernel.h"
}  // namespace

void attend_avx512(const PagedAttnArgs& a, const AttnItem& it, float* part) {
  attend_dispatch<VAvx512>(a, it, part);
}

}  // namespace metroline

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (the CPU check says scalar)

namespace metroline {
void attend_avx512(const PagedAttnArgs&, const AttnItem&, float*) {}
}  // namespace metroline

#endif
