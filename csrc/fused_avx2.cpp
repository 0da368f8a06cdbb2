// AVX2 + FMA + F16C instantiation of fused_kernel.h, compiled for that target by the pragma
// below; fused_ops.cpp calls it only after checking the CPU at run time.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fused.h"

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
#include "vec_scalar.h"
#include "vec_avx2.h"
#include "fused_kernel.h"
}  // namespace

void rms_norm_avx2(const NormArgs& a, int64_t t0, int64_t t1) { rms_norm_rows<VAvx2>(a, t0, t1); }
void silu_mul_avx2(const SiluArgs& a, int64_t t0, int64_t t1) { silu_mul_rows<VAvx2>(a, t0, t1); }
void rope_kv_write_avx2(const RopeArgs& a, int64_t t0, int64_t t1) { rope_kv_any<VAvx2>(a, t0, t1); }

}  // namespace metroline

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (the CPU check says scalar)

namespace metroline {
void rms_norm_avx2(const NormArgs&, int64_t, int64_t) {}
void silu_mul_avx2(const SiluArgs&, int64_t, int64_t) {}
void rope_kv_write_avx2(const RopeArgs&, int64_t, int64_t) {}
}  // namespace metroline

#endif
