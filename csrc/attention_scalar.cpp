// Portable instantiation of attention_kernel.h: the slow twin the SIMD paths are tested against.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention.h"

namespace metroline {
namespace {
#include "vec_scalar.h"
#include "attention_kernel.h"
}  // namespace

void attend_scalar(const PagedAttnArgs& a, const AttnItem& it, float* part) {
  attend_dispatch<VScalar>(a, it, part);
}

}  // namespace metroline
