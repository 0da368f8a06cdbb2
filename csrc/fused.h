// Small fused ops of a decoder layer (RMSNorm, residual add + RMSNorm, SiLU-and-mul, RoPE with
// the KV-cache write): plain C++, no torch headers; fused_ops.cpp is the torch-facing side.
// One kernel file, fused_kernel.h, instantiated per ISA. Every function handles rows
// [t0, t1) of its [T, ...] operands, so fused_ops.cpp can split rows over threads.
#pragma once

#include <cstdint>

#include "kv_cache.h"

namespace metroline {

// y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, in fp32. With res != nullptr (add_rms_norm):
// res[t] += x[t] first, then y[t] = rmsnorm(res[t]) (y may be x).
struct NormArgs {
  const float* x;
  int64_t x_tok;
  float* res;
  int64_t res_tok;
  const float* w;
  float* y;
  int64_t y_tok;
  int64_t H;
  float eps;
};

// y[t, i] = silu(x[t, i]) * x[t, I + i] (gate first, then up, as gate_up_proj stacks them).
struct SiluArgs {
  const float* x;
  int64_t x_tok;
  float* y;
  int64_t y_tok;
  int64_t I;
};

// Rotate-half RoPE on q and k in place, then k and v into the caches at slots[t] (-1: skip):
//   x'[i] = x[i] cos[i] - x[i + D/2] sin[i],  x'[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
// with cos/sin rows cos[pos[t]] (or cos[t] when pos is null). Products and sums are rounded
// one at a time, as torch's x * cos + rotate_half(x) * sin, so the result is bit-identical.
struct RopeArgs {
  float* q;
  int64_t q_tok, q_head, Hq;
  float* k;
  int64_t k_tok, k_head, Hkv;
  const float* v;
  int64_t v_tok, v_head;
  const float* cos;
  const float* sin;
  int64_t cos_tok, sin_tok;
  const int64_t* pos;  // nullable
  void* k_cache;       // [S, Hkv, R] contiguous: fp32 or fp16 (R = D), int8 rows (R = D + 2)
  void* v_cache;
  int kv;              // KvType
  const int64_t* slots;
  int64_t D;
};

void rms_norm_scalar(const NormArgs& a, int64_t t0, int64_t t1);
void rms_norm_avx2(const NormArgs& a, int64_t t0, int64_t t1);
void rms_norm_avx512(const NormArgs& a, int64_t t0, int64_t t1);
void silu_mul_scalar(const SiluArgs& a, int64_t t0, int64_t t1);
void silu_mul_avx2(const SiluArgs& a, int64_t t0, int64_t t1);
void silu_mul_avx512(const SiluArgs& a, int64_t t0, int64_t t1);
void rope_kv_write_scalar(const RopeArgs& a, int64_t t0, int64_t t1);
void rope_kv_write_avx2(const RopeArgs& a, int64_t t0, int64_t t1);
void rope_kv_write_avx512(const RopeArgs& a, int64_t t0, int64_t t1);

}  // namespace metroline
