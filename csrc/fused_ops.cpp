// The torch-facing side of the fused layer ops (fused.h): schemas, argument checks, threads.
// Registered as a fragment of the metroline library, so ops.cpp's TORCH_LIBRARY stays untouched.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "attention_ops.h"
#include "fused.h"
#include "vec_cpu.h"

namespace metroline {
namespace {

// Elements per thread before splitting rows over threads: waking the pool costs a few us.
constexpr int64_t kMinElemsPerTask = 1 << 15;

template <class Args>
void run_rows(void (*fn)(const Args&, int64_t, int64_t), const Args& a, int64_t T, int64_t elems_per_row) {
  if (T * elems_per_row <= kMinElemsPerTask) return fn(a, 0, T);
  at::parallel_for(0, T, kMinElemsPerTask / elems_per_row + 1, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
}

template <class Fn>
Fn pick(int64_t isa, Fn scalar, Fn avx2, Fn avx512) {
  const int use = vec_resolve_isa(isa);
  return use == VEC_AVX512 ? avx512 : use == VEC_AVX2 ? avx2 : scalar;
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1, op, name,
              " must be a 2-D float32 CPU tensor with contiguous rows, got ", t.scalar_type(), " ", t.sizes(),
              " strides ", t.strides());
}

void check_weight(const at::Tensor& w, int64_t H, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == H &&
                  w.is_contiguous(),
              op, "weight must be a contiguous float32 CPU vector of ", H, " values");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t isa) {
  const char* op = "metroline.rms_norm: ";
  check_rows(x, op, "x");
  const int64_t T = x.size(0), H = x.size(1);
  check_weight(weight, H, op);
  at::Tensor y = at::empty({T, H}, x.options());
  NormArgs a{x.data_ptr<float>(), x.stride(0), nullptr, 0, weight.data_ptr<float>(), y.data_ptr<float>(), H, H,
             float(eps)};
  run_rows(pick(isa, rms_norm_scalar, rms_norm_avx2, rms_norm_avx512), a, T, H);
  return y;
}

void add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                  int64_t isa) {
  const char* op = "metroline.add_rms_norm: ";
  check_rows(x, op, "x");
  check_rows(residual, op, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), op, "x ", x.sizes(), " and residual ", residual.sizes(),
              " differ in shape");
  const int64_t T = x.size(0), H = x.size(1);
  check_weight(weight, H, op);
  float* xp = x.data_ptr<float>();
  NormArgs a{xp, x.stride(0), residual.data_ptr<float>(), residual.stride(0), weight.data_ptr<float>(), xp,
             x.stride(0), H, float(eps)};
  run_rows(pick(isa, rms_norm_scalar, rms_norm_avx2, rms_norm_avx512), a, T, 2 * H);
}

at::Tensor silu_mul(const at::Tensor& x, int64_t isa) {
  const char* op = "metroline.silu_mul: ";
  check_rows(x, op, "x");
  TORCH_CHECK(x.size(1) % 2 == 0, op, "x must be [T, 2 * I] (gate then up), got ", x.sizes());
  const int64_t T = x.size(0), I = x.size(1) / 2;
  at::Tensor y = at::empty({T, I}, x.options());
  SiluArgs a{x.data_ptr<float>(), x.stride(0), y.data_ptr<float>(), I, I};
  run_rows(pick(isa, silu_mul_scalar, silu_mul_avx2, silu_mul_avx512), a, T, 4 * I);
  return y;
}

void rope_kv_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                   const at::Tensor& sin, const std::optional<at::Tensor>& positions, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t isa) {
  const char* op = "metroline.rope_kv_write: ";
  auto heads = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 3 && t.stride(2) == 1, op, name,
                " must be a float32 CPU tensor [T, H, D] with a contiguous last dim, got ", t.scalar_type(), " ",
                t.sizes(), " strides ", t.strides());
  };
  heads(q, "q");
  heads(k, "k");
  heads(v, "v");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && k.size(2) == D && v.size(2) == D && v.size(1) == Hkv &&
                  D % 2 == 0,
              op, "need q [T, Hq, D], k and v [T, Hkv, D] with D even; got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == D &&
                    t->stride(1) == 1,
                op, "cos and sin must be float32 CPU tensors [P, D] with contiguous rows, got ", t->sizes());
  TORCH_CHECK(cos.size(0) == sin.size(0), op, "cos and sin have ", cos.size(0), " and ", sin.size(0), " rows");
  const int64_t P = cos.size(0);
  const int64_t* pos = nullptr;
  if (positions.has_value()) {
    pos = check_positions(op, *positions, T, P);
  } else {
    TORCH_CHECK(P >= T, op, "without positions cos/sin need a row per token: ", P, " rows for T = ", T);
  }
  const int kv = check_kv_caches(op, k_cache, v_cache, Hkv, D);
  const int64_t* slots = check_slots(op, slot_mapping, T, k_cache.size(0));
  RopeArgs a;
  a.q = q.data_ptr<float>();
  a.q_tok = q.stride(0);
  a.q_head = q.stride(1);
  a.Hq = Hq;
  a.k = k.data_ptr<float>();
  a.k_tok = k.stride(0);
  a.k_head = k.stride(1);
  a.Hkv = Hkv;
  a.v = v.data_ptr<float>();
  a.v_tok = v.stride(0);
  a.v_head = v.stride(1);
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.cos_tok = cos.stride(0);
  a.sin_tok = sin.stride(0);
  a.pos = pos;
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.kv = kv;
  a.slots = slots;
  a.D = D;
  run_rows(pick(isa, rope_kv_write_scalar, rope_kv_write_avx2, rope_kv_write_avx512), a, T, (Hq + 3 * Hkv) * D);
}

}  // namespace
}  // namespace metroline

TORCH_LIBRARY_FRAGMENT(metroline, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, int isa=-1) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, int isa=-1) -> ()");
  m.def("silu_mul(Tensor x, int isa=-1) -> Tensor");
  m.def(
      "rope_kv_write(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor cos, Tensor sin, Tensor? positions, "
      "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping, int isa=-1) -> ()");
}

TORCH_LIBRARY_IMPL(metroline, CPU, m) {
  m.impl("rms_norm", &metroline::rms_norm);
  m.impl("add_rms_norm", &metroline::add_rms_norm);
  m.impl("silu_mul", &metroline::silu_mul);
  m.impl("rope_kv_write", &metroline::rope_kv_write);
}
