// AVX2 + FMA + F16C instantiation of attention_kernel.h, compiled for that target by the
// pragma below; attention_ops.cpp calls it only after checking the CPU at run time.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention.h"

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
#include "vec_avx2.h"
#include "attention_kernel.h"
}  // namespace

void attend_avx2(const PagedAttnArgs& a, const AttnItem& it, float* part) {
  attend_dispatch<VAvx2>(a, it, part);
}

}  // namespace metroline

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (the CPU check says scalar)

namespace metroline {
void attend_avx2(const PagedAttnArgs&, const AttnItem&, float*) {}
}  // namespace metroline

#endif
