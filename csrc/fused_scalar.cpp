// Portable instantiation of fused_kernel.h: the slow twin the SIMD paths are tested against.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fused.h"

namespace metroline {
namespace {
#include "vec_scalar.h"
#include "fused_kernel.h"
}  // namespace

void rms_norm_scalar(const NormArgs& a, int64_t t0, int64_t t1) { rms_norm_rows<VScalar>(a, t0, t1); }
void silu_mul_scalar(const SiluArgs& a, int64_t t0, int64_t t1) { silu_mul_rows<VScalar>(a, t0, t1); }
void rope_kv_write_scalar(const RopeArgs& a, int64_t t0, int64_t t1) { rope_kv_any<VScalar>(a, t0, t1); }

}  // namespace metroline
